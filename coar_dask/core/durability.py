"""Writes that survive a crash or a power loss, and files created once (first writer wins).

* :func:`write_concurrently`: a block's chunks written in one trip through
  zarr's event loop;
* :func:`fsync_paths`: chunk files and every folder entry zarr created for
  them flushed to disk, so that a block's completion flags are written only
  once its data is durable;
* :func:`create_exclusive`: a small file (a store's claim, its content
  record) created atomically unless it exists -- on local filesystems and NFS;
  :func:`read_exclusive` reads one back (``None`` while it does not exist).
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["write_concurrently", "fsync_paths", "create_exclusive", "read_exclusive"]


def write_concurrently(writes: Sequence[tuple[Any, slice, np.ndarray]]) -> None:
    """``array[selection] = values`` for each write, in one call into zarr's event loop (the chunks
    are encoded and written concurrently); one at a time where zarr's asynchronous interface is not there."""
    try:
        import asyncio

        from zarr.core.sync import sync
    except ImportError:  # pragma: no cover - another zarr 3 layout
        for arr, selection, values in writes:
            arr[selection] = values
        return

    async def write_all() -> None:
        await asyncio.gather(*(arr.async_array.setitem(selection, values) for arr, selection, values in writes))

    sync(write_all())


def fsync_paths(paths: Sequence[Path], root: Path | None = None) -> None:
    """Flush files and the directories holding them to disk.

    zarr's local store writes each chunk to a temporary file and renames it
    into place, which is atomic but not durable; the directory is synced too,
    so that the rename itself survives a power loss, and so is every folder
    between it and ``root`` (the store), which holds the entry of a chunk
    folder zarr has just created (``masks/c/17/`` for block 17's ``masks/c/17/0``).
    A chunk that is not there (zarr deletes one set to the fill value, e.g.
    completion flags cleared) has its folder synced: the deletion is durable.
    """
    dirs = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a chunk equal to the fill value is not stored (zarr deleted it):
            fd = None              # its folder is synced, which makes the deletion durable
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        parent = path.parent
        if not parent.is_dir():
            continue
        dirs.add(parent)
        if root is not None and parent.is_relative_to(root):  # the chunk key's folders, up to the array's own
            while len(parent.parts) > len(root.parts) + 1:
                parent = parent.parent
                dirs.add(parent)
    for directory in dirs:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_exclusive(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` unless it exists, atomically; no error when it exists.

    The text goes to a unique temporary file first, which is hard-linked to
    ``path``: ``link`` fails when ``path`` exists, on local filesystems and on
    NFS (where ``O_EXCL`` was unreliable before NFSv3), and the claim appears
    whole. An NFS client may report a failed ``link`` that did happen (a lost
    reply to a retried call), so the link count of the temporary file decides.
    Filesystems without hard links fall back to ``O_CREAT | O_EXCL``.
    """
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            _create_exclusive_open(path, text)
        elif os.stat(tmp).st_nlink < 2:
            raise
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive_open(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())



def read_exclusive(path: Path, valid: Callable[[dict[str, Any]], bool], tries: int = 50) -> dict[str, Any] | None:
    """The JSON object in ``path`` (made by :func:`create_exclusive`), or ``None`` when there is no file.

    A file written without hard links (:func:`_create_exclusive_open`) is briefly empty, so an
    object that ``valid`` rejects is read again, every 0.1 s, ``tries`` times; a file still not
    valid after that raises :class:`ValueError`, which the caller words for its file.
    """
    for _ in range(tries):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict) and valid(record):
            return record
        time.sleep(0.1)
    raise ValueError(f"{path} holds no valid record")
