"""The two BLAS products of the moments on the CPU, called so that other Python threads keep running.

:class:`~coar_dask.solvers.moments.Moments` needs ``X^T X`` (``syrk``: half
a general product's work, which torch does not offer) and ``X^T Y'``
(``gemm``). scipy's ``scipy.linalg.blas`` wrappers hold the GIL for the
whole call, so the read-ahead thread (:func:`~coar_dask.solvers.rows.prefetch`),
which decodes the next chunks while BLAS works on this batch, and a Dask
worker's event loop both stopped for 60-100 ms per batch (measured: a
spinning thread ran at 6% of its speed with one BLAS thread, 20-27% with two). The same routines from
``scipy.linalg.cython_blas``, called through :mod:`ctypes` (which releases
the GIL around a foreign call), run at the same speed with the other
threads free.

Both functions check the layouts they rely on and fall back to
``scipy.linalg.blas`` (same result, GIL held) where ``cython_blas`` cannot
be reached.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import numpy as np

__all__ = ["syrk_upper", "gemm_tn"]

logger = logging.getLogger(__name__)

_P = ctypes.c_void_p
_KINDS = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}


@functools.lru_cache(maxsize=None)
def _routine(name: str) -> Any | None:
    """``cython_blas``'s ``name`` as a ctypes function (every argument a pointer), or ``None``."""
    try:
        from scipy.linalg import cython_blas

        capsule = cython_blas.__pyx_capi__[name]
        python = ctypes.PyDLL(None)  # our own handles: ctypes.pythonapi's are shared with other libraries
        get_name = python.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = python.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        signature = get_name(capsule)
        address = get_pointer(capsule, signature)
    except Exception as exc:  # noqa: BLE001 - any failure: use scipy.linalg.blas instead
        logger.debug("scipy cython_blas %s unavailable (%s); BLAS calls will hold the GIL", name, exc)
        return None
    n_args = {"syrk": 10, "gemm": 13}[name[1:]]
    if not _expected(signature.decode("ascii", "replace"), n_args):
        logger.debug("scipy cython_blas %s has signature %r; BLAS calls will hold the GIL", name, signature)
        return None
    return ctypes.CFUNCTYPE(None, *([_P] * n_args))(address)


def _expected(signature: str, n_args: int) -> bool:
    """Whether a cython_blas signature is the one the calls here are written for: ``void``, ``n_args``
    pointers, the integers C ``int`` (LP64), so that a scipy built otherwise is never called wrongly.

    >>> _expected("void (char *, char *, int *, int *, s *, s *, int *, s *, s *, int *)", 10)
    True
    >>> _expected("void (char *, char *, int64_t *, int64_t *, s *, s *, int64_t *, s *, s *, int64_t *)", 10)
    False
    """
    if not (signature.startswith("void (") and signature.endswith(")")):
        return False
    args = [a.strip() for a in signature[len("void ("):-1].split(",")]
    ints = [a for a in args if "int" in a]
    return len(args) == n_args and all(a.endswith("*") for a in args) and all(a == "int *" for a in ints)


def _refs(*values: Any) -> list[Any]:
    return [ctypes.cast(ctypes.pointer(v), _P) for v in values]


def syrk_upper(a: np.ndarray, c: np.ndarray, beta: float) -> None:
    """``c = a @ a.T + beta * c`` on the upper triangle of ``c`` (the lower one is left as it is).

    ``a``: ``(P, n)`` Fortran-ordered (the transpose of a C-ordered ``(n, P)``
    batch); ``c``: ``(P, P)`` Fortran-ordered, same dtype (float32 or float64).
    """
    kind, scalar = _KINDS[np.dtype(a.dtype)]
    p, n = a.shape
    if c.dtype != a.dtype or c.shape != (p, p) or not (a.flags.f_contiguous and c.flags.f_contiguous):
        raise ValueError(f"syrk_upper: need Fortran-ordered a (P, n) and c (P, P) of one dtype; got "
                         f"{a.dtype} {a.shape} and {c.dtype} {c.shape}")
    routine = _routine(kind + "syrk")
    if routine is None or n == 0:
        from scipy.linalg import blas

        getattr(blas, kind + "syrk")(1.0, a, beta=beta, c=c, trans=0, lower=0, overwrite_c=1)
        return
    args = _refs(ctypes.c_char(b"U"), ctypes.c_char(b"N"), ctypes.c_int(p), ctypes.c_int(n), scalar(1.0))
    routine(*args, a.ctypes.data_as(_P), *_refs(ctypes.c_int(p), scalar(beta)), c.ctypes.data_as(_P),
            *_refs(ctypes.c_int(p)))


def gemm_tn(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """``c = a @ b.T`` (overwriting ``c``).

    ``a``: ``(K, n)`` and ``b``: ``(P, n)``, both Fortran-ordered (transposes
    of C-ordered batches); ``c``: ``(K, P)`` Fortran-ordered, whose memory is
    then ``b.T @ a.T`` (``X^T Y'``) in C order.
    """
    kind, scalar = _KINDS[np.dtype(a.dtype)]
    k_rows, n = a.shape
    p = b.shape[0]
    if (b.dtype != a.dtype or c.dtype != a.dtype or b.shape[1] != n or c.shape != (k_rows, p)
            or not (a.flags.f_contiguous and b.flags.f_contiguous and c.flags.f_contiguous)):
        raise ValueError(f"gemm_tn: need Fortran-ordered a (K, n), b (P, n), c (K, P) of one dtype; got "
                         f"{a.dtype} {a.shape}, {b.dtype} {b.shape}, {c.dtype} {c.shape}")
    routine = _routine(kind + "gemm")
    if routine is None or n == 0:
        from scipy.linalg import blas

        getattr(blas, kind + "gemm")(1.0, a, b, trans_b=1, beta=0.0, c=c, overwrite_c=1)
        return
    head = _refs(ctypes.c_char(b"N"), ctypes.c_char(b"T"), ctypes.c_int(k_rows), ctypes.c_int(p), ctypes.c_int(n),
                 scalar(1.0))
    routine(*head, a.ctypes.data_as(_P), *_refs(ctypes.c_int(k_rows)), b.ctypes.data_as(_P),
            *_refs(ctypes.c_int(p), scalar(0.0)), c.ctypes.data_as(_P), *_refs(ctypes.c_int(k_rows)))
