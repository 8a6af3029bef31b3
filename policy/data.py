"""Read the phase-1 cache for training: the features a method needs, labels, splits, FLOPs.

Features are held in memory as float16 when they fit the memory budget, and otherwise streamed
from HDF5 in blocks of half the budget (shuffled block by block), reading only the rows asked for,
so a cache larger than RAM still trains.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from extract.cache import Cache, read_rows


class CacheError(ValueError):
    """A cache that cannot serve a method: missing file, features or wrong dimensions."""


@dataclass
class Batch:
    index: np.ndarray  # (B,) rows of the cache
    features: dict[str, torch.Tensor]  # name -> (B, T, D) float32
    labels: torch.Tensor  # (B, C) float32 multi-hot
    length: torch.Tensor  # (B,) int64 real frames

    def part(self, rows: slice, device: torch.device) -> "Batch":
        """The ``rows`` of this batch on ``device`` (a rank's share under DDP)."""
        return Batch(self.index[rows], {k: v[rows].to(device) for k, v in self.features.items()},
                     self.labels[rows].to(device), self.length[rows].to(device))


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
        if (self.split == "val").any() and (self.split == "test").any():
            return train, rows[self.split == "val"], evaluation, "the cache's val split"
        if len(train) < 2 or len(evaluation) == 0:
            raise CacheError(f"{self.path} needs train and test (or val) videos; "
                             f"it has splits {sorted(set(self.split))}")
        perm = np.random.default_rng(seed).permutation(train)
        n_val = max(1, int(round(val_fraction * len(train))))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val]), evaluation, \
            f"{val_fraction:.0%} of train carved with seed {seed}"

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Features of sorted ``rows``; when streaming, only those rows are read from disk."""
        if self.in_memory:
            return {n: self.arrays[n][rows] for n in self.names}
        return {n: read_rows(self.cache.features(n), rows) for n in self.names}

    def _batch(self, picked: np.ndarray, data: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        where = np.searchsorted(rows, picked)  # rows is sorted and holds every picked row
        feats = {}
        for n, x in data.items():
            t = torch.from_numpy(x[where]).float()
            feats[n] = torch.nn.functional.normalize(t, dim=-1) if self.l2_normalise else t
        return Batch(picked, feats, torch.from_numpy(self.labels[picked]), torch.from_numpy(self.length[picked]))

    def batches(self, rows: np.ndarray, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches over ``rows``, shuffled when a ``generator`` is given. In memory: a full
        permutation. Streamed: blocks of ``block_rows`` of the sorted ``rows`` in shuffled order, each
        read once (its rows only), shuffled within."""
        rows = np.sort(rows)
        if self.in_memory:
            order = rows if generator is None else rows[torch.randperm(len(rows), generator=generator).numpy()]
            for start in range(0, len(order), batch_size):
                picked = order[start:start + batch_size]
                ordered = np.sort(picked)
                yield self._batch(picked, self._read(ordered), ordered)
            return
        blocks = [rows[s:s + self.block_rows] for s in range(0, len(rows), self.block_rows)]
        if generator is not None:
            blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        for block in blocks:
            data = self._read(block)
            order = block if generator is None else block[torch.randperm(len(block), generator=generator).numpy()]
            for start in range(0, len(order), batch_size):
                yield self._batch(order[start:start + batch_size], data, block)
