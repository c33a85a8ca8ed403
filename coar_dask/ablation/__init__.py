"""Applying component masks to a model: ``zeroing`` (the exact weight-zeroing
semantics, in place and the seed's deep copy), ``batched`` (several masks per
pass with forward hooks, BatchNorm folding) and ``engine`` (the pass shape and
:func:`~coar_dask.ablation.engine.compute_outputs`, which picks between them).
"""
