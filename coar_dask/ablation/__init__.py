"""Applying component masks to a model: exact weight-zeroing semantics, the
in-place and batched paths, and the pass shape.
"""
