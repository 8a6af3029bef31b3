"""Benchmark of phase 1, every number measured in this one run on this machine.

1. One workload (demo videos, LiteEval's pair by default): frames/s of the whole pipeline, of
   decoding alone, and of the backbones alone on pre-decoded tensors; the ratio
   pipeline / (decode + compute) on CPU (goal <= 1.10), pipeline / max(decode, compute) on GPU (<= 1.15).
2. Achieved FLOP/s of ResNet-101@224 as a fraction of a plain float32 matmul's (goal >= 0.7 on CPU).
3. Decode frames/s of exact seeking, one pass and nearest keyframe, for 1-fps and 16-frame
   sampling of a 2-minute 640x360 H.264 video (GOP 250), and what ``--seek auto`` picks.

Usage: python bench/extract.py [--videos 12] [--backbone resnet101@224 ...] [--device auto] [--batch-size 16]
       [--workers N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if not __package__:  # run as `python bench/extract.py`: this folder would shadow the extract package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from extract.backbones import create_backbone
from extract.datasets import load_annotations
from extract.decode import choose_strategy, default_workers, open_video, read_frames
from extract.demo import generate_demo, write_video
from extract.distributed import Dist, device_for, synchronize
from extract.flops import backbone_flops
from extract.pipeline import ExtractConfig, compute_features, place_backbone, run_extraction
from extract.sampling import Sampling


def timed(fn, repeat: int = 1) -> float:
    """Seconds of one call: the best of ``repeat`` calls (the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(device: torch.device, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    (a @ b), synchronize(device)
    seconds = timed(lambda: ((a @ b), synchronize(device)), repeat=20)
    return 2 * n**3 / seconds


def two_minute_video(folder: str) -> str:
    path = os.path.join(folder, "two_minutes.mp4")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(360, 640, 3), dtype=np.uint8)
    frames = (np.roll(base, shift, axis=1) for shift in range(0, 3000 * 2, 2))  # 3000 frames at 25 fps
    write_video(path, frames, fps=25, gop=250)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12, help="demo videos in the workload (16 frames each)")
    parser.add_argument("--backbone", action="append", help="default: mobilenetv2@112 and resnet101@224")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="decoding processes of the pipeline run (default: cores per rank - 1)")
    args = parser.parse_args()
    names = args.backbone or ["mobilenetv2@112", "resnet101@224"]
    device = device_for(args.device, Dist())
    print(f"device {device}, torch threads {torch.get_num_threads()}, backbones {names}")

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "demo")
        generate_demo(root, videos_per_class=max(1, args.videos // 10 + (args.videos % 10 > 0)), frames=48,
                      progress=False)
        ann = load_annotations("demo", [], root)
        videos = ann.videos[: args.videos]
        sampling = Sampling(num_frames=16)

        # 1a. decoding alone (one process, as the pipeline's work in total)
        decoded = []
        t_decode = timed(lambda: decoded.extend(read_frames(v.path, sampling)[0] for v in videos))
        frames = torch.cat(decoded)
        # 1b. backbones alone on pre-decoded tensors
        backbones = [create_backbone(n, weights="none") for n in names]
        for b in backbones:
            place_backbone(b, device)
        compute_features(backbones, frames[: args.batch_size], device)  # warm-up
        t_compute = timed(lambda: ([compute_features(backbones, frames[s:s + args.batch_size], device)
                                    for s in range(0, len(frames), args.batch_size)], synchronize(device)))
        # 1c. the whole pipeline (decode workers overlapped with compute, HDF5 journal and assembly)
        with open(os.path.join(root, "bench.txt"), "w") as f:
            f.write("".join(f"{os.path.relpath(v.path, root)} {v.labels[0]}\n" for v in videos))
        cfg = ExtractConfig(dataset="demo", annotations=[os.path.join(root, "bench.txt")], video_root=root,
                            backbones=names, sampling=sampling, out=os.path.join(tmp, "bench.h5"), weights="none",
                            device=args.device, batch_size=args.batch_size, workers=args.workers, progress=False)
        t_pipeline = run_extraction(cfg).seconds
        n = len(frames)
        print(f"workload: {len(videos)} videos x 16 frames = {n} frames, batch {args.batch_size}, "
              f"{args.workers} decoding workers")
        print(f"  pipeline  {n / t_pipeline:8.1f} frames/s   ({t_pipeline:.2f} s, incl. model build and cache write)")
        print(f"  decode    {n / t_decode:8.1f} frames/s   ({t_decode:.2f} s)")
        print(f"  compute   {n / t_compute:8.1f} frames/s   ({t_compute:.2f} s)")
        if device.type == "cuda":
            print(f"  pipeline / max(decode, compute) = {t_pipeline / max(t_decode, t_compute):.3f}  (goal <= 1.15)")
        else:
            print(f"  pipeline / (decode + compute)   = {t_pipeline / (t_decode + t_compute):.3f}  (goal <= 1.10)")

        # 2. ResNet-101@224 against the matmul roofline
        r101 = create_backbone("resnet101@224", weights="none")
        gmacs = backbone_flops(r101).gflops
        place_backbone(r101, device)
        x = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=next(r101.module.parameters()).dtype)
        x = x.contiguous(memory_format=torch.channels_last)

        def forward():
            with torch.inference_mode():
                r101.module(x)
            synchronize(device)

        forward()
        seconds = timed(forward, repeat=3)
        achieved = 2 * gmacs * 1e9 * args.batch_size / seconds
        peak = matmul_flops(device)
        print(f"resnet101@224: {args.batch_size / seconds:.1f} frames/s, {achieved / 1e9:.1f} GFLOP/s achieved; "
              f"float32 matmul {peak / 1e9:.1f} GFLOP/s; fraction {achieved / peak:.2f}  (goal >= 0.7 on CPU)")

        # 3. decoding strategies on a 2-minute video
        path = two_minute_video(tmp)
        video = open_video(path)
        keyframes = video.keyframes()
        for label, s in (("1 fps", Sampling(fps=1.0)), ("16 frames", Sampling(num_frames=16))):
            targets = np.unique(s.indices(len(video), video.fps()))
            rates = {mode: len(targets) / timed(lambda mode=mode, s=s: read_frames(path, s, mode), repeat=2)
                     for mode in ("exact", "pass", "keyframe")}
            print(f"2-minute video, {label} ({len(targets)} samples): " +
                  ", ".join(f"{m} {r:.1f} frames/s" for m, r in rates.items()) +
                  f"; auto picks {choose_strategy(targets, keyframes)}; "
                  f"pass / exact = {rates['pass'] / rates['exact']:.2f}x, keyframe / exact = "
                  f"{rates['keyframe'] / rates['exact']:.2f}x")


if __name__ == "__main__":
    main()
