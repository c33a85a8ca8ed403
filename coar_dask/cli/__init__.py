"""The ``coar-dask`` command line: every command, flag, print and exit code.
"""
