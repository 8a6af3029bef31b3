"""The decoders against each other, on long videos: sampled frames per CPU-second and per wall-second.

    python bench/decode.py                       # long videos made from ../shared/real-videos clips
    python bench/decode.py --video-list FILE     # your own videos, one path per line
    python bench/decode.py --seconds 60          # shorter made videos (a quicker run)

Made videos: a real clip's frames looped into a long H.264 video (libx264 defaults through PyAV),
one at 640x360 for ``--seconds`` s and one at 1280x720 for a quarter of that, 25 fps. For each
video, decoder and sampling pattern it reads the sampled frames as the commands do, on one thread:

- ``16 segments``: ``extract-features --num-frames 16`` (``read_distinct``, seek ``auto``);
- ``1 fps <= 129``: ``--fps 1 --max-frames 129``, LiteEval's sampling;
- ``scattered``: 16 frames of the 1 fps samples, read one at a time in a random order, as a lazy
  policy asks for them in ``recognize``.

It prints frames per CPU-second (``time.process_time``: what a core yields; decoders in extraction
run one per worker process) and per wall-second, their ratio to decord's in the same run, and
whether every frame equals decord's (else the largest pixel difference).
"""
from __future__ import annotations

import argparse
import fractions
import glob
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from extract.decode import DECODERS, open_video, preprocess, read_distinct  # noqa: E402
from extract.sampling import Sampling  # noqa: E402

REAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "real-videos")


def make_long_video(source: str, out: str, seconds: float, size: tuple[int, int], fps: int = 25) -> str:
    """``source``'s frames, resized to ``size`` (width, height), looped into ``seconds`` of H.264."""
    import av

    with av.open(source) as src:
        frames = [f.reformat(width=size[0], height=size[1], format="yuv420p") for f in src.decode(video=0)]
    base = fractions.Fraction(1, fps)
    with av.open(out, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = base
        for i in range(int(seconds * fps)):
            frame = frames[i % len(frames)]
            frame.pts, frame.time_base = i, base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def scattered(path: str, decoder: str, picks: np.ndarray) -> np.ndarray:
    video = open_video(path, decoder)
    return np.concatenate([preprocess(video.frames([int(t)])).numpy() for t in picks])


def patterns(path: str) -> dict:
    """Each pattern: a function of the decoder giving the preprocessed frames (uint8)."""
    video = open_video(path, "decord")
    fps = Sampling(fps=1.0, max_frames=129)
    samples = np.unique(fps.indices(len(video), video.fps(), video.times()))
    picks = np.random.default_rng(0).choice(samples, size=min(16, len(samples)), replace=False)
    return {
        "16 segments": lambda d: read_distinct(path, Sampling(num_frames=16), "auto", d)[0].numpy(),
        f"1 fps <= 129 ({len(samples)} frames)": lambda d: read_distinct(path, fps, "auto", d)[0].numpy(),
        f"scattered ({len(picks)} frames, one at a time)": lambda d: scattered(path, d, picks),
    }


def measure(fn, repeat: int) -> tuple[np.ndarray, float, float]:
    """``(result, best CPU seconds, best wall seconds)`` over ``repeat`` runs."""
    cpu = wall = float("inf")
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
    return out, cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-list", help="a file of video paths, one per line (default: made long videos)")
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the 640x360 made video")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (the best is kept)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # preprocessing on one thread, as in one decoding worker
    with tempfile.TemporaryDirectory() as tmp:
        if args.video_list:
            videos = [line.strip() for line in open(args.video_list) if line.strip()]
        else:
            clips = sorted(glob.glob(os.path.join(REAL, "**", "*.mp4"), recursive=True))
            if not clips:
                sys.exit(f"no clips in {REAL}: pass --video-list FILE")
            source = next((c for c in clips if "skateboarding" in c), clips[0])
            start = time.perf_counter()
            videos = [make_long_video(source, os.path.join(tmp, "long_640x360.mp4"), args.seconds, (640, 360)),
                      make_long_video(source, os.path.join(tmp, "long_1280x720.mp4"), args.seconds / 4, (1280, 720))]
            print(f"made {len(videos)} videos from {os.path.relpath(source, REAL)} "
                  f"in {time.perf_counter() - start:.0f} s")
        print(f"decoders: {', '.join(sorted(DECODERS))}; one thread; best of {args.repeat}")
        for path in videos:
            video = open_video(path)
            print(f"\n{os.path.basename(path)}: {len(video)} frames, {video.fps():.2f} fps, "
                  f"{len(video.keyframes())} keyframes")
            for label, fn in patterns(path).items():
                reference, base_cpu, base_wall = None, None, None
                for decoder in ["decord", *sorted(set(DECODERS) - {"decord"})]:
                    frames, cpu, wall = measure(lambda fn=fn, d=decoder: fn(d), args.repeat)
                    if reference is None:
                        reference, base_cpu, base_wall = frames, cpu, wall
                    same = frames.shape == reference.shape and np.array_equal(frames, reference)
                    diff = "equal to decord's" if same else (
                        f"differ: max |diff| {int(np.abs(frames.astype(int) - reference.astype(int)).max())}"
                        if frames.shape == reference.shape else f"differ: shape {frames.shape}")
                    print(f"  {label:<38} {decoder:<10} {len(frames) / cpu:7.1f} frames/CPU-s "
                          f"{len(frames) / wall:7.1f} frames/s  (x{base_cpu / cpu:.2f} CPU, "
                          f"x{base_wall / wall:.2f} wall vs decord)  frames {diff}")


if __name__ == "__main__":
    main()
