"""Execution: one executor (in-process or Dask) for build blocks and fit
slices, the build, and the clusters it runs on.
"""
