"""Which source frames to read. Indices are 0-based frame numbers of the decoded stream."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# Most frames sampled per video: 4096 uint8 224x224 crops are 0.6 GB held per video in flight (per decoding
# worker, and again when batched); 68 minutes at 1 fps. The papers sample 16 to 129.
MAX_SAMPLES = 4096
MIN_FPS, MAX_FPS = 0.001, 1000.0  # one frame per 1000 s .. above any source frame rate (beyond it, repeats)


@dataclass(frozen=True)
class Sampling:
    """``num_frames`` uniform segments (centre of each, as TSN/AR-Net at test time), or ``fps``
    frames per second capped at ``max_frames`` (evenly thinned), as LiteEval reads FCVID. At most
    ``MAX_SAMPLES`` frames per video: a larger ``num_frames`` or ``max_frames`` is refused, and so is
    a video that uncapped ``fps`` sampling would take more frames of."""

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self):
        if self.max_frames is not None and self.fps is None:
            raise ConfigError("--max-frames caps what --fps samples: give it with --fps (--num-frames sets the "
                             "frame count itself)")
        if (self.num_frames is None) == (self.fps is None):
            raise ConfigError("give exactly one of --num-frames and --fps")
        if self.fps is not None and not MIN_FPS <= self.fps <= MAX_FPS:  # NaN too
            raise ConfigError(f"--fps must be {MIN_FPS:g}..{MAX_FPS:g} frames per second, not {self.fps:g}")
        for option, value in (("--num-frames", self.num_frames), ("--max-frames", self.max_frames)):
            if value is not None and not 0 < value <= MAX_SAMPLES:
                raise ConfigError(f"{option} must be 1..{MAX_SAMPLES} (the frames of one video are held in "
                                 f"memory together), not {value}")

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

    def indices(self, n: int, video_fps: float, times: np.ndarray | None = None) -> np.ndarray:
        """Frame indices for a video of ``n`` frames at ``video_fps``; short videos repeat frames.

        ``times`` (``(n + 1,)`` seconds, increasing: frame ``i`` is shown from ``times[i]`` to
        ``times[i + 1]``) makes fps sampling follow a variable frame rate: sample ``k`` is the frame
        shown ``(k + 0.5) / fps`` s after the start. On a constant rate (every frame within half a frame
        of ``i / video_fps``) it changes nothing. Raises ValueError past ``MAX_SAMPLES`` frames.
        """
        if n <= 0:
            raise ValueError("video has no frames")
        if self.num_frames is not None:
            tick = n / self.num_frames
            return np.array([int(tick / 2.0 + tick * i) for i in range(self.num_frames)], dtype=np.int64)
        by_time = times is not None and not _constant_rate(times, video_fps)
        if not by_time:
            step = video_fps / self.fps  # source frames per sample
            count = max(1, math.ceil(n / step))
        else:
            count = max(1, math.ceil((times[-1] - times[0]) * self.fps))
        if self.max_frames and count > self.max_frames:
            k = np.linspace(0, count - 1, self.max_frames).round().astype(np.int64)  # evenly thinned
        elif count > MAX_SAMPLES:
            raise ValueError(f"--fps {self.fps:g} takes {count} frames of this {count / self.fps:.0f} s video, "
                             f"more than {MAX_SAMPLES}: pass --max-frames")
        else:
            k = np.arange(count)
        if not by_time:
            return np.minimum(((k + 0.5) * step).astype(np.int64), n - 1)
        at = times[0] + (k + 0.5) / self.fps  # the frame shown at each sample's time
        return np.clip(np.searchsorted(times[:-1], at, side="right") - 1, 0, n - 1).astype(np.int64)


def _constant_rate(times: np.ndarray, video_fps: float) -> bool:
    """Whether every frame starts within half a frame of ``i / video_fps`` after the first."""
    if not (math.isfinite(video_fps) and video_fps > 0):
        return False
    grid = np.arange(len(times) - 1) / video_fps
    return bool(np.all(np.abs(times[:-1] - times[0] - grid) <= 0.5 / video_fps))
