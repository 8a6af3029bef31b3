"""Which source frames to read. Indices are 0-based frame numbers of the decoded stream."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """``num_frames`` uniform segments (centre of each, as TSN/AR-Net at test time), or ``fps``
    frames per second capped at ``max_frames`` (evenly thinned), as LiteEval reads FCVID."""

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self):
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("give exactly one of --num-frames and --fps")
        if self.num_frames is not None and self.num_frames <= 0 or self.fps is not None and self.fps <= 0:
            raise ValueError("--num-frames and --fps must be positive")

    @property
    def tag(self) -> str:
        """Short name used in default cache file names: ``t16``, ``fps1``, ``fps1-max129``."""
        if self.num_frames is not None:
            return f"t{self.num_frames}"
        return f"fps{self.fps:g}" + (f"-max{self.max_frames}" if self.max_frames else "")

    @property
    def max_length(self) -> int | None:
        """Frames per video known in advance (``None`` for uncapped fps sampling)."""
        return self.num_frames if self.num_frames is not None else self.max_frames

    def indices(self, n: int, video_fps: float) -> np.ndarray:
        """Frame indices for a video of ``n`` frames at ``video_fps``; short videos repeat frames."""
        if n <= 0:
            raise ValueError("video has no frames")
        if self.num_frames is not None:
            tick = n / self.num_frames
            return np.array([int(tick / 2.0 + tick * i) for i in range(self.num_frames)], dtype=np.int64)
        step = video_fps / self.fps  # source frames per sample
        count = max(1, math.ceil(n / step))
        idx = np.minimum(((np.arange(count) + 0.5) * step).astype(np.int64), n - 1)
        if self.max_frames and count > self.max_frames:
            idx = idx[np.linspace(0, count - 1, self.max_frames).round().astype(np.int64)]
        return idx
