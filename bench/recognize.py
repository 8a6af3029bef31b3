"""Benchmark of ``recognize`` over a corpus: does computing only what a policy chooses spend less
wall time, with decoding overlapped?

On the same videos (``--videos N`` of a run's evaluation videos, repeated to N, read through its
cache's paths; or ``--video-list``'s files), in one run, it recognises them as ``recognize`` does
(worker processes decoding ahead, ``--batch-videos`` in flight) with UNIFORM (every sampled frame
through the expensive backbone), LiteEval and AR-Net (lazily: only the features their decisions
use), each after an untimed warm-up, the methods' passes taken in turn, and prints per method (its
fastest of ``--repeats`` passes): videos/s, wall seconds per video, decoding seconds per video (in
the workers), computing seconds per video (backbones and policy, in the main process), GFLOPs per
video, and the ratios to UNIFORM: wall time, GFLOPs, their quotient (goal: within 1.15x where
computing dominates) and how much of the decoding the computing hid.

Usage: python bench/recognize.py [--uniform RUN] [--liteeval RUN] [--arnet RUN] [--videos 240]
       [--video-list FILE] [--batch-videos 8] [--workers W] [--threads 0] [--frames-per-pass 0]
       [--repeats 3] [--device cpu|cuda]   (defaults: the demo's runs)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if not __package__:  # run as `python bench/recognize.py`: keep the repository root importable
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from extract.cache import Cache
from extract.decode import default_workers
from policy.recognize import Loaded, load, recognize_stream, video_list

DEMO = os.path.join("data", "runs", "demo_t16")


def videos_of(run_dir: str, count: int) -> list[str]:
    """``count`` evaluation videos of a run, as files (through its cache), repeated to ``count``."""
    loaded = load(run_dir, torch.device("cpu"), frames_per_pass=1)
    with Cache(loaded.run.cache) as cache:
        row = {v: i for i, v in enumerate(cache.ids)}
        files = [cache.video_path(row[v]) for v in loaded.run.video_id]
    return [files[i % len(files)] for i in range(count)]


def one_pass(loaded: Loaded, videos: list[str], batch: int, workers: int) -> dict:
    """One pass of ``recognize`` over ``videos``: wall seconds and the per-video results."""
    results, start = [], time.perf_counter()
    for done, unreadable in recognize_stream(loaded, videos, batch_videos=batch, workers=workers):
        if unreadable:
            sys.exit(f"{unreadable[0].path}: {unreadable[0].error}")
        results += done
    wall = time.perf_counter() - start
    n = len(results)
    predicted = sum(r["computed"][name] * seconds for r in results for name, seconds in loaded.frame_seconds.items())
    return {"label": loaded.run.method, "wall": wall / n, "per_s": n / wall, "predicted": predicted / n,
            "gflops": np.mean([r["gflops"] for r in results]),
            "decode": sum(r["seconds"]["decode"] for r in results) / n,
            "compute": sum(r["seconds"]["compute"] for r in results) / n,
            "expensive": np.mean([r["expensive"] for r in results])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uniform", default=os.path.join(DEMO, "uniform"))
    parser.add_argument("--liteeval", default=os.path.join(DEMO, "liteeval-gamma0.1"))
    parser.add_argument("--arnet", default=os.path.join(DEMO, "arnet"))
    parser.add_argument("--videos", type=int, default=240)
    parser.add_argument("--video-list", help="recognise these videos (one per line, repeated to --videos)")
    parser.add_argument("--batch-videos", type=int, default=8)
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")
    parser.add_argument("--frames-per-pass", type=int, default=0,
                        help="most frames per backbone forward; 0: each backbone's fastest, timed (the default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="passes per method, taken in turn with the other methods'; the fastest counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads; 0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for run in (args.uniform, args.liteeval, args.arnet):
        if not os.path.isdir(run):
            sys.exit(f"{run} is not a run folder: run ./demo.sh first, or pass --uniform/--liteeval/--arnet")
    if args.video_list:
        files = video_list((args.video_list,))
        videos = [files[i % len(files)] for i in range(args.videos)]
    else:
        videos = videos_of(args.uniform, args.videos)
    methods = [load(run, device, args.frames_per_pass) for run in (args.uniform, args.liteeval, args.arnet)]
    for loaded in methods:
        one_pass(loaded, videos[:args.batch_videos], args.batch_videos, 0)  # warm-up: allocators and kernels
    passes: list[list[dict]] = [[] for _ in methods]
    for _ in range(args.repeats):  # round robin: a slow spell of a shared machine hits every method alike
        for loaded, done in zip(methods, passes, strict=True):
            done.append(one_pass(loaded, videos, args.batch_videos, args.workers))
    rows = [min(done, key=lambda r: r["wall"]) for done in passes]
    base = rows[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"
    print(f"{len(videos)} videos ({len(set(videos))} distinct); {name}; torch {torch.__version__}; decoder "
          f"{methods[0].decoder}, {args.workers} decoding processes; {args.batch_videos} videos in flight; "
          f"the fastest of {args.repeats} passes per method, taken in turn")
    print("| method | videos/s | wall s/V | decode s/V (workers) | compute s/V | GFLOPs/V | expensive reads/V | "
          "wall-time ratio | GFLOPs ratio | wall ratio / GFLOPs ratio | decoding hidden |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall_ratio, flops_ratio = r["wall"] / base["wall"], r["gflops"] / base["gflops"]
        hidden = 1 - max(r["wall"] - r["compute"], 0.0) / max(r["decode"], 1e-12)
        print(f"| {r['label']} | {r['per_s']:.1f} | {r['wall']:.4f} | {r['decode']:.4f} | {r['compute']:.4f} | "
              f"{r['gflops']:.3f} | {r['expensive']:.1f} | {wall_ratio:.3f} | {flops_ratio:.3f} | "
              f"{wall_ratio / flops_ratio:.2f} | {min(max(hidden, 0.0), 1.0):.0%} |")
    print("decoding hidden: 1 - (wall - compute) / decode, per video: the share of the workers' decoding time that "
          "did not add to the wall time")
    print("predicted: each backbone's calibrated seconds per frame (timed alone at start) times the frames it "
          "computed; its ratio to UNIFORM's is the wall-time ratio the backbones' own speeds allow, apart from the "
          "pipeline (decoding, small batches, the policy's steps)")
    for r in rows[1:]:
        quotient = (r["wall"] / base["wall"]) / (r["gflops"] / base["gflops"])
        predicted = r["predicted"] / base["predicted"]
        bound = "computing" if r["compute"] >= r["decode"] / max(args.workers, 1) else "decoding"
        print(f"{r['label']}: {bound}-bound; wall-time ratio within 1.15x of its GFLOPs ratio: "
              f"{'yes' if quotient <= 1.15 else 'NO'} ({quotient:.2f}x); predicted ratio from the backbones' "
              f"speeds {predicted:.3f}, wall-time ratio / predicted {(r['wall'] / base['wall']) / predicted:.2f}x")


if __name__ == "__main__":
    main()
