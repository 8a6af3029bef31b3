"""Crash-safe file writes, the one home of them: every file the project writes whole (caches,
journal chunks, checkpoints, logs, run-folder files) goes through :func:`replacing`.

A new file is written to ``<path>.<pid>.tmp``, fsynced, renamed over ``path`` and the folder
fsynced: a kill or a power cut leaves the old file or the new, never a mix. A write that runs out
of room (a full disk, a quota, a file-size limit) leaves ``path`` as it was and no temporary file,
and is :class:`DiskFull`, one line naming the file and the space free.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator

from .errors import UserError

WRITE_ERRORS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


class DiskFull(UserError, OSError):
    """Not enough free space to write a file; nothing was replaced."""


def check_space(path: str, needed: int) -> None:
    """Raise :class:`DiskFull` when the filesystem of ``path`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if free < needed:
        raise DiskFull(f"writing {path} needs about {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free there: "
                       "free some space and run the same command again (finished work is kept)")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yield the temporary path to write ``path``'s new content to (closed by the ``with`` body);
    then fsync it, rename it over ``path`` and fsync the folder. A failed write removes it; one
    that ran out of room is :class:`DiskFull`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_folder(path)
    except (OSError, RuntimeError) as err:
        if isinstance(err, DiskFull) or not write_failed(err):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise DiskFull(f"writing {path} failed ({_reason(err)}; {free / 2**30:.2f} GiB free there): free some space "
                       "and run the same command again (finished work is kept)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), crash-safe."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def fsync_folder(path: str) -> None:
    """fsync the folder holding ``path``, so that a rename into it survives a power cut."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(folder: str, prefix: str = "") -> None:
    """Remove the ``<prefix>*.tmp`` files interrupted writers left in ``folder``. Call it only while
    holding the lock of what the folder holds (:mod:`extract.locks`): a live writer's file would go."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith(prefix) and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def write_failed(err: BaseException) -> bool:
    """Whether ``err`` says a write ran out of room (HDF5 and torch put the errno in the message only)."""
    return getattr(err, "errno", None) in WRITE_ERRORS or any(f"errno = {n}," in str(err) or
                                                              os.strerror(n) in str(err) for n in WRITE_ERRORS)


def _reason(err: BaseException) -> str:
    code = getattr(err, "errno", None)
    code = code if code in WRITE_ERRORS else next(n for n in WRITE_ERRORS if f"errno = {n}," in str(err) or
                                                  os.strerror(n) in str(err))
    return WRITE_ERRORS[code]
