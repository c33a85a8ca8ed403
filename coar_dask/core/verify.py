"""Check a store's integrity, and reset bad blocks so that a build recomputes them.

:func:`verify_store` reads a store block by block (one chunk of every array
in memory at a time) and checks what a component dataset promises:

* the spec's sha256 and the experiment fingerprint recorded in the store's
  attributes match the spec and experiment stored next to them;
* every array has the layout the spec and the store's ``rows_per_chunk`` say
  (shape, row chunking, dtype), ``_completed`` included;
* every chunk of a completed row can be read and decoded (a truncated file or
  one overwritten with other bytes is reported with its block), and no chunk
  file of a completed block is missing, a folder or a symbolic link;
* in a store with block digests (format 2), every completed block has one and
  every array's block matches it: a chunk swapped with another block's, copied
  from another store, linked to another block's or changed is found, as are
  flags set for rows no build wrote. A store without digests (written by an
  earlier coar_dask, or imported from ``.npy`` files) says so in a note;
* the mask of every completed row equals the mask regenerated from
  ``(mask seed, row)`` (bitwise);
* the outputs of completed rows are finite.

It lists the incomplete blocks (pending, or only partly flagged completed)
and any temporary files a killed writer left behind. The result is a
:class:`VerifyReport` (readable with :meth:`~VerifyReport.format`, JSON with
:meth:`~VerifyReport.to_dict`); ``report.ok`` is true only when the store is
intact *and* complete.

:func:`repair_store` turns a report's bad blocks back into pending blocks: it
deletes their unreadable chunk files and clears their ``_completed`` flags,
touching nothing else. The next build (``coar-dask build``) recomputes exactly
those blocks, bitwise the same masks and, on the same device, the same
outputs. Store-level problems (a changed spec, a wrong layout) cannot be
repaired this way and are reported as such.

On the command line::

    coar-dask verify STORE [--json] [--allow-incomplete]   # exit 0 only when all is well
    coar-dask repair STORE [--json] [--dry-run]            # then: coar-dask build ...
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from coar_dask.errors import CoarError, CorruptBlockError, StoreError
from coar_dask.core.masks import sample_masks
from coar_dask.core.store import COMPLETED, DIGESTS, Store, block_digest, open_store

__all__ = [
    "Problem",
    "VerifyReport",
    "RepairReport",
    "PROBLEM_KINDS",
    "verify_store",
    "repair_store",
]

logger = logging.getLogger(__name__)

#: What each kind of problem means; store-level kinds have ``block=None``.
PROBLEM_KINDS = {
    "unreadable": "a chunk file cannot be read or decoded (truncated, or overwritten with other bytes)",
    "missing": "a completed block has no chunk file, so it reads as zeros",
    "not_a_file": "a chunk path holds a folder or a symbolic link, not a chunk file",
    "digest_mismatch": "a chunk does not hold what the build wrote for this block of this store "
                       "(swapped, copied from another store, linked or changed)",
    "no_digest": "rows are flagged completed but no build recorded the block's digest",
    "mask_mismatch": "stored masks differ from the masks regenerated from (mask seed, row)",
    "nonfinite": "outputs of completed rows hold NaN or inf",
    "spec": "the spec recorded in the store does not match its sha256",
    "layout": "an array's shape, row chunking or dtype differs from the spec and rows_per_chunk",
    "experiment": "the experiment recorded in the store does not match its fingerprint",
}

#: Suffix of the temporary files zarr writes a chunk to before renaming it into place.
_TEMP_SUFFIX = ".partial"
_MAX_LISTED = 10
_MAX_FORMAT_LINES = 50


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    items = sorted(int(i) for i in indices)
    k = 0
    while k < len(items):
        j = k
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[k]) if j == k else f"{items[k]}-{items[j]}")
        k = j + 1
    return ", ".join(out)


def _listed(values: Sequence[int], limit: int = _MAX_LISTED) -> str:
    values = [int(v) for v in values]
    more = f" (and {len(values) - limit} more)" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store.

    ``block`` is the row block it lies in, or ``None`` for a problem of the
    whole store; ``kind`` is a key of :data:`PROBLEM_KINDS`; ``rows`` lists
    affected rows where that is known.
    """

    kind: str
    message: str
    block: int | None = None
    array: str | None = None
    rows: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "block": self.block,
            "array": self.array,
            "rows": list(self.rows),
            "message": self.message,
        }


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` found.

    ``ok`` is true only when nothing is wrong (:attr:`intact`) and every block
    is completed (:attr:`complete`).
    """

    path: str
    num_rows: int
    n_blocks: int
    rows_per_chunk: int
    completed_rows: int
    completed_blocks: int
    incomplete_blocks: tuple[int, ...]
    partial_blocks: tuple[int, ...]
    problems: tuple[Problem, ...]
    masks_checked: bool
    rows_checked: int
    temp_files: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def store_problems(self) -> tuple[Problem, ...]:
        """Problems of the whole store (spec, layout, experiment record)."""
        return tuple(p for p in self.problems if p.block is None)

    @property
    def bad_blocks(self) -> tuple[int, ...]:
        """Blocks with at least one problem, sorted."""
        return tuple(sorted({p.block for p in self.problems if p.block is not None}))

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def complete(self) -> bool:
        return not self.incomplete_blocks

    @property
    def ok(self) -> bool:
        return self.intact and self.complete

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (what ``coar-dask verify --json`` prints)."""
        return {
            "path": self.path,
            "ok": self.ok,
            "intact": self.intact,
            "complete": self.complete,
            "num_rows": self.num_rows,
            "n_blocks": self.n_blocks,
            "rows_per_chunk": self.rows_per_chunk,
            "completed_rows": self.completed_rows,
            "completed_blocks": self.completed_blocks,
            "incomplete_blocks": list(self.incomplete_blocks),
            "partial_blocks": list(self.partial_blocks),
            "bad_blocks": list(self.bad_blocks),
            "problems": [p.to_dict() for p in self.problems],
            "masks_checked": self.masks_checked,
            "rows_checked": self.rows_checked,
            "temp_files": list(self.temp_files),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def format(self) -> str:
        """A readable, multi-line report."""
        lines = [f"store:      {self.path}"]
        lines.append(
            f"rows:       {self.completed_rows} / {self.num_rows} completed "
            f"({self.completed_blocks} / {self.n_blocks} blocks of {self.rows_per_chunk})"
        )
        checked = "masks regenerated and compared" if self.masks_checked else "masks NOT compared"
        lines.append(f"checked:    {self.rows_checked} completed rows ({checked}; outputs finite) "
                     f"in {self.seconds:.1f} s")
        for p in self.store_problems:
            lines.append(f"PROBLEM:    {p.message}")
        by_block: dict[int, list[Problem]] = {}
        for p in self.problems:
            if p.block is not None:
                by_block.setdefault(p.block, []).append(p)
        shown = 0
        for b in sorted(by_block):
            for p in by_block[b]:
                if shown < _MAX_FORMAT_LINES:
                    lines.append(f"BAD BLOCK {b}: {p.message}")
                shown += 1
        if shown > _MAX_FORMAT_LINES:
            lines.append(f"...         and {shown - _MAX_FORMAT_LINES} more problem(s) in blocks "
                         f"{_ranges(self.bad_blocks)} (all of them with --json)")
        if self.incomplete_blocks:
            lines.append(f"incomplete: {len(self.incomplete_blocks)} block(s): {_ranges(self.incomplete_blocks)}")
        if self.partial_blocks:
            lines.append(f"partial:    block(s) {_ranges(self.partial_blocks)} have only some rows flagged "
                         f"completed; a build recomputes them whole")
        if self.temp_files:
            lines.append(f"leftovers:  {len(self.temp_files)} temporary file(s) of interrupted writes "
                         f"(harmless; `coar-dask repair` removes them)")
        for note in self.notes:
            lines.append(f"note:       {note}")
        if self.ok:
            lines.append("result:     OK: every block is completed and intact.")
        elif self.intact:
            lines.append("result:     INTACT BUT INCOMPLETE: run `coar-dask build` to compute the pending blocks.")
        elif self.bad_blocks and not self.store_problems:
            lines.append(f"result:     {len(self.bad_blocks)} BAD BLOCK(S): run `coar-dask repair {self.path}` to "
                         f"mark them pending, then `coar-dask build` to recompute them.")
        else:
            lines.append("result:     STORE-LEVEL PROBLEMS: the store's metadata do not match its spec or layout; "
                         "`coar-dask repair` cannot fix this. Restore the store's zarr.json files from a backup "
                         "or build a new store.")
        return "\n".join(lines)


def _chunk_file(store: Store, name: str, block: int, arr: Any = None) -> Path:
    """The file of block ``block`` of array ``name`` (``arr``: the array, if already open)."""
    if arr is None:
        return store.chunk_path(name, block)
    coords = (int(block),) + (0,) * (len(arr.shape) - 1)
    return store.path / name / arr.metadata.encode_chunk_key(coords)


def _check_metadata(store: Store) -> tuple[list[Problem], list[str], dict[str, Any]]:
    """Store-level checks; returns problems, notes and the mask settings found."""
    problems: list[Problem] = []
    notes: list[str] = []
    meta = store.meta
    spec = store.spec
    recorded = meta.get("spec_sha256")
    if recorded != spec.sha256:
        problems.append(Problem(
            "spec",
            f"the store records spec sha256 {str(recorded)[:12]}… but its spec {spec.to_dict()} hashes to "
            f"{spec.sha256[:12]}…; the store's attributes were edited or damaged.",
        ))
    rpc = store.rows_per_chunk
    n = spec.num_models
    wanted = {a.name: ((n, *a.shape), (rpc, *a.shape), a.np_dtype) for a in spec.schema}
    wanted[COMPLETED] = ((n,), (rpc,), np.dtype(bool))
    for name, (shape, chunks, dtype) in wanted.items():
        try:
            arr = store.array(name)
            found = (tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype))
        except Exception as exc:  # noqa: BLE001 - any failure to open the array is the finding
            problems.append(Problem(
                "layout", f"array {name!r} is missing or its metadata cannot be read ({type(exc).__name__}: {exc}).",
                array=name,
            ))
            continue
        if found != (shape, chunks, dtype):
            problems.append(Problem(
                "layout",
                f"array {name!r} has shape {found[0]}, chunks {found[1]}, dtype {found[2]}; the spec and "
                f"rows_per_chunk={rpc} need shape {shape}, chunks {chunks}, dtype {dtype}.",
                array=name,
            ))
    exp_record = meta.get("experiment")
    fp = meta.get("experiment_fingerprint")
    x_name = None
    if exp_record is not None:
        from coar_dask.core.experiment import Experiment

        try:
            exp = Experiment.from_dict(exp_record, source="the store's experiment record")
        except CoarError as exc:
            problems.append(Problem("experiment", f"the store's experiment record cannot be read: {exc}"))
            exp = None
        if exp is not None:
            x_name = exp.x_name
            if fp is not None and exp.fingerprint != fp:
                problems.append(Problem(
                    "experiment",
                    f"the store records experiment fingerprint {fp[:12]}… but its experiment record hashes to "
                    f"{exp.fingerprint[:12]}…; the store's attributes were edited or damaged.",
                ))
            for key in ("mask_seed", "alpha"):
                if meta.get(key) is not None and meta.get(key) != getattr(exp, key):
                    problems.append(Problem(
                        "experiment",
                        f"the store records {key}={meta.get(key)!r} but its experiment record has "
                        f"{key}={getattr(exp, key)!r}.",
                    ))
    if x_name is None:
        bools = [a.name for a in spec.schema if a.np_dtype == np.bool_]
        x_name = bools[0] if len(bools) == 1 else None
    seed, alpha = meta.get("mask_seed"), meta.get("alpha")
    if not store.has_digests:
        notes.append("no block digests: this store was written by an earlier coar_dask (format 1) or imported, "
                     "so chunks swapped between blocks or copied from another store cannot be detected; build "
                     "into a new store to get them.")
    if x_name is None or x_name not in spec:
        notes.append("masks not compared: the store has no single bool mask array.")
        x_name = None
    elif seed is None or alpha is None:
        notes.append("masks not compared: the store records no mask seed and alpha (it was not initialized "
                     "or built by coar_dask, e.g. imported from .npy files).")
        x_name = None
    return problems, notes, {"x_name": x_name, "seed": seed, "alpha": alpha}


def _temp_files(store: Store) -> list[str]:
    return sorted(str(p.relative_to(store.path)) for p in store.path.rglob(f"*{_TEMP_SUFFIX}") if p.is_file())


class _BlockScan:
    """The per-block checks of :func:`verify_store`, and what they found so far."""

    def __init__(self, store: Store, problems: list[Problem], masks: dict[str, Any],
                 blocks: Sequence[int] | None) -> None:
        self.store = store
        self.problems = problems
        layout_bad = {p.array for p in problems if p.kind == "layout"}
        spec = store.spec
        self.x_name = None if masks["x_name"] in layout_bad else masks["x_name"]
        self.seed, self.alpha = masks["seed"], masks["alpha"]
        self.float_names = [a.name for a in spec.schema if a.np_dtype.kind == "f" and a.name not in layout_bad]
        data_names = [n for n in spec.names if n not in layout_bad]
        self.wanted = set(range(store.n_blocks)) if blocks is None else {int(b) for b in blocks}
        self.incomplete: list[int] = []
        self.partial: list[int] = []
        self.completed_rows = self.rows_checked = 0
        self.completed_arr = None if COMPLETED in layout_bad else store.array(COMPLETED)
        # Opened once: each lookup through the group reads the array's zarr.json again.
        self.arrays = {name: store.array(name) for name in data_names}

    def scan(self, b: int) -> None:
        """Check block ``b``: its completion flags, then the data of its completed rows."""
        block = self.store.block(b)
        flags = self._flags(b, block)
        if flags is None:
            self.incomplete.append(b)
            return
        n_done = int(flags.sum())
        self.completed_rows += n_done
        if n_done < len(block):
            self.incomplete.append(b)
            if n_done:
                self.partial.append(b)
        if n_done == 0 or b not in self.wanted:
            return
        local = np.flatnonzero(flags)
        rows = block.start + local
        data = self._read(b, block, local)
        self.rows_checked += len(rows)
        if self.x_name is not None and self.x_name in data:
            self._check_masks(b, rows, data[self.x_name])
        for name in self.float_names:
            if name in data:
                self._check_finite(b, rows, name, data[name])

    def _flags(self, b: int, block: Any) -> np.ndarray | None:
        """The block's ``_completed`` flags, or ``None`` when they cannot be read."""
        if self.completed_arr is None:
            return None
        try:
            return np.asarray(self.completed_arr[block.start : block.stop], dtype=bool)
        except Exception as exc:  # noqa: BLE001 - an undecodable chunk is the finding
            chunk = _chunk_file(self.store, COMPLETED, b, self.completed_arr).relative_to(self.store.path)
            self.problems.append(Problem(
                "unreadable",
                f"the {COMPLETED} chunk {chunk} cannot be decoded ({type(exc).__name__}: {exc}); the block's "
                f"completion is unknown.",
                block=b, array=COMPLETED,
            ))
            return None

    def _digests(self, b: int) -> dict[str, bytes] | None:
        """The block's recorded digests; ``None`` (and a problem) when a store with digests has none."""
        if not self.store.has_digests:
            return None
        try:
            digests = self.store.stored_digests(b)
        except CorruptBlockError as exc:
            self.problems.append(Problem("unreadable", f"the block's digest chunk cannot be decoded: {exc}",
                                         block=b, array=DIGESTS))
            return None
        if digests is None:
            self.problems.append(Problem(
                "no_digest", "rows are flagged completed but no build recorded the block's digest (flags set "
                             "without a build, or its digest chunk was deleted).", block=b))
        return digests

    def _read(self, b: int, block: Any, local: np.ndarray) -> dict[str, np.ndarray]:
        """The completed rows of every readable array of block ``b``; chunks that are missing, undecodable,
        not files or not the block's own (digest) are problems."""
        digests = self._digests(b)
        data: dict[str, np.ndarray] = {}
        for name, arr in self.arrays.items():
            path = _chunk_file(self.store, name, b, arr).relative_to(self.store.path)
            kind = self.store.chunk_kind(name, b, array=arr)
            if kind in ("folder", "link", "other"):
                what = {"folder": "a folder", "link": "a symbolic link"}.get(kind, "not a regular file")
                self.problems.append(Problem("not_a_file", f"{name!r} chunk {path} is {what}, not a chunk file "
                                                           f"(zarr never writes one).", block=b, array=name))
                continue
            if kind == "missing" and digests is None:
                self.problems.append(self._missing(b, block, name, path))
                continue
            try:
                values = np.asarray(arr[block.start : block.stop])
            except Exception as exc:  # noqa: BLE001 - an undecodable chunk is the finding
                self.problems.append(Problem(
                    "unreadable", f"{name!r} chunk {path} cannot be decoded ({type(exc).__name__}: {exc}).",
                    block=b, array=name,
                ))
                continue
            if digests is not None and block_digest(self.store.digest_binding, b, name, values) != digests.get(name):
                self.problems.append(self._missing(b, block, name, path) if kind == "missing" else Problem(
                    "digest_mismatch", f"{name!r} chunk {path} does not hold what the build wrote for block {b} of "
                                       f"this store (swapped with another block, copied from another store, or "
                                       f"changed).", block=b, array=name))
                continue
            data[name] = values[local]
        return data

    @staticmethod
    def _missing(b: int, block: Any, name: str, path: Path) -> Problem:
        return Problem(
            "missing", f"{name!r} has no chunk file {path} although rows {block.start}-{block.stop - 1} are "
                       f"flagged completed (they read as zeros).", block=b, array=name)

    def _check_masks(self, b: int, rows: np.ndarray, values: np.ndarray) -> None:
        stored = values.reshape(len(rows), -1)
        expected = sample_masks(int(self.seed), rows, stored.shape[1], float(self.alpha))
        differ = rows[(stored != expected).any(axis=1)]
        if differ.size:
            self.problems.append(Problem(
                "mask_mismatch",
                f"{self.x_name!r}: {differ.size} of {len(rows)} completed rows differ from the masks of "
                f"(mask seed {self.seed}, row), alpha {self.alpha}: rows {_listed(differ)}.",
                block=b, array=self.x_name, rows=tuple(int(r) for r in differ),
            ))

    def _check_finite(self, b: int, rows: np.ndarray, name: str, values: np.ndarray) -> None:
        values = values.reshape(len(rows), -1)
        finite = np.isfinite(values)
        if not finite.all():
            bad_rows = rows[~finite.all(axis=1)]
            bad_cols = np.flatnonzero(~finite.all(axis=0))
            self.problems.append(Problem(
                "nonfinite",
                f"{name!r}: rows {_listed(bad_rows)} hold NaN/inf for examples {_listed(bad_cols)}.",
                block=b, array=name, rows=tuple(int(r) for r in bad_rows),
            ))


def verify_store(
    store: Store | str | os.PathLike,
    *,
    blocks: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Verify a store; see the module docstring for what is checked.

    Parameters
    ----------
    store
        A store or its path (opened read-only).
    blocks
        Check only these blocks' data (default: all). Completion counts and
        the incomplete list always cover the whole store.
    progress
        Called as ``progress(done, total)`` after each block.

    Returns
    -------
    VerifyReport
        ``report.ok`` is true only when the store is intact and complete.

    Raises
    ------
    StoreNotFoundError, StoreError
        When ``store`` is not a coar_dask store at all.

    Examples
    --------
    >>> report = verify_store("store")            # doctest: +SKIP
    >>> report.ok, report.bad_blocks              # doctest: +SKIP
    (False, (3,))
    >>> repair_store("store", report=report)      # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if not isinstance(store, Store):
        store = _open(store, read_only=True)
    problems, notes, masks = _check_metadata(store)
    scan = _BlockScan(store, problems, masks, blocks)
    for b in range(store.n_blocks):
        scan.scan(b)
        if progress:
            progress(b + 1, store.n_blocks)
    report = VerifyReport(
        path=str(store.path),
        num_rows=store.num_rows,
        n_blocks=store.n_blocks,
        rows_per_chunk=store.rows_per_chunk,
        completed_rows=scan.completed_rows,
        completed_blocks=store.n_blocks - len(scan.incomplete),
        incomplete_blocks=tuple(scan.incomplete),
        partial_blocks=tuple(scan.partial),
        problems=tuple(problems),
        masks_checked=scan.x_name is not None,
        rows_checked=scan.rows_checked,
        temp_files=tuple(_temp_files(store)),
        notes=tuple(notes),
        seconds=time.perf_counter() - t0,
    )
    if report.problems:
        logger.info("store %s: %d problem(s), bad blocks %s", store.path, len(report.problems),
                    _ranges(report.bad_blocks) or "none")
    return report


def _open(path: str | os.PathLike, *, read_only: bool) -> Store:
    """Open a store, turning an undecodable root ``zarr.json`` into a one-line error."""
    try:
        return open_store(path, read_only=read_only, check_arrays=False)  # verify reports the layout itself
    except CoarError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr raises various errors on damaged metadata
        raise StoreError(
            f"cannot read the metadata of store {str(path)!r} ({type(exc).__name__}: {exc}); its zarr.json "
            f"files are damaged. Restore them from a backup, or build a new store."
        ) from None


def _remove(path: Path) -> None:
    """Remove what lies at a bad chunk's path (a file, a link -- not its target -- or a folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@dataclass(frozen=True)
class RepairReport:
    """What :func:`repair_store` did (or, with ``dry_run``, would do)."""

    path: str
    reset_blocks: tuple[int, ...]
    removed_files: tuple[str, ...]
    unrepairable: tuple[Problem, ...]
    dry_run: bool = False
    verify: VerifyReport | None = field(default=None, compare=False, repr=False)
    #: the store records its experiment, so ``coar-dask build STORE`` needs no ``--experiment``
    experiment_recorded: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing unrepairable is left."""
        return not self.unrepairable

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "reset_blocks": list(self.reset_blocks),
            "removed_files": list(self.removed_files),
            "unrepairable": [p.to_dict() for p in self.unrepairable],
        }

    def format(self) -> str:
        verb = "would reset" if self.dry_run else "reset"
        lines = [f"store:      {self.path}"]
        if self.reset_blocks:
            lines.append(f"{verb}:      {len(self.reset_blocks)} bad block(s) to pending: "
                         f"{_ranges(self.reset_blocks)}")
        else:
            lines.append("blocks:     no bad blocks; nothing to reset.")
        if self.removed_files:
            lines.append(f"{'would remove' if self.dry_run else 'removed'}: {len(self.removed_files)} damaged "
                         f"or temporary file(s)")
        for p in self.unrepairable:
            lines.append(f"UNREPAIRABLE: {p.message}")
        if self.reset_blocks and not self.dry_run:
            build = f"coar-dask build {shlex.quote(self.path)}"
            lines.append(f"next:       run `{build}`; it recomputes exactly these blocks." if self.experiment_recorded
                         else f"next:       run `{build} --experiment EXP.yaml` with the experiment the store was "
                              f"built with (it records none); it recomputes exactly these blocks.")
        return "\n".join(lines)


def repair_store(
    store: Store | str | os.PathLike,
    *,
    report: VerifyReport | None = None,
    dry_run: bool = False,
) -> RepairReport:
    """Mark the bad blocks of a store pending so the next build recomputes them.

    For every block with a problem (see :func:`verify_store`), the block's
    undecodable chunk files (and folders or links found at chunk paths) are
    deleted and its ``_completed`` flags cleared;
    no other block is touched. Temporary files left by interrupted writes are
    removed. Run it while no build writes to the store.

    Parameters
    ----------
    store
        A store or its path.
    report
        A fresh :class:`VerifyReport` of this store (default: verify now).
    dry_run
        Only say what would be done.

    Returns
    -------
    RepairReport
        The blocks reset, the files removed, and the store-level problems
        that a rebuild cannot fix (``ok`` is false when there are any).
    """
    path = store.path if isinstance(store, Store) else Path(store)
    if report is None:
        report = verify_store(path)
    if Path(report.path).resolve() != Path(path).resolve():
        raise StoreError(f"the verify report is of {report.path!r}, not of {str(path)!r}; verify this store first.")
    opened = _open(path, read_only=dry_run)
    removed: list[str] = []
    bad = report.bad_blocks
    for p in report.problems:
        if p.block is not None and p.kind in ("unreadable", "not_a_file") and p.array is not None:
            file = _chunk_file(opened, p.array, p.block)
            if file.is_symlink() or file.exists():
                removed.append(str(file.relative_to(opened.path)))
                if not dry_run:
                    _remove(file)
    for name in report.temp_files:
        file = opened.path / name
        if file.is_file():
            removed.append(name)
            if not dry_run:
                file.unlink()
    if not dry_run:
        completed = opened.array(COMPLETED)
        for b in bad:
            block = opened.block(b)
            completed[block.start : block.stop] = False
        if bad:
            logger.warning("store %s: reset %d bad block(s) to pending: %s", opened.path, len(bad), _ranges(bad))
    return RepairReport(
        path=str(opened.path),
        reset_blocks=bad,
        removed_files=tuple(removed),
        unrepairable=report.store_problems,
        dry_run=dry_run,
        verify=report,
        experiment_recorded=bool(opened.meta.get("experiment")),
    )
