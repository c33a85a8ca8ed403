"""Job time limits and worker lifetimes (pure arithmetic).

Each batch system writes its time limit its own way: SLURM's ``-t`` reads
``MM``, ``MM:SS``, ``HH:MM:SS`` and ``D-HH[:MM[:SS]]``; PBS's ``walltime`` and
SGE's ``h_rt`` read ``[[HH:]MM:]SS``; LSF's ``-W`` reads ``[HH:]MM``. A
worker leaves a while before its job's limit (:func:`worker_lifetime`), so a
block is never cut off by the scheduler.
"""

from __future__ import annotations

import re
from typing import Sequence

from coar_dask.errors import ConfigError

__all__ = ["parse_walltime", "parse_hms_walltime", "parse_lsf_walltime", "worker_lifetime", "parse_adapt"]

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


def _positive(total: int, walltime: str | int, example: str) -> int:
    if total <= 0:
        raise ConfigError(f"walltime {walltime!r} must be positive, e.g. {example}")
    return total


def parse_walltime(walltime: str | int) -> int:
    """Seconds in a SLURM time limit.

    Accepts SLURM's formats: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM`` and ``D-HH:MM:SS`` (an int is minutes, as in SLURM).

    Examples
    --------
    >>> parse_walltime("01:30:00"), parse_walltime("45"), parse_walltime("1-00:00")
    (5400, 2700, 86400)
    """
    text = str(walltime).strip()
    match = _TIME_RE.match(text)
    if not match:
        raise ConfigError(
            f"walltime {walltime!r} is not a SLURM time; use e.g. '02:00:00' (HH:MM:SS), '90' (minutes) "
            "or '1-12:00:00' (D-HH:MM:SS)"
        )
    parts = [int(p) for p in match.group("rest").split(":")]
    if match.group("days") is not None:
        days = int(match.group("days"))
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 1:
        total = parts[0] * 60
    elif len(parts) == 2:
        total = parts[0] * 60 + parts[1]
    else:
        total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return _positive(total, walltime, "'02:00:00' (HH:MM:SS)")


def parse_hms_walltime(walltime: str | int) -> int:
    """Seconds in a PBS ``walltime`` or SGE ``h_rt``: ``[[HH:]MM:]SS`` (a bare number is seconds).

    Examples
    --------
    >>> parse_hms_walltime("01:30:00"), parse_hms_walltime("90"), parse_hms_walltime("05:00")
    (5400, 90, 300)
    """
    text = str(walltime).strip()
    if not re.fullmatch(r"\d+(?::\d+){0,2}", text):
        raise ConfigError(f"walltime {walltime!r} is not a PBS/SGE time; use e.g. '02:00:00' (HH:MM:SS) "
                          f"or '7200' (seconds)")
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return _positive(total, walltime, "'02:00:00' (HH:MM:SS)")


def parse_lsf_walltime(walltime: str | int) -> int:
    """Seconds in an LSF ``-W`` limit: ``[HH:]MM`` (a bare number is minutes).

    Examples
    --------
    >>> parse_lsf_walltime("01:30"), parse_lsf_walltime("45")
    (5400, 2700)
    """
    text = str(walltime).strip()
    if not re.fullmatch(r"\d+(?::\d+)?", text):
        raise ConfigError(f"walltime {walltime!r} is not an LSF time; use e.g. '02:00' (HH:MM) or '120' (minutes)")
    parts = [int(p) for p in text.split(":")]
    total = (parts[0] * 60 + parts[1]) * 60 if len(parts) == 2 else parts[0] * 60
    return _positive(total, walltime, "'02:00' (HH:MM)")


def worker_lifetime(walltime_s: int) -> tuple[int, int]:
    """``(lifetime, stagger)`` seconds for workers of jobs with this walltime.

    A worker leaves between ``lifetime - stagger`` and ``lifetime + stagger``
    seconds after it starts. The margin before the walltime is 10 % of it
    (between 2 and 10 minutes; a quarter of very short walltimes), and the
    stagger is half the margin, so the last worker still leaves at least half
    the margin before the batch system would kill it, and workers of jobs
    started together do not all leave at once.

    Examples
    --------
    >>> worker_lifetime(3600)   # 1 h: leave after 54 min +- 3 min
    (3240, 180)
    """
    if walltime_s <= 0:
        raise ConfigError(f"walltime must be positive, got {walltime_s} s")
    margin = max(min(0.10 * walltime_s, 600.0), min(120.0, walltime_s / 4))
    return int(walltime_s - margin), int(margin / 2)


def parse_adapt(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"MIN:MAX"`` (or a pair) -> ``(min, max)`` jobs of an adaptive cluster.

    Examples
    --------
    >>> parse_adapt("0:8")
    (0, 8)
    """
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        try:
            pair = tuple(int(p) for p in parts)
        except ValueError:
            pair = ()
    else:
        try:
            pair = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
    if len(pair) != 2 or pair[0] < 0 or pair[1] < max(pair[0], 1):
        raise ConfigError(
            f"adapt must be 'MIN:MAX' jobs with 0 <= MIN <= MAX and MAX >= 1, e.g. '0:8'; got {value!r}"
        )
    return int(pair[0]), int(pair[1])
