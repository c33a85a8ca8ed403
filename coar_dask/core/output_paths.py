"""The one rule for files the package writes: never over anything it must not replace.

Every command and library function that writes a file (attributions, plots,
``.beton`` files, ``.npy`` exports) goes through :func:`check_output_path`
and :func:`write_atomically`:

* nothing is written over a zarr store's own files (a coar_dask store or
  another tool's): ``fit --out STORE/zarr.json`` would replace the store's
  metadata and lose the store, ``STORE/margins/c/3/0`` a chunk;
* nothing is written onto something that is not a regular file (a folder, a
  device node such as ``/dev/full``, a pipe): it is refused, never replaced;
* an existing file is replaced only when ``overwrite`` is given
  (``--overwrite`` on the command line);
* the data goes to a temporary file beside the target, renamed into place
  once whole, so an interrupted or failed write (a full disk, a read-only
  folder) leaves the old file, or nothing, and one line naming the problem.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any, Callable

from coar_dask.errors import ConfigError

__all__ = ["check_output_path", "write_atomically", "os_error_message", "zarr_node_hit"]


#: Names at a zarr group's root that belong to the group (its metadata; a coar_dask store's claim).
_GROUP_FILES = ("zarr.json", "coar_dask.claim.json")


def _node_type(folder: Path) -> str | None:
    """``"array"``, ``"group"`` (or another node type) when ``folder`` is a zarr v3 node, else ``None``."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return str(json.loads(meta.read_text()).get("node_type", "group"))
    except (OSError, ValueError, AttributeError):
        return "group"  # damaged metadata still marks a zarr node


def zarr_node_hit(path: Path) -> Path | None:
    """The zarr node whose own files ``path`` would replace, if any.

    That is: a path inside a zarr *array*'s folder (its chunks and metadata,
    at any depth), or a group's metadata or claim file at the group's root
    (``STORE/zarr.json``). A new file beside a store's arrays (the research
    code's ``$STORE_DIR/component_datasets.beton``), or in a new folder
    there, touches nothing of the store's and is allowed.
    """
    if path.parent.is_dir() and _node_type(path.parent) is not None and (
            path.name in _GROUP_FILES or path.name.startswith(_GROUP_FILES[1])):
        return path.parent
    for folder in path.parents:
        if _node_type(folder) == "array":
            return folder
    return None


def os_error_message(exc: OSError, path: str | os.PathLike, doing: str = "writing") -> str:
    """One line for an :class:`OSError` met while ``doing`` ``path``: says what to fix."""
    where = str(path)
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"disk full at {where!r} while {doing} it; free space there (completed data is kept) and rerun."
    if exc.errno == errno.EROFS:
        return f"{where!r} is on a read-only filesystem; write somewhere else."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission for {doing} {where!r}; choose a folder you can write to."
    if exc.errno == errno.ENOTDIR:
        return f"{where!r} lies under a file, not a folder; choose a path inside a folder."
    return f"cannot finish {doing} {where!r}: {exc.strerror or exc}."


def check_output_path(path: str | os.PathLike, overwrite: bool = False, *, flag: str = "--overwrite") -> Path:
    """``path`` as an absolute path, once it is safe to write there; else :class:`ConfigError`.

    Refused: a path inside a zarr group's folder (a store), a path under a
    file (``FILE/x.pt``), an existing path that is not a regular file (a
    folder, a device, a pipe), and an existing file without ``overwrite``
    (``flag`` names how to give it). Symbolic links are followed for the
    store check, so a link into a store is refused too.
    """
    path = Path(os.path.abspath(path))
    node = zarr_node_hit(Path(os.path.realpath(path))) or zarr_node_hit(path)
    if node is not None:
        raise ConfigError(
            f"refusing to write {str(path)!r}: it would replace files of the zarr store {str(node)!r} "
            f"(its metadata or an array's chunks); write outside the store's arrays."
        )
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder; "
                                  f"choose a path inside a folder.")
            break
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise ConfigError(os_error_message(exc, path, "checking")) from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
        raise ConfigError(f"refusing to write {str(path)!r}: it is {kind}, which is never replaced; "
                          f"give the path of a file.")
    if not overwrite:
        raise ConfigError(f"{str(path)!r} exists; choose another path, or pass {flag} to replace it.")
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any], *, overwrite: bool = False,
                     flag: str = "--overwrite") -> Path:
    """Check ``path`` (:func:`check_output_path`), call ``write(tmp)`` on a temporary file beside it,
    then rename that into place; returns the absolute path written.

    The temporary file keeps ``path``'s suffix (writers such as matplotlib
    choose the format by it). On any failure it is removed and the old
    file, if any, is left as it was; an :class:`OSError` (full disk,
    read-only folder) becomes one :class:`ConfigError` line.
    """
    path = check_output_path(path, overwrite, flag=flag)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:  # durable before it takes the name
            os.fsync(f.fileno())
        check_output_path(path, overwrite, flag=flag)  # nothing took the name meanwhile
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(os_error_message(exc, path)) from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    return path
