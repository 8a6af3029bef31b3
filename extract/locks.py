"""One writer at a time: an exclusive ``flock`` on a lock file that names its holder.

The kernel releases the lock when the holder exits, however it exits (a kill included), so a lock
is never stale; the file itself stays, holding the last holder's pid. Used for the feature cache
(``<cache>.lock``), run folders (``<run>/.lock``) and the demo folder (``<root>/.lock``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Iterator

import torch

from . import distributed
from .errors import UserError


class Busy(UserError, RuntimeError):
    """What a lock guards is being written by another live process."""


@contextlib.contextmanager
def exclusive(path: str, what: str, *, wait: bool = False, advice: str = "wait for it or pass another --out"
              ) -> Iterator[None]:
    """Hold the lock ``path`` for the ``with`` block. Held by another process: wait for it
    (``wait``), or raise :class:`Busy` naming ``what``, the holder's pid and host, and ``advice``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise Busy(f"{what} is being written by {holder}: {advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def exclusive_job(path: str, what: str, *, main: bool, device: torch.device, advice: str,
                  then=lambda: None) -> Iterator[None]:
    """:func:`exclusive` held by rank 0 (``main``) for a whole ``torchrun`` job, ``then()`` run by it
    once the lock is held (sweeping what killed writers left, checking what is there; it may refuse
    with a :class:`UserError`). Every rank takes part in one agreement, so that a refused job raises
    on every rank together."""
    with contextlib.ExitStack() as held:
        refused: UserError | None = None
        if main:
            try:
                held.enter_context(exclusive(path, what, advice=advice))
                then()
            except UserError as err:
                refused = err
        if distributed.smallest(int(refused is None), device) == 0:
            raise refused or UserError(f"{what}: refused by rank 0 (it says why)")
        yield
