"""Benchmark of ``finetune-backbone``: training throughput against forward-only, and data wait.

In one run, for one backbone at its resolution and TSN clips of ``--segments`` frames:
1. forward-only frames/s (eval mode, no gradients) and training frames/s (forward, backward, SGD
   step, gradient clipping) on clips already in memory, and their ratio (about 1/3 is what the
   three passes cost);
2. a real training loop over decoded videos (the command's own ``Clips`` dataset: random segment
   offsets, random-resized crops, ``--workers`` decoding processes): the share of each step spent
   waiting for the next batch (goal < 10% with enough workers).

Usage: python bench/finetune.py [--backbone efficientnet_lite0@224] [--device cpu|cuda]
       [--batch-size 8] [--segments 16] [--workers 2] [--videos DIR]
Without ``--videos`` the demo videos in data/demo/videos are used (generated there if missing).
Random initial weights (``none``): the speed does not depend on them.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

if not __package__:  # run as `python bench/finetune.py`: this folder would shadow the extract package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
from torch.utils.data import DataLoader

from extract.backbones import create_backbone
from extract.datasets import VideoRecord
from extract.decode import normalisation
from extract.distributed import synchronize
from extract.finetune import TSN, Clips, collate, prepare
from extract.training import soft_cross_entropy

CLASSES = 10


def step_fn(model, optimizer, device, amp):
    def step(clips: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = soft_cross_entropy(model(clips).float(), labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
        optimizer.step()
    return step



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0@224")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per step")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--videos", default=os.path.join("data", "demo", "videos"))
    args = parser.parse_args()
    device = torch.device(args.device)
    backbone = create_backbone(args.backbone, weights="none")
    model = TSN(backbone.module, backbone.dim, CLASSES).to(device)
    model.features.requires_grad_(True)
    amp = device.type == "cuda"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = step_fn(model, optimizer, device, amp)
    r = backbone.resolution
    clips = torch.randn(args.batch_size, args.segments, 3, r, r, device=device)
    labels = torch.eye(CLASSES, device=device)[torch.arange(args.batch_size) % CLASSES]
    frames = args.batch_size * args.segments

    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(clips)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            model(clips)
        synchronize(device)
    forward = frames * args.steps / (time.perf_counter() - start)
    model.train()
    step(clips, labels)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(clips, labels)
    synchronize(device)
    train = frames * args.steps / (time.perf_counter() - start)
    print(f"{args.backbone} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.batch_size} videos x {args.segments} segments a step")
    print(f"forward only: {forward:.1f} frames/s; training: {train:.1f} frames/s; training / forward = "
          f"{train / forward:.2f}")

    paths = sorted(glob.glob(os.path.join(args.videos, "*.mp4")))
    if not paths:
        from extract.demo import generate_demo

        generate_demo(os.path.dirname(args.videos.rstrip("/")), progress=False)
        paths = sorted(glob.glob(os.path.join(args.videos, "*.mp4")))
    videos = [VideoRecord(os.path.basename(p), p, (i % CLASSES,), "train") for i, p in enumerate(paths)]
    dataset = Clips(videos, CLASSES, args.backbone, args.segments, train=True)
    mean, std = normalisation(backbone.arch.mean, backbone.arch.std, device)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                        pin_memory=device.type == "cuda")
    batches = iter(loader)
    next(batches)  # workers started, first batch decoded: not counted
    wait = busy = 0.0
    for _ in range(args.steps):
        tick = time.perf_counter()
        _, x, y, _ = next(batches)
        got = time.perf_counter()
        step(prepare(x.to(device, non_blocking=True), r, mean, std, backbone.arch.interpolation),
             y.to(device, non_blocking=True))
        synchronize(device)
        wait, busy = wait + got - tick, busy + time.perf_counter() - got
    share = wait / (wait + busy)
    print(f"real decoding ({args.workers} workers, {len(videos)} videos of {args.videos}): "
          f"{frames * args.steps / (wait + busy):.1f} frames/s, waiting for data {100 * share:.1f}% of each step "
          f"(goal < 10%: {'met' if share < 0.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
