"""Benchmark of cache assembly, the step that ends every extraction run.

Writes a journal of ``--videos`` videos in chunks of 32 through ``Journal.write`` (two backbones of
16 dims, T = 129 with LiteEval's 1-fps lengths: 10 to 200 s, so a third are cut at 129; a few failed
videos; not counted), then times ``assemble`` merging it into a new cache (goal: the rate of 100,000
videos of 25 frames in 10 s, 250,000 real frames per second), and once more re-assembling that cache
from itself (the old-cache path: rows read in runs of consecutive rows). It also prints the
features' bytes on disk against the real frames' bytes: padding past a video's length must not be
stored.

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

from extract.cache import Cache, Journal, VideoFeatures, assemble
from extract.datasets import VideoRecord
from extract.flops import FlopsEntry

BACKBONES = {"small@112": 16, "large@224": 16}  # name -> feature dimension
T = 129
CHUNK_VIDEOS = 32
CLASSES = 10
GOAL_FRAMES_PER_S = 100_000 * 25 / 10.0


def write_journal(path: str, videos: list[VideoRecord], rng: np.random.Generator) -> Journal:
    """Chunks of ``CHUNK_VIDEOS`` videos as an extraction run journals them; every 9973rd video fails."""
    journal = Journal(path)
    weights = {name: "none" for name in BACKBONES}
    for lo in range(0, len(videos), CHUNK_VIDEOS):
        indices = range(lo, min(lo + CHUNK_VIDEOS, len(videos)))
        lengths = np.minimum(rng.integers(10, 201, len(indices)), T)
        done = [VideoFeatures(i, np.arange(n, dtype=np.int64) * 25,
                              {name: rng.standard_normal((n, dim)).astype(np.float16)
                               for name, dim in BACKBONES.items()})
                for i, n in zip(indices, lengths, strict=True) if i % 9973 != 17]
        journal.write(done, [(i, "cannot open video stream") for i in indices if i % 9973 == 17], weights)
    return journal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=100_000, help="videos in the journal")
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
        with Cache(path) as cache:
            frames = int(cache.length.sum())
            real = frames * sum(BACKBONES.values()) * 2
            stored = sum(cache.features(n).id.get_storage_size() for n in BACKBONES)
            dense = sum(cache.features(n).size * 2 for n in BACKBONES)
        rate = frames / seconds
        print(f"assemble from the journal: {seconds:.2f} s for {args.videos} videos ({cached} cached, {failed} failed, "
              f"{frames:,} real frames): {rate:,.0f} frames/s, {rate / GOAL_FRAMES_PER_S:.2f}x the goal's "
              f"{GOAL_FRAMES_PER_S:,.0f}")
        print(f"features on disk: {stored / 2**20:.0f} MiB for {real / 2**20:.0f} MiB of real frames "
              f"({stored / real:.2f}x; dense N x T would be {dense / 2**20:.0f} MiB, {dense / real:.2f}x)")
        seconds, _, _ = run([])
        print(f"re-assemble from the old cache alone: {seconds:.2f} s for {args.videos} videos")


if __name__ == "__main__":
    main()
