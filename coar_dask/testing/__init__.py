"""Test helpers that are useful outside the test suite too (benchmarks, CI).

:mod:`coar_dask.testing.slurm` starts and stops a real one-node SLURM cluster
(munge, slurmctld, slurmd) in a temporary folder. Nothing here is imported by
the rest of the package.
"""

from __future__ import annotations

__all__: list[str] = []
