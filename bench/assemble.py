"""Benchmark of cache assembly, the step that ends every extraction run.

Writes a journal of ``--videos`` videos in chunks of 32 through ``Journal.write`` (two backbones of
16 dims, T = 25, a few failed videos; not counted), then times ``assemble`` merging it into a new
cache (goal: 100,000 videos in under 10 s), and once more re-assembling that cache from itself
(the old-cache path: rows read in runs of consecutive rows).

Usage: python bench/assemble.py [--videos 100000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if not __package__:  # run as `python bench/assemble.py`: this folder would shadow the extract package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from extract.cache import Journal, VideoFeatures, assemble
from extract.datasets import VideoRecord
from extract.flops import FlopsEntry

BACKBONES = {"small@112": 16, "large@224": 16}  # name -> feature dimension
T = 25
CHUNK_VIDEOS = 32
CLASSES = 10
GOAL_SECONDS = 10.0
GOAL_VIDEOS = 100_000


def write_journal(path: str, videos: list[VideoRecord], rng: np.random.Generator) -> Journal:
    """Chunks of ``CHUNK_VIDEOS`` videos as an extraction run journals them; every 9973rd video fails."""
    journal = Journal(path)
    weights = {name: "none" for name in BACKBONES}
    for lo in range(0, len(videos), CHUNK_VIDEOS):
        indices = range(lo, min(lo + CHUNK_VIDEOS, len(videos)))
        done = [VideoFeatures(i, np.arange(T, dtype=np.int64) * 3,
                              {n: rng.standard_normal((T, dim)).astype(np.float16) for n, dim in BACKBONES.items()})
                for i in indices if i % 9973 != 17]
        journal.write(done, [(i, "cannot open video stream") for i in indices if i % 9973 == 17], weights)
    return journal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=GOAL_VIDEOS, help="videos in the journal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "videos")
        videos = [VideoRecord(f"c{i % CLASSES}/v{i:07d}.mp4", os.path.join(root, f"c{i % CLASSES}/v{i:07d}.mp4"),
                              (i % CLASSES,), "test" if i % 5 == 0 else "train") for i in range(args.videos)]
        path = os.path.join(tmp, "bench.h5")
        start = time.perf_counter()
        journal = write_journal(path, videos, np.random.default_rng(0))
        chunks = journal.chunks()
        print(f"journal: {args.videos} videos in {len(chunks)} chunks written in {time.perf_counter() - start:.1f} s "
              f"(not counted)")

        def run(chunks: list[str]) -> tuple[float, int, int]:
            start = time.perf_counter()
            cached, failed = assemble(
                path, chunks=chunks, videos=videos, classes=[f"c{k}" for k in range(CLASSES)], problems=[],
                attrs={"dataset": "bench", "video_root": root}, max_length=T, weights={n: "none" for n in BACKBONES},
                flops={n: FlopsEntry(n, int(n.split("@")[1]), 0.1, 1000, dim) for n, dim in BACKBONES.items()})
            return time.perf_counter() - start, cached, failed

        seconds, cached, failed = run(chunks)
        per_goal = seconds * GOAL_VIDEOS / args.videos
        print(f"assemble from the journal: {seconds:.2f} s for {args.videos} videos ({cached} cached, "
              f"{failed} failed); {per_goal:.2f} s per {GOAL_VIDEOS:,} videos: "
              f"{'under' if per_goal < GOAL_SECONDS else 'OVER'} the {GOAL_SECONDS:.0f} s goal")
        seconds, _, _ = run([])
        print(f"re-assemble from the old cache alone: {seconds:.2f} s for {args.videos} videos")


if __name__ == "__main__":
    main()
