"""Model output functions: what is recorded for each example under each mask.

An output function maps ``(logits (B, C), labels (B,))`` to one number per
example ``(B,)``. The default is the seed's margin.
"""

from __future__ import annotations

from typing import Any, Callable

from coar_dask.errors import ExperimentError

__all__ = ["margin", "correct_logit", "OUTPUTS", "get_output"]


def margin(logits: Any, labels: Any) -> Any:
    """Correct-class logit minus the largest other logit (the seed's margin)."""

    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - others.max(dim=1).values


def correct_logit(logits: Any, labels: Any) -> Any:
    """The logit of the correct class."""
    return logits.gather(1, labels[:, None]).squeeze(1)


OUTPUTS: dict[str, Callable[[Any, Any], Any]] = {"margin": margin, "correct_logit": correct_logit}


def get_output(name: str) -> Callable[[Any, Any], Any]:
    """The output function registered as ``name``."""
    try:
        return OUTPUTS[name]
    except KeyError:
        raise ExperimentError(f"unknown output {name!r}; choose one of {sorted(OUTPUTS)}.") from None
