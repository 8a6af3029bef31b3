"""Decoding processes that cannot stall a run: every command that reads raw video
(``extract-features``, ``finetune-backbone``, ``recognize``) decodes through :func:`guarded`.

A video's item is computed in a DataLoader worker process; the consumer waits for it at most
:func:`decode_limit` (60 s + 1 s per MB of file). A decoder past its limit (a native loop holding
its process) is stopped with its processes, its item reported as failed (timed out), new processes
started for the rest. A process that dies (an OOM kill, a decoder's segfault) loses only its
video: the videos in flight are decoded again one process each.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Subset

PREFETCH = 4  # items each decoding process works ahead
TICK = 5.0  # seconds between looks at the decoding time limit while waiting for an item
T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced ``depth`` ahead by a background thread (in order; its errors re-raised here)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(entry: tuple) -> bool:
        """Hand ``entry`` over unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((end, err))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def decode_limit(path: str) -> float:
    """Seconds one video's decoding may take before its process is stopped: 60 s plus 1 s per MB
    of file (a 10 MB clip gets 70 s; a 1.5 GB 4K film 26 min, several times a full decode)."""
    try:
        return 60.0 + os.path.getsize(path) / 1e6
    except OSError:
        return 60.0


class DecodeTimeout(Exception):
    """A video's decoding took longer than :func:`decode_limit`; its processes were stopped."""


def _single(batch: list):
    return batch[0]


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def _loader(dataset: Dataset, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=1, collate_fn=_single, num_workers=workers,
                      worker_init_fn=_one_thread if workers else None, prefetch_factor=PREFETCH if workers else None,
                      pin_memory=pin, timeout=TICK if workers else 0)


def _timed(loader: DataLoader, paths: Sequence[str]) -> Iterator:
    """``loader``'s items (one per path of ``paths``, in order), waiting for each at most its
    :func:`decode_limit` from when the one before arrived (so at least that long on it alone); past
    it, the loader's processes are stopped (terminated when they do not answer, killed when deaf to that) and
    :class:`DecodeTimeout` raised. Without worker processes there is nothing to stop: no limit."""
    it = iter(loader)
    try:
        for path in paths:
            start = time.monotonic()
            while True:
                try:
                    yield next(it)
                    break
                except RuntimeError as err:
                    if "timed out" not in str(err):
                        raise
                    limit = decode_limit(path)
                    if time.monotonic() - start > limit:
                        raise DecodeTimeout(f"decoding took longer than {limit:.0f} s (60 s + 1 s per MB of file): "
                                            "stopped; check the file (a decoder that loops on it), "
                                            "or re-encode it") from None
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # joins its workers, terminating those that hang
        if shutdown is not None:
            shutdown()
        for worker in getattr(it, "_workers", []):  # one deaf to SIGTERM (it blocked it) is killed
            if worker.is_alive():
                worker.kill()
                worker.join()


def _worker_died(err: BaseException) -> bool:
    """Whether ``err`` from a DataLoader means one of its processes died: DataLoader says so, or a batch
    it had already queued could not be fetched from the dead process (shared tensors are handed over
    through a connection to the process that made them)."""
    return isinstance(err, (EOFError, ConnectionError)) or "DataLoader worker" in str(err)


DIED = "the decoding process died on this video (killed: out of memory, or crashed)"


def guarded(dataset: Dataset, paths: Sequence[str], workers: int, failure: Callable[[int, str], T],
            pin: bool = False) -> Iterator[T]:
    """``dataset[k]`` for k = 0, 1, ... in order, computed by ``workers`` processes (0: here, with
    no time limit); ``paths[k]`` is the video item k decodes. An item whose video passes its
    :func:`decode_limit`, or whose process dies twice, is ``failure(k, reason)`` instead.

    Iterate it off the main thread (as :func:`prefetch` does): there DataLoader reports a dead
    worker to this loop (after at most ``TICK`` s) instead of raising from a signal handler wherever
    the main thread happens to be."""
    done = 0
    while done < len(paths):
        try:
            rest = range(done, len(paths))
            for out in _timed(_loader(Subset(dataset, rest), workers, pin), paths[done:]):
                done += 1
                yield out
        except DecodeTimeout as err:
            yield failure(done, str(err))
            done += 1
        except (RuntimeError, EOFError, ConnectionError) as err:
            if not workers or not _worker_died(err):
                raise
            for k in range(done, min(len(paths), done + workers * PREFETCH)):
                try:
                    yield from _timed(_loader(Subset(dataset, [k]), 1, pin), paths[k:k + 1])
                except DecodeTimeout as again:
                    yield failure(k, str(again))
                except (RuntimeError, EOFError, ConnectionError) as again:
                    if not _worker_died(again):
                        raise
                    yield failure(k, DIED)
                done += 1
