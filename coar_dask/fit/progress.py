"""A progress bar for a fit, driven by its :class:`~coar_dask.solvers.base.FitProgress` reports.

One bar serves :func:`coar_dask.fit.fit.fit` (``progress=True``) and ``coar-dask
fit``: it shows the stage (``moments``, ``cg``, ``saga``, ``slices``, ...) and
counts in that stage's unit (rows streamed, iterations, epochs, slices), so a
rate reads ``rows/s`` or ``epochs/s`` rather than ``steps/s``. The bar writes to
stderr; the library shows one only when asked.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from coar_dask.solvers.base import FitProgress
from coar_dask.solvers.registry import stage_units

__all__ = ["STAGE_UNITS", "FitProgressBar", "fit_progress", "stage_unit"]

#: What one step of each stage counts (a stage's first word: ``"moments (validation)"`` counts rows too):
#: the fit's own stages (row groups summed, target slices finished) and each solver's (its registry entry).
STAGE_UNITS = {"moments": "row", "slices": "slice", **stage_units()}


def stage_unit(stage: str) -> str:
    """The unit a stage counts in (:data:`STAGE_UNITS`; ``"step"`` for a stage not listed)."""
    return STAGE_UNITS.get(stage.split(" ")[0], "step")


class FitProgressBar:
    """A tqdm bar on stderr that follows a fit's :class:`FitProgress` reports.

    Call it with each report (it is a progress callback); a new stage (or
    target slice) restarts the count, the rate and the unit. ``disable=None``
    hides it when stderr is not a terminal (the command line's choice);
    ``False`` always shows it.
    """

    def __init__(self, desc: str = "fit", *, disable: bool | None = False) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(desc=desc, unit="step", file=sys.stderr, disable=disable)
        self._where: tuple[str, Any] | None = None

    def __call__(self, report: FitProgress) -> None:
        bar = self._bar
        where = (report.stage, report.target_slice)
        if where != self._where:
            self._where = where
            bar.unit = stage_unit(report.stage)
            bar.reset(total=report.total)
        bar.total = report.total
        bar.n = report.done
        bar.set_description_str(report.describe(), refresh=False)
        bar.refresh()

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def fit_progress(progress: bool | Callable[[FitProgress], None] | None,
                 **bar: Any) -> Iterator[Callable[[FitProgress], None] | None]:
    """The progress callback ``progress`` asks for: ``True`` a :class:`FitProgressBar` (closed on
    leaving), a function itself, ``None``/``False`` none. ``bar``: the bar's keywords."""
    if progress is not True:
        yield progress or None
        return
    callback = FitProgressBar(**bar)
    try:
        yield callback
    finally:
        callback.close()
