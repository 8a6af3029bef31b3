"""Benchmark of ``recognize``: does computing only what a policy chooses really spend less time?

On the same videos (a run's evaluation videos, read through its cache's paths, or ``--video-list``'s
files, e.g. real clips the run never saw), in one run, it recognises them with UNIFORM (every sampled
frame through the expensive backbone), LiteEval and AR-Net (lazily: only the features their
decisions use), each after one untimed warm-up video, the methods' passes taken in turn, and prints
per method (its fastest of ``--repeats`` passes): seconds per video decoding, computing (backbones
and policy) and in all (wall clock), frames decoded per video, GFLOPs per video, the compute-time
ratio to UNIFORM, the GFLOPs ratio and the quotient of the two (goal: each method's compute-time
ratio within 1.15x of its GFLOPs ratio). Decoding is reported apart: where it dominates, the frames each method
decodes say how much of it the skips avoid.

Usage: python bench/recognize.py [--uniform RUN] [--liteeval RUN] [--arnet RUN] [--videos 60]
       [--video-list FILE] [--batch-videos 8] [--threads 0] [--frames-per-pass 0] [--repeats 5]
       [--device cpu|cuda]   (defaults: the demo's runs)
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
from policy.recognize import Loaded, load, recognise, video_list

DEMO = os.path.join("data", "runs", "demo_t16")


def videos_of(run_dir: str, count: int) -> list[str]:
    """The first ``count`` evaluation videos of a run, as files (through its cache)."""
    loaded = load(run_dir, torch.device("cpu"), frames_per_pass=1)
    with Cache(loaded.run.cache) as cache:
        row = {v: i for i, v in enumerate(cache.ids)}
        return [cache.video_path(row[v]) for v in loaded.run.video_id[:count]]


def one_pass(loaded: Loaded, videos: list[str], batch: int) -> tuple[float, float, list[dict]]:
    """``(compute seconds, wall seconds, results)`` of recognising ``videos``, ``batch`` in flight."""
    results, start = [], time.perf_counter()
    for lo in range(0, len(videos), batch):
        results += recognise(loaded, videos[lo:lo + batch])
    return sum(r["seconds"]["compute"] for r in results), time.perf_counter() - start, results


def summary(loaded: Loaded, passes: list[tuple[float, float, list[dict]]]) -> dict:
    """A method's numbers from its fastest pass (by compute seconds)."""
    _, wall, results = min(passes, key=lambda p: p[0])
    n = len(results)
    predicted = sum(r["computed"][name] * seconds for r in results for name, seconds in loaded.frame_seconds.items())
    return {"predicted": predicted / n, "label": loaded.run.method, "gflops": np.mean([r["gflops"] for r in results]),
            "decode": sum(r["seconds"]["decode"] for r in results) / n,
            "compute": sum(r["seconds"]["compute"] for r in results) / n,
            "decoded": np.mean([r["decoded"] for r in results]), "frames": np.mean([r["frames"] for r in results]),
            "expensive": np.mean([r["expensive"] for r in results]), "wall": wall / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uniform", default=os.path.join(DEMO, "uniform"))
    parser.add_argument("--liteeval", default=os.path.join(DEMO, "liteeval-gamma0.1"))
    parser.add_argument("--arnet", default=os.path.join(DEMO, "arnet"))
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--video-list", help="recognise these videos (one per line) instead of the run's evaluation "
                                             "videos; --videos still caps their number")
    parser.add_argument("--batch-videos", type=int, default=8)
    parser.add_argument("--frames-per-pass", type=int, default=0,
                        help="most frames per backbone forward; 0: each backbone's fastest, timed (the default)")
    parser.add_argument("--repeats", type=int, default=5,
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
    videos = video_list((args.video_list,))[:args.videos] if args.video_list else videos_of(args.uniform, args.videos)
    methods = [load(run, device, args.frames_per_pass) for run in (args.uniform, args.liteeval, args.arnet)]
    for loaded in methods:
        print(f"{loaded.run.method}: frames per forward pass {loaded.frames_per_pass}")
        recognise(loaded, videos[:1])  # warm-up: allocators and kernels, not timed
    passes = [[] for _ in methods]
    for _ in range(args.repeats):  # round robin: a slow spell of a shared machine hits every method alike
        for loaded, done in zip(methods, passes, strict=True):
            done.append(one_pass(loaded, videos, args.batch_videos))
    rows = [summary(loaded, done) for loaded, done in zip(methods, passes, strict=True)]
    base = rows[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(videos)} videos, {base['frames']:.1f} sampled frames each; {name}; torch {torch.__version__}; "
          f"{args.batch_videos} videos in flight, frames per forward pass "
          f"{args.frames_per_pass or 'calibrated per backbone'}; the fastest of {args.repeats} passes per method, "
          "taken in turn")
    print("| method | GFLOPs/V | decode s/V | compute s/V | wall s/V | frames decoded/V | expensive reads/V | "
          "compute-time ratio | GFLOPs ratio | time ratio / GFLOPs ratio | wall-time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        time_ratio, flops_ratio = r["compute"] / base["compute"], r["gflops"] / base["gflops"]
        print(f"| {r['label']} | {r['gflops']:.3f} | {r['decode']:.4f} | {r['compute']:.4f} | {r['wall']:.4f} | "
              f"{r['decoded']:.1f} | {r['expensive']:.1f} | {time_ratio:.3f} | {flops_ratio:.3f} | "
              f"{time_ratio / flops_ratio:.2f} | {r['wall'] / base['wall']:.3f} |")
    print("predicted: each backbone's calibrated seconds per frame times the frames it computed; the gap between "
          "the GFLOPs ratio and the predicted ratio is the backbones' unequal speed per GFLOP, the gap between the "
          "predicted and the measured ratio the lazy path's own cost (small batches, the policy's steps) and decoding "
          "that lands in compute time (the decoder's read-ahead sharing the backbones' cores)")
    for r in rows:
        print(f"{r['label']}: predicted backbone time {r['predicted']:.4f} s/V, ratio to UNIFORM's "
              f"{r['predicted'] / base['predicted']:.3f} (measured compute-time ratio "
              f"{r['compute'] / base['compute']:.3f})")
    for r in rows[1:]:
        quotient = (r["compute"] / base["compute"]) / (r["gflops"] / base["gflops"])
        print(f"{r['label']}: compute-time ratio within 1.15x of its GFLOPs ratio: "
              f"{'yes' if quotient <= 1.15 else 'NO'} ({quotient:.2f}x); decoding "
              f"{r['decode'] / base['decode']:.2f}x UNIFORM's ({r['decoded']:.1f} of {r['frames']:.1f} frames decoded)")
    share = base["decode"] / (base["decode"] + base["compute"])
    print(f"UNIFORM spends {share:.0%} of its time decoding" + (": decoding dominates" if share > 0.5 else ""))


if __name__ == "__main__":
    main()
