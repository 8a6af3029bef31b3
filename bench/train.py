"""Benchmark of phase 2 at FCVID's shape, every number measured in this run.

Writes a synthetic cache shaped like FCVID's (91,223 videos, train and test interleaved as in the
official split file, T = 25, coarse 1280-d, fine 2048-d, float16: 15.2 GB dense; the test rows are
zeros, which the per-video LZF chunks store in next to no disk, since training never reads them),
then, with the features streamed from HDF5 under a memory budget far smaller than the cache, trains
``--method`` (default ``liteeval``, hidden 512/2048; any registered method with its defaults; batch
256) over more than one streamed block (a method that warms up first is timed in its main stage),
and for another method than LiteEval also times LiteEval on the same batches and prints the ratio of
their epoch times (goal: no slower than LiteEval); and runs one validation pass over the validation
rows carved from train (10%, scattered among the training rows). It prints: sequences/s, the share
of each training step spent waiting for data (block reads included; goal < 10%), achieved FLOP/s of
the training steps (forward + backward, counted by ``torch.utils.flop_counter``) against a float32
matmul's, validation videos/s, and the process's peak resident memory against the budget (goal: peak
<= budget + 1.5 GiB of fixed overhead), with what lies outside the budget: torch's runtime, the
cache index, weights + gradients + Adam's moments, one training step's activations (Linux:
/proc/self/status). The cache is written by a child process, so the peak is the training's own.

Usage: python bench/train.py [--method NAME] [--videos 91223] [--budget-gb 1] [--device cpu|cuda] [--keep CACHE.h5]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time

if not __package__:  # run as `python bench/train.py`: keep the repository root importable
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from extract.cache import write_cache
from extract.distributed import allow_tf32, synchronize
from extract.flops import FlopsEntry
from policy.data import CachedFeatures
from policy.methods import METHODS
from policy.train import evaluate_split, return_freed_memory, run_inference

FEATURES = (("mobilenetv2@112", 1280, 0.08), ("resnet101@224", 2048, 7.82))
GIB = 1 << 30


def make_cache(path: str, videos: int, steps: int = 25, classes: int = 239) -> None:
    """FCVID-shaped cache: as many train as test videos, assigned at random (interleaved)."""
    rng = np.random.default_rng(0)
    split = np.array(["train"] * (videos // 2) + ["test"] * (videos - videos // 2))
    rng.shuffle(split)
    labels = np.zeros((videos, classes), np.uint8)
    labels[np.arange(videos), rng.integers(0, classes, videos)] = 1
    train = split == "train"

    def rows(dim: int):
        def block(lo: int, hi: int) -> np.ndarray:  # random features for train videos, zeros for test
            out = np.zeros((hi - lo, steps, dim), np.float16)
            out[train[lo:hi]] = rng.standard_normal((int(train[lo:hi].sum()), steps, dim), dtype=np.float32)
            return out
        return block

    write_cache(path, dataset="synthetic", sampling={"num_frames": steps}, classes=[str(i) for i in range(classes)],
                ids=[str(i) for i in range(videos)], splits=split.tolist(), labels=labels,
                length=np.full(videos, steps), frame_index=np.tile(np.arange(steps), (videos, 1)),
                flops=[FlopsEntry(n, int(n.split("@")[1]), g, 0, d) for n, d, g in FEATURES],
                features={n: rows(d) for n, d, _ in FEATURES}, block_rows=256)


def matmul_flops(device: torch.device, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(20):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def resident() -> tuple[int, int]:
    """This process's resident memory now and its peak since the last :func:`reset_peak` (Linux), bytes."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")



def configure(name: str, path: str, args: argparse.Namespace):
    """``name``'s config on the synthetic cache: LiteEval's (hidden 512/2048) and every method's defaults."""
    extra = {"checkpoint_steps": args.checkpoint_steps} if name == "liteeval" else {}
    return METHODS[name].Config(method=name, features=path, coarse=FEATURES[0][0], fine=FEATURES[1][0],
                                batch_size=args.batch_size, **extra)


def stage_epoch(cfg) -> int:
    """An epoch of the method's main stage (after a warm-up stage that trains classifiers only)."""
    return min(getattr(cfg, "warmup_epochs", 0), cfg.epochs - 1)


def liteeval_rate(path: str, store: CachedFeatures, rows, args: argparse.Namespace, device: torch.device,
                  steps: int) -> float:
    """LiteEval's training sequences/s over the first ``steps`` batches of the same order (after one warm-up)."""
    cfg = METHODS["liteeval"].resolve(configure("liteeval", path, args), store.flops, store.sampling)
    method = METHODS["liteeval"](cfg, store.dims, len(store.classes), store.flops)
    model = method.model.to(device)
    optimizer = method.optimizer()
    batches = store.batches(rows, cfg.batch_size, generator=torch.Generator().manual_seed(0))
    elapsed = 0.0
    for i in range(steps + 1):
        start = time.perf_counter()
        batch = next(batches).to(device, store.l2_normalise)
        loss, _ = method.loss(model, batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(device)
        elapsed += (time.perf_counter() - start) * (i > 0)
    return steps * cfg.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=91223)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--budget-gb", type=float, default=1.0, help="memory allowed for features")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tf32", action="store_true", help="CUDA: TF32 matmuls (train-policy --set tf32=true)")
    parser.add_argument("--checkpoint-steps", type=int, default=0,
                        help="LiteEval's checkpoint_steps: recompute activations in blocks of this many steps")
    parser.add_argument("--keep", help="write (or reuse) the synthetic cache here instead of a temporary file")
    parser.add_argument("--method", default="liteeval", choices=sorted(METHODS),
                        help="the method trained (any registered); another than liteeval is also timed against it")
    args = parser.parse_args()
    device = torch.device(args.device)
    allow_tf32(args.tf32)
    return_freed_memory()  # as train-policy does
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, "fcvid_shape.h5")
        if not os.path.exists(path):
            start = time.perf_counter()
            writer = multiprocessing.get_context("fork").Process(target=make_cache, args=(path, args.videos))
            writer.start()
            writer.join()
            print(f"wrote {path} ({args.videos} videos, {os.path.getsize(path) / 2**30:.1f} GiB) "
                  f"in {time.perf_counter() - start:.0f} s")
        cfg = configure(args.method, path, args)
        budget = int(args.budget_gb * GIB)
        before_store = resident()[0]
        store = CachedFeatures(path, [n for n, _, _ in FEATURES], memory_budget=budget, l2_normalise=True)
        cfg = METHODS[args.method].resolve(cfg, store.flops, store.sampling)
        train_rows, val_rows, _, _ = store.splits(cfg.seed, cfg.val_fraction)
        runtime, index = before_store, resident()[0] - before_store
        method = METHODS[args.method](cfg, store.dims, len(store.classes), store.flops)
        state_bytes = 4 * 4 * sum(p.numel() for p in method.model.parameters())  # weights, grads, Adam's two moments
        model = method.model.to(device)
        optimizer = method.optimizer()
        epoch = stage_epoch(cfg)
        method.on_epoch(epoch, optimizer)
        per_block = math.ceil(store.block_rows / cfg.batch_size)
        # the first step warms up and is priced; the rest cross into a second block (a small cache: all its batches)
        steps = min(per_block + 1, math.ceil(len(train_rows) / cfg.batch_size) - 1)
        batches = store.batches(train_rows, cfg.batch_size, generator=torch.Generator().manual_seed(0))
        wait = compute = 0.0
        model.train()
        for i in range(steps + 1):
            t0 = time.perf_counter()
            batch = next(batches).to(device, store.l2_normalise)
            t1 = time.perf_counter()
            if i == 0:
                step_start = resident()[0]
                reset_peak()
            with FlopCounterMode(display=False) if i == 0 else contextlib.nullcontext() as counter:
                loss, _ = method.loss(model, batch, epoch)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            synchronize(device)
            t2 = time.perf_counter()
            if i == 0:
                flops_per_batch = counter.get_total_flops()
                activations = resident()[1] - step_start - state_bytes * 3 / 4  # grads, moments appear in this step
            else:
                wait, compute = wait + t1 - t0, compute + t2 - t1
        start = time.perf_counter()
        inf = run_inference(method, model, store, val_rows, cfg.batch_size)
        val = evaluate_split(method, inf, store.labels[val_rows])
        val_seconds = time.perf_counter() - start
        peak_rss = resident()[1]  # the peak since the reset before the first step: every earlier moment held less
        timed = steps * cfg.batch_size
        peak = matmul_flops(device)
        print(f"cache {len(store)} videos ({len(train_rows)} train, {len(val_rows)} validation carved from train, "
              f"interleaved), {os.path.getsize(path) / GIB:.1f} GiB; features "
              f"{'in memory' if store.in_memory else 'streamed'}, blocks of {store.block_rows} videos; "
              f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        rate = timed / (wait + compute)
        details = f"hidden 512/2048, checkpoint_steps {args.checkpoint_steps}, " if args.method == "liteeval" else ""
        print(f"{args.method} training: {rate:.1f} sequences/s ({steps} timed batches of "
              f"{cfg.batch_size}, T=25, {details}crossing a block boundary)")
        if args.method != "liteeval":
            reference = liteeval_rate(path, store, train_rows, args, device, steps)
            print(f"liteeval training on the same batches: {reference:.1f} sequences/s; {args.method} takes "
                  f"{reference / rate:.2f}x LiteEval's time per epoch (goal <= 1)")
        print(f"data wait: {wait / (wait + compute):.1%} of each step  (goal < 10%)")
        achieved = flops_per_batch * steps / compute
        print(f"{'LSTM' if args.method == 'liteeval' else 'training'} steps: {achieved / 1e9:.1f} GFLOP/s achieved "
              f"(fwd+bwd), float32 matmul {peak / 1e9:.1f} GFLOP/s: fraction {achieved / peak:.2f}")
        print(f"validation: {len(val_rows)} videos in {val_seconds:.1f} s ({len(val_rows) / val_seconds:.0f} "
              f"videos/s), usage {val['fine_usage']:.3f}")
        over = (peak_rss - budget) / GIB
        print(f"peak resident memory {peak_rss / GIB:.2f} GiB = budget {budget / GIB:.2f} GiB + {over:.2f} GiB "
              f"(goal <= budget + 1.5 GiB: {'yes' if over <= 1.5 else 'NO'}), for a {os.path.getsize(path) / GIB:.1f} "
              f"GiB cache; outside the budget: torch runtime {runtime / GIB:.2f} GiB, cache index (ids, labels, "
              f"splits) {index / GIB:.2f} GiB, weights + grads + Adam {state_bytes / GIB:.2f} GiB, one training "
              f"step's working memory (activations, the optimiser's temporaries) {activations / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
