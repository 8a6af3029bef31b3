"""Read the phase-1 cache for training: the features a method needs, labels, splits, FLOPs.

Features are held in memory as float16 when they fit the memory budget, and otherwise streamed
from HDF5 in blocks of half the budget (shuffled block by block), reading only the rows asked for,
so a cache larger than RAM still trains. Under ``torchrun`` the budget is the node's, shared by its
ranks (``policy.train.memory_budget``), and each rank gathers only its share of every batch.

:meth:`CachedFeatures.loader` feeds a device: a background thread gathers the next batches on the
host (float16, in pinned memory for CUDA) while the device computes; the copy is asynchronous and
the cast to float32 and the L2 normalisation run on the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from extract.cache import Cache, read_rows
from extract.errors import UserError
from extract.workers import prefetch


class CacheError(UserError, ValueError):
    """A cache that cannot serve a method: missing file, features or wrong dimensions."""


@dataclass
class Batch:
    index: np.ndarray  # (B,) rows of the cache
    features: dict[str, torch.Tensor]  # name -> (B, T, D): float16 on the host as read, float32 on a device
    labels: torch.Tensor  # (B, C) float32 multi-hot
    length: torch.Tensor  # (B,) int64 real frames

    def to(self, device: torch.device, l2_normalise: bool = False) -> "Batch":
        """This batch on ``device``, features as float32 (L2-normalised per frame if asked), cast there."""
        def ready(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True).float()
            return torch.nn.functional.normalize(x, dim=-1) if l2_normalise else x
        return Batch(self.index, {k: ready(v) for k, v in self.features.items()},
                     self.labels.to(device, non_blocking=True), self.length.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        return Batch(self.index, {k: v.pin_memory() for k, v in self.features.items()}, self.labels.pin_memory(),
                     self.length.pin_memory())


def default_memory_budget() -> int:
    """Half of the memory available now, in bytes."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 4 << 30


class CachedFeatures:
    """The features ``names`` of cache ``path``, with labels, splits and the FLOPs table."""

    def __init__(self, path: str, names: list[str], memory_budget: int | None = None, l2_normalise: bool = False):
        if not os.path.isfile(path):
            raise CacheError(f"no feature cache at {path}: run extract-features first (see README)")
        self.path, self.names, self.l2_normalise = path, list(names), l2_normalise
        try:
            self._open(memory_budget)
        except (OSError, KeyError) as err:  # HDF5's errors for a truncated or foreign file
            raise CacheError(f"{path} is not a readable feature cache ({str(err).splitlines()[0][:100]}): truncated or "
                             "damaged; run extract-features into it again") from None

    def _open(self, memory_budget: int | None) -> None:
        path, names = self.path, self.names
        self.cache = cache = Cache(path)
        self.dataset = cache.dataset
        missing = [n for n in names if n not in cache.backbones]
        if missing:
            backbones = " ".join(f"--backbone {n}" for n in missing)
            held = ", ".join(cache.backbones) or "none"
            raise CacheError(f"{path} lacks features {', '.join(missing)} (it has {held}): "
                             f"add them with `extract-features --dataset {self.dataset} {backbones} --out {path}`")
        self.classes, self.ids, self.split, self.length = cache.classes, cache.ids, cache.split, cache.length
        self.labels = cache.labels.astype(np.float32)
        self.dims = {n: cache.features(n).shape[-1] for n in names}
        self.flops = {name: entry.gflops for name, entry in cache.flops.items()}
        self.sampling = cache.sampling
        size = sum(cache.features(n).size * 2 for n in names)
        budget = memory_budget if memory_budget is not None else default_memory_budget()
        self.in_memory = size <= budget
        self.block_rows = max(1, budget // 2 // max(1, size // max(1, len(self.ids))))  # half the budget per block
        self.arrays = {n: cache.features(n)[:] for n in names} if self.in_memory else None
        if self.in_memory:
            self._check_finite(self.arrays, np.arange(len(self.ids)))

    def __len__(self) -> int:
        return len(self.ids)

    def splits(self, seed: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """``(train, val, evaluation rows, how val was chosen)``.

        Evaluation is ``test`` when present, else ``val``. Validation (checkpoint selection) is the
        cache's ``val`` split when it also has ``test``; otherwise a seeded ``val_fraction`` of train.
        """
        rows = np.arange(len(self))
        train = rows[self.split == "train"]
        evaluation = rows[self.split == "test"] if (self.split == "test").any() else rows[self.split == "val"]
        if len(train) < 2 or len(evaluation) == 0:
            raise CacheError(f"{self.path} needs train and test (or val) videos; "
                             f"it has splits {sorted(set(self.split))}")
        for name, picked in (("train", train), ("evaluation", evaluation)):
            if not self.labels[picked].any():
                raise CacheError(f"{self.path}: no {name} video has a label (all-zero labels): no loss or mAP can be "
                                 "computed; check the annotations' labels and run extract-features again")
        if (self.split == "val").any() and (self.split == "test").any():
            return train, rows[self.split == "val"], evaluation, "the cache's val split"
        perm = np.random.default_rng(seed).permutation(train)
        n_val = max(1, int(round(val_fraction * len(train))))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val]), evaluation, \
            f"{val_fraction:.0%} of train carved with seed {seed}"

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Features of sorted ``rows``; when streaming, only those rows are read from disk."""
        if self.in_memory:
            return {n: self.arrays[n][rows] for n in self.names}
        try:
            data = {n: read_rows(self.cache.features(n), rows) for n in self.names}
        except OSError as err:
            raise CacheError(f"{self.path} could not be read ({str(err).splitlines()[0][:100]}): damaged; run "
                             "extract-features into it again") from None
        return self._check_finite(data, rows)

    def _check_finite(self, data: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """``data`` (features of cache ``rows``), or :class:`CacheError` naming a video whose features
        hold NaN or inf (checked in blocks of about 64 MiB, so the check needs no copy of the cache)."""
        for name, x in data.items():
            step = max(1, (64 << 20) // max(1, x[:1].size))
            for start in range(0, len(x), step):
                bad = ~np.isfinite(x[start:start + step]).reshape(min(step, len(x) - start), -1).all(axis=1)
                if bad.any():
                    first = self.ids[rows[start + int(np.argmax(bad))]]
                    raise CacheError(f"{self.path}: the {name} features of video {first} hold NaN or inf (a damaged "
                                     "cache, or one written before extract-features refused them): extract into "
                                     "a new --out")
        return data

    def _batch(self, picked: np.ndarray, data: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        where = np.searchsorted(rows, picked)  # rows is sorted and holds every picked row
        return Batch(picked, {n: torch.from_numpy(x[where]) for n, x in data.items()},
                     torch.from_numpy(self.labels[picked]), torch.from_numpy(self.length[picked]))

    def batches(self, rows: np.ndarray, batch_size: int, generator: torch.Generator | None = None,
                share: tuple[int, int] = (0, 1)) -> Iterator[Batch | None]:
        """Host batches (float16 features) over ``rows``, shuffled when a ``generator`` is given. In
        memory: a full permutation. Streamed: blocks of ``block_rows`` of the sorted ``rows`` in
        shuffled order, each read once (its rows only), shuffled within.

        ``share`` ``(rank, world)``: every rank draws the same order and gets rows ``rank::world`` of
        each batch, reading only those; a batch with fewer rows than ranks (a last batch) is ``None``
        on every rank alike, so that all skip it together."""
        rank, world = share
        rows = np.sort(rows)
        blocks = [rows] if self.in_memory else [rows[s:s + self.block_rows] for s in range(0, len(rows),
                                                                                           self.block_rows)]
        if generator is not None and not self.in_memory:
            blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        for block in blocks:
            order = block if generator is None else block[torch.randperm(len(block), generator=generator).numpy()]
            mine = [order[s:s + batch_size][rank::world] if min(batch_size, len(order) - s) >= world else order[:0]
                    for s in range(0, len(order), batch_size)]
            if self.in_memory:
                for picked in mine:
                    ordered = np.sort(picked)
                    yield self._batch(picked, self._read(ordered), ordered) if len(picked) else None
                continue
            read = np.sort(np.concatenate(mine))
            data = self._read(read)
            for picked in mine:
                yield self._batch(picked, data, read) if len(picked) else None

    def loader(self, rows: np.ndarray, batch_size: int, device: torch.device, generator: torch.Generator | None = None,
               share: tuple[int, int] = (0, 1)) -> Iterator[Batch | None]:
        """:meth:`batches` ready on ``device`` (float32, normalised as the store says), the next ones
        gathered by a background thread meanwhile; host batches are pinned for a CUDA device."""
        pin = device.type == "cuda"
        host = (b.pin_memory() if pin and b is not None else b for b in self.batches(rows, batch_size, generator,
                                                                                     share))
        for batch in prefetch(host):
            yield None if batch is None else batch.to(device, self.l2_normalise)
