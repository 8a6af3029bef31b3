"""The synthetic ``demo`` dataset: real H.264 files, deterministic from a seed, cheap to make.

It carries the papers' premise. Every video is mostly redundant frames of a drifting background
shared by all classes; the class object shows up only in short bursts at random positions. Four
classes are obvious at a glance (a coloured shape, visible at any resolution). Six classes come
in pairs that share the coloured shape and differ only in a 1-pixel luminance texture: visible at
224 px, averaged away by any antialiased resize to 112 px or below (and faint at 168 px).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

import numpy as np

from .datasets import AnnotationError, Annotations, parse_label_lists, read_class_list, register_dataset
from .locks import exclusive

# name -> (shape, RGB colour, 1-px texture or None)
CLASSES: dict[str, tuple[str, tuple[int, int, int], str | None]] = {
    "red_disc": ("disc", (200, 40, 40), None),
    "green_square": ("square", (40, 180, 60), None),
    "blue_disc": ("disc", (40, 70, 200), None),
    "yellow_square": ("square", (210, 200, 40), None),
    "gray_disc_hlines": ("disc", (128, 128, 128), "hlines"),
    "gray_disc_vlines": ("disc", (128, 128, 128), "vlines"),
    "magenta_square_hlines": ("square", (180, 60, 170), "hlines"),
    "magenta_square_checker": ("square", (180, 60, 170), "checker"),
    "cyan_disc_vlines": ("disc", (50, 170, 180), "vlines"),
    "cyan_disc_checker": ("disc", (50, 170, 180), "checker"),
}
SIZE = 256  # short side 256: the 224 crop sees the textures without resampling
FPS = 12


def annotation_files(root: str) -> tuple[list[str], str]:
    """The generator's list files (train, test) and class list under ``root``."""
    lists = [os.path.join(root, f"{split}.txt") for split in ("train", "test")]
    classes = os.path.join(root, "classes.txt")
    if not all(os.path.isfile(p) for p in lists + [classes]):
        raise AnnotationError(f"no demo dataset in {root}: run `extract-features --dataset demo`, which generates it")
    return lists, classes


def _texture(kind: str, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    pattern = {"hlines": y % 2, "vlines": x % 2, "checker": (x + y) % 2}[kind]
    return pattern.astype(np.float32) * 2 - 1  # +-1, mean 0: it vanishes when averaged


def _background(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Slowly drifting low-contrast blobs and gradient, identical in kind for every class."""
    axis = np.arange(SIZE, dtype=np.float32)
    base = rng.uniform(60, 110, size=3).astype(np.float32)
    blobs = [(rng.uniform(0, SIZE, 2), rng.uniform(-1.5, 1.5, 2), rng.uniform(25, 60), rng.uniform(-30, 30))
             for _ in range(4)]
    video = np.empty((frames, SIZE, SIZE, 3), np.float32)
    for t in range(frames):
        light = np.broadcast_to(20 * axis / SIZE, (SIZE, SIZE)).copy()
        for centre, velocity, radius, amplitude in blobs:  # a gaussian blob is an outer product
            cy, cx = centre + velocity * t
            light += amplitude * np.outer(np.exp(-((axis - cy) ** 2) / (2 * radius**2)),
                                          np.exp(-((axis - cx) ** 2) / (2 * radius**2)))
        video[t] = base + light[..., None]
    return video


def _render_video(rng: np.random.Generator, label: int, frames: int) -> np.ndarray:
    shape, colour, texture = list(CLASSES.values())[label]
    video = _background(rng, frames)
    burst = max(4, frames // 8)
    starts = rng.choice(np.arange(0, frames - burst), size=2, replace=False)
    radius = int(rng.integers(34, 48))
    cy, cx = (int(v) for v in rng.integers(16 + radius, SIZE - 16 - radius, size=2))  # inside the 224 crop
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if shape == "disc":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    else:
        mask = (abs(y - cy) <= radius * 0.85) & (abs(x - cx) <= radius * 0.85)
    fill = np.array(colour, np.float32) + rng.normal(0, 8, size=3)
    if texture:
        fill = fill + rng.uniform(45, 60) * _texture(texture, SIZE, SIZE)[..., None]
    else:
        fill = np.broadcast_to(fill, (SIZE, SIZE, 3))
    for start in starts:
        for t in range(start, start + burst):
            video[t][mask] = fill[mask]
    video += rng.standard_normal(size=video.shape, dtype=np.float32) * 3
    return np.clip(video, 0, 255).astype(np.uint8)


def write_video(path: str, frames: Iterable[np.ndarray], fps: int = FPS, gop: int = 24, codec: str = "libx264") -> None:
    """Encode ``frames`` (H x W x 3 uint8 RGB each) near-losslessly, a keyframe every ``gop``
    frames, one thread, deterministic."""
    import av

    tmp = f"{path}.{os.getpid()}.tmp.mp4"  # one per process: another may write the same file at once
    with av.open(tmp, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast", "g": str(gop)}
        for number, frame in enumerate(frames):
            if number == 0:
                stream.width, stream.height = frame.shape[1], frame.shape[0]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _make_video(job: tuple[str, int, int, int, int]) -> None:
    """Render and write one demo video: ``(path, seed, index, label, frames)``."""
    path, seed, i, label, frames = job
    write_video(path, _render_video(np.random.default_rng([seed, i]), label, frames))


def check_seed(root: str, seed: int) -> None:
    """Refuse a demo under ``root`` made with another seed (``seed.txt``; a demo without it is seed 0)."""
    marker = os.path.join(root, "seed.txt")
    if os.path.isfile(marker):
        with open(marker) as f:
            held = int(f.read())
    elif os.path.isfile(os.path.join(root, "classes.txt")):
        held = 0  # made before the seed was recorded
    else:
        return  # no demo there yet
    if held != seed:
        raise AnnotationError(f"{root} holds the demo of seed {held}, not {seed}: pass another --video-root")


def ensure_demo(root: str, seed: int, progress: bool = True) -> None:
    """The demo of ``seed`` in ``root``: generated there the first time (one line on stderr says so),
    refused (:class:`AnnotationError`) when ``root`` holds another seed's. Processes that start at once
    (torchrun's ranks, two runs) take turns on an exclusive lock (``root/.lock``): the first generates,
    the others wait for it and then find the demo made."""
    os.makedirs(root, exist_ok=True)
    with exclusive(os.path.join(root, ".lock"), root, wait=True):
        check_seed(root, seed)
        if not os.path.isfile(os.path.join(root, "classes.txt")):
            print(f"generating the demo dataset (seed {seed}) in {root}", file=sys.stderr)
            generate_demo(root, seed=seed, progress=progress)


@register_dataset("demo", needs_annotations=False, video_root="demo", prepare=ensure_demo)
def parse_demo(paths: list[str], root: str, classes: str | None) -> Annotations:
    """The synthetic demo: mmaction2-style lists written by its generator."""
    lists, class_file = annotation_files(root)
    return parse_label_lists(paths or lists, root, read_class_list(classes or class_file), "space")


def generate_demo(root: str, *, seed: int = 0, videos_per_class: int = 24, frames: int = 48,
                  test_fraction: float = 0.25, progress: bool = True) -> None:
    """Write the demo under ``root``: ``videos/*.mp4``, ``train.txt``, ``test.txt``, ``classes.txt``.

    Video ``i`` depends only on ``(seed, i)``, so the videos are made by one thread per core (NumPy
    and FFmpeg release the GIL: 1.8x on 2 cores), in any order; the list files are written last, so
    a half-made demo is regenerated rather than used.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    check_seed(root, seed)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    with open(os.path.join(root, "seed.txt"), "w") as f:
        f.write(f"{seed}\n")
    names = list(CLASSES)
    n_test = max(1, round(videos_per_class * test_fraction))
    lines: dict[str, list[str]] = {"train": [], "test": []}
    jobs = [(label, k) for label in range(len(names)) for k in range(videos_per_class)]
    todo = []
    for i, (label, k) in enumerate(jobs):
        rel = f"videos/{names[label]}_{k:03d}.mp4"
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            todo.append((path, seed, i, label, frames))
        lines["test" if k < n_test else "train"].append(f"{rel} {label}")
    workers = max(1, min(8, len(os.sched_getaffinity(0)), len(todo)))
    with ThreadPoolExecutor(workers) as pool:  # threads, not processes: nothing to re-import or fork
        for _ in tqdm(pool.map(_make_video, todo), total=len(todo), desc="demo videos", unit="video",
                      disable=not progress):
            pass
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    for split, rows in lines.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")
