"""Benchmark of phase 2 on a synthetic cache of FCVID's size, every number measured in this run.

Writes a cache of N videos (default 45,611 = FCVID train), T = 25, coarse 1280-d, fine 2048-d
(float16, about 7.6 GB), then trains ``liteeval`` (hidden 512/2048, batch 256) for a few batches
with the features streamed from HDF5 under a memory budget smaller than the cache, and prints:
sequences/s, the share of each step spent waiting for data (goal < 10%), achieved FLOP/s of the
LSTM steps (forward + backward, counted by torch.utils.flop_counter) as a fraction of a float32
matmul's, and the process's peak resident memory against the cache size.

Usage: python bench/train.py [--videos 45611] [--batches 8] [--budget-gb 1] [--keep CACHE.h5]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time

if not __package__:  # run as `python bench/train.py`: keep the repository root importable
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import h5py
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from policy.data import CachedFeatures
from policy.methods import METHODS


def write_cache(path: str, videos: int, steps: int = 25, classes: int = 239) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset": "synthetic", "sampling": '{"num_frames": 25}'})
        f["classes"] = np.array([str(i) for i in range(classes)], dtype=h5py.string_dtype())
        f["videos/id"] = np.array([str(i) for i in range(videos)], dtype=h5py.string_dtype())
        f["videos/split"] = np.array(["train"] * (videos - videos // 10) + ["test"] * (videos // 10),
                                     dtype=h5py.string_dtype())
        labels = np.zeros((videos, classes), np.uint8)
        labels[np.arange(videos), rng.integers(0, classes, videos)] = 1
        f["videos/labels"] = labels
        f["videos/length"] = np.full(videos, steps, np.int32)
        f["videos/frame_index"] = np.tile(np.arange(steps), (videos, 1))
        for name, dim in (("mobilenetv2@112", 1280), ("resnet101@224", 2048)):
            out = f.create_dataset(f"features/{name}", (videos, steps, dim), np.float16)
            for s in range(0, videos, 2048):
                n = min(2048, videos - s)
                out[s:s + n] = rng.standard_normal((n, steps, dim), dtype=np.float32).astype(np.float16)
        f["flops"] = np.array([("mobilenetv2@112", 112, 0.08, 0, 1280), ("resnet101@224", 224, 7.82, 0, 2048)],
                              dtype=[("name", h5py.string_dtype()), ("resolution", "<i4"), ("gflops", "<f8"),
                                     ("params", "<i8"), ("dim", "<i4")])


def matmul_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=45611)
    parser.add_argument("--batches", type=int, default=8, help="timed training batches")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--budget-gb", type=float, default=1.0, help="memory allowed for features")
    parser.add_argument("--keep", help="write (or reuse) the synthetic cache here instead of a temporary file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, "fcvid_size.h5")
        if not os.path.exists(path):
            start = time.perf_counter()
            write_cache(path, args.videos)
            print(f"wrote {path}: {os.path.getsize(path) / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")
        cfg = METHODS["liteeval"].Config(method="liteeval", features=path, coarse="mobilenetv2@112",
                                         fine="resnet101@224", batch_size=args.batch_size)
        store = CachedFeatures(path, [cfg.coarse, cfg.fine], memory_budget=int(args.budget_gb * 2**30))
        method = METHODS["liteeval"](cfg, store.dims, len(store.classes), store.flops)
        optimizer = method.optimizer()
        rows = np.flatnonzero(store.split == "train")
        batches = store.batches(rows, cfg.batch_size, generator=torch.Generator().manual_seed(0))
        wait = compute = 0.0
        for i in range(args.batches + 1):  # the first batch warms up, is priced by the FLOP counter, not timed
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            with FlopCounterMode(display=False) if i == 0 else contextlib.nullcontext() as counter:
                loss, _ = method.loss(method.model, batch, 0)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            t2 = time.perf_counter()
            if i == 0:
                flops_per_batch = counter.get_total_flops()
            else:
                wait, compute = wait + t1 - t0, compute + t2 - t1
        flops = flops_per_batch * args.batches
        total = wait + compute
        peak = matmul_flops()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"cache {os.path.getsize(path) / 2**30:.2f} GiB, features {'in memory' if store.in_memory else 'streamed'} "
              f"(budget {args.budget_gb:g} GiB), torch threads {torch.get_num_threads()}")
        print(f"liteeval training: {args.batches * cfg.batch_size / total:.1f} sequences/s "
              f"({args.batches} batches of {cfg.batch_size}, T=25, hidden 512/2048)")
        print(f"data wait: {wait / total:.1%} of each step  (goal < 10%)")
        print(f"LSTM steps: {flops / compute / 1e9:.1f} GFLOP/s achieved (fwd+bwd), float32 matmul "
              f"{peak / 1e9:.1f} GFLOP/s: fraction {flops / compute / peak:.2f}")
        print(f"peak resident memory {rss / 2**30:.2f} GiB for a {os.path.getsize(path) / 2**30:.2f} GiB cache")


if __name__ == "__main__":
    main()
