"""Which rows a fit reads: the store's row source, and the two rules that choose train and validation rows.

Two rules, one function each, and :func:`select_rows` picks between them:

``"shuffle"`` (:func:`split_rows`, the default of :func:`coar_dask.fit.fit.fit`)
    A seeded random split of the completed rows: ``num_val`` validation
    rows and ``num_train`` train rows, drawn by ``split_seed``.
``"seed"`` (:func:`seed_split`, the research code's rule)
    The first ``num_train`` rows are the train rows and the next
    ``num_val`` the validation rows, in row order, as the seed's
    ``run_regression.py`` reads a ``.beton``; its ``data.seed`` does not
    change them. Wherever the seed's keys (``--data.num_train``,
    ``--data.num_val``, ``--data.seed``) are accepted, this rule applies.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from coar_dask.core.store import Store
from coar_dask.errors import ConfigError, RegressionError

__all__ = ["StoreRows", "infer_names", "split_rows", "seed_split", "select_rows", "ROW_RULES", "fitted_on",
           "in_sample_rows"]

#: The row rules :func:`select_rows` knows.
ROW_RULES = ("shuffle", "seed")


def infer_names(store: Store, x_name: str | None = None, y_name: str | None = None) -> tuple[str, str]:
    """The mask array (``x_name``) and output array (``y_name``) of a store.

    Defaults: the one bool array is the masks, the one other array the outputs.
    The mask array must be bool (True = component kept): another array given
    as ``x_name`` (e.g. the outputs) is refused rather than fitted as masks.
    """
    names = store.spec.names
    if x_name is None:
        bools = [a.name for a in store.spec.schema if a.np_dtype == np.bool_]
        if len(bools) != 1:
            raise RegressionError(
                f"cannot tell which array holds the masks among {list(names)}; pass x_name "
                f"(CLI: --x-name)."
            )
        x_name = bools[0]
    if y_name is None:
        others = [n for n in names if n != x_name]
        if len(others) != 1:
            raise RegressionError(
                f"cannot tell which array holds the outputs among {others}; pass y_name "
                f"(CLI: --y-name)."
            )
        y_name = others[0]
    for label, name in (("x_name", x_name), ("y_name", y_name)):
        if name not in names:
            raise RegressionError(f"{label}={name!r} is not an array of the store; it has {list(names)}.")
    x_dtype = store.spec[x_name].np_dtype
    if x_dtype != np.bool_:
        bools = [a.name for a in store.spec.schema if a.np_dtype == np.bool_]
        raise RegressionError(
            f"x_name={x_name!r} is a {x_dtype} array, but the mask array must be bool (True = component kept); "
            f"pass the store's mask array as x_name (CLI: --x-name){f', e.g. {bools[0]!r}' if bools else ''}."
        )
    if x_name == y_name:
        raise RegressionError(f"x_name and y_name are both {x_name!r}; the outputs are another array.")
    return x_name, y_name


class StoreRows:
    """A row source over chosen rows of a store: yields ``(X, Y)`` blocks, X float32 (0/1) and Y float32,
    or float64 when the store's outputs are float64.

    Each block is read with :meth:`~coar_dask.core.store.Store.read_verified`:
    a block whose chunks are missing, damaged, or do not match the digest
    its build recorded raises :class:`~coar_dask.errors.CorruptBlockError`
    naming the block and ``coar-dask repair``; nothing is fitted on it.

    Parameters
    ----------
    store
        An opened store.
    rows
        Row indices to read (any order; read block by block in row order).
    x_name, y_name
        Mask and output arrays.
    target_slice
        ``(start, stop)`` of the output columns to keep, like the seed's
        ``target_start_ind``/``target_end_ind``.
    """

    def __init__(
        self,
        store: Store,
        rows: np.ndarray,
        x_name: str,
        y_name: str,
        target_slice: tuple[int, int] | None = None,
    ):
        self.store = store
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.x_name, self.y_name = x_name, y_name
        k_total = int(np.prod(store.spec[y_name].shape))
        start, stop = target_slice or (0, k_total)
        if not 0 <= start < stop <= k_total:
            raise RegressionError(
                f"target slice [{start}, {stop}) is outside the {k_total} outputs of {y_name!r}."
            )
        self.target_slice = (int(start), int(stop))
        self.n_rows = int(self.rows.size)
        self.n_features = int(np.prod(store.spec[x_name].shape))
        self.n_targets = stop - start

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        s0, s1 = self.target_slice
        # float64 outputs stay float64 (the solvers then compute in float64); others become float32
        y_dtype = np.float64 if self.store.spec[self.y_name].np_dtype == np.float64 else np.float32
        for _, data in self.store.iter_completed([self.x_name, self.y_name], rows=self.rows):
            x = data[self.x_name].reshape(len(data[self.x_name]), -1).astype(np.float32)
            y = data[self.y_name].reshape(len(data[self.y_name]), -1)[:, s0:s1].astype(y_dtype)
            yield x, y


def split_rows(
    rows: np.ndarray, num_train: int | None, num_val: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split completed rows into train and validation rows, seeded.

    ``num_train=None`` takes every row not used for validation.
    """
    rows = np.asarray(rows, dtype=np.int64)
    num_val = int(num_val or 0)
    if num_train is None:
        num_train = rows.size - num_val
    if num_train <= 0 or num_val < 0 or num_train + num_val > rows.size:
        raise RegressionError(
            f"asked for {num_train} train + {num_val} validation rows but the store has only "
            f"{rows.size} completed rows; build more rows or lower num_train/num_val."
        )
    perm = np.random.default_rng(seed).permutation(rows)
    return np.sort(perm[:num_train]), np.sort(perm[num_train : num_train + num_val])


def seed_split(n: int, num_train: int | None, num_val: int | None, where: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and validation rows among ``n`` rows, by the seed's rule:
    ``range(num_train)`` and ``range(num_train, num_train + num_val)``; all rows
    train when neither is set, and every row not for validation when
    ``num_train`` is ``None``.

    ``where`` ends the error message when the rows do not suffice (e.g.
    ``"store 'x' has only 90 completed rows; ..."``).

    >>> [a.tolist() for a in seed_split(6, 3, 2)]
    [[0, 1, 2], [3, 4]]
    >>> [a.tolist() for a in seed_split(4, None, 1)]
    [[0, 1, 2], [3]]
    """
    if num_train is None and num_val is None:
        return np.arange(n), np.arange(0)
    num_val = int(num_val or 0)
    num_train = n - num_val if num_train is None else int(num_train)
    if num_train <= 0:
        raise ConfigError(f"data.num_train must be positive; found {num_train}.")
    if num_val < 0:
        raise ConfigError(f"data.num_val must be >= 0; found {num_val}.")
    if num_train + num_val > n:
        raise RegressionError(
            f"data.num_train + data.num_val = {num_train + num_val} rows, but "
            f"{where or f'there are only {n} rows; build more rows or lower num_train/num_val'}."
        )
    return np.arange(num_train), np.arange(num_train, num_train + num_val)


def select_rows(rows: np.ndarray, num_train: int | None, num_val: int | None, seed: int = 0,
                rule: str = "shuffle") -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows among ``rows`` (e.g. a store's completed rows) by ``rule``
    (``"shuffle"``: :func:`split_rows`; ``"seed"``: :func:`seed_split`, ``seed`` unused)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rule == "shuffle":
        return split_rows(rows, num_train, num_val, seed)
    if rule == "seed":
        train, val = seed_split(rows.size, num_train, num_val)
        return rows[train], rows[val]
    raise RegressionError(f"row rule {rule!r}: choose one of {list(ROW_RULES)}.")


def _pack_rows(rows: np.ndarray, num_rows: int) -> str:
    """Row indices as a compressed bitmap in base64 text (plain data for an attributions file)."""
    bits = np.zeros(num_rows, dtype=bool)
    bits[rows] = True
    return base64.b64encode(zlib.compress(np.packbits(bits).tobytes(), 9)).decode("ascii")


def _unpack_rows(text: str, num_rows: int) -> np.ndarray:
    packed = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(packed, count=num_rows))


def fitted_on(store: Store, rows: np.ndarray, x_name: str) -> dict[str, Any]:
    """What attributions record about the rows they were fitted on (train and validation rows alike).

    The store's path and ``store_id``, its mask seed and alpha (row ``i``'s
    mask is a function of them: another store with the same ones holds the
    same masks) and the rows themselves (a compressed bitmap), so that
    :func:`in_sample_rows` can tell an in-sample evaluation from a held-out one.
    """
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    return {
        "store": str(store.path),
        "store_id": store.store_id,
        "mask_seed": store.mask_seed,
        "alpha": store.alpha,
        "n_components": int(np.prod(store.spec[x_name].shape)),
        "num_rows": int(store.num_rows),
        "n_rows": int(rows.size),
        "rows": _pack_rows(rows, store.num_rows),
    }


def _same_masks(record: Mapping[str, Any], store: Store, x_name: str) -> bool:
    """Whether ``store``'s row ``i`` holds the same mask as row ``i`` of the recorded store."""
    if record.get("store_id") and record.get("store_id") == store.store_id:
        return True
    if record.get("store") == str(store.path) and not record.get("store_id"):
        return True
    return (record.get("mask_seed") is not None and record.get("mask_seed") == store.mask_seed
            and record.get("alpha") == store.alpha
            and record.get("n_components") == int(np.prod(store.spec[x_name].shape)))


def in_sample_rows(metadata: Mapping[str, Any], store: Store, rows: np.ndarray, x_name: str) -> int | None:
    """How many of ``rows`` of ``store`` the attributions were fitted on (same store, or the same
    masks: same mask seed and alpha); ``None`` when the attributions do not record their rows."""
    records = (metadata.get("fitted_on") or {}).get("stores") if isinstance(metadata.get("fitted_on"), Mapping) else None
    if not isinstance(records, (list, tuple)) or not records:
        return None
    rows = np.asarray(rows, dtype=np.int64)
    hit = np.zeros(rows.size, dtype=bool)
    for record in records:
        if not isinstance(record, Mapping) or not _same_masks(record, store, x_name):
            continue
        try:
            fitted = _unpack_rows(str(record["rows"]), int(record["num_rows"]))
        except (KeyError, TypeError, ValueError, zlib.error):
            raise RegressionError("the attributions' record of their fitted rows ('fitted_on') is damaged; "
                                  "refit them with `coar-dask fit`.") from None
        hit |= np.isin(rows, fitted)
    return int(hit.sum())
