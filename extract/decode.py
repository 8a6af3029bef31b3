"""Decode the sampled frames of one video and preprocess them once for every backbone.

Decoders (``DECODERS``, ``--decoder``): ``decord`` (one thread), ``pyav`` (the ``av`` wheel's
FFmpeg, one thread) and ``torchcodec`` (PyTorch's decoder on the system's FFmpeg 4-8, one thread;
an optional extra); ``auto`` (:func:`resolve_decoder`) takes the fastest that can run here. All find
frames by index in presentation order, over the frames that exist in the file (never a header's
count), and return the same frames in our tests; their RGB conversions may differ in the last bits,
so a cache records its decoder.

Preprocessing: resize the short side to 256 (bilinear, antialiased), centre-crop 224, keep uint8
``(T, 3, 224, 224)``. Lower resolutions (168/112/84) are resized from that same crop later, on the
compute device, by :func:`resize_crop` (antialiased bilinear by default; nearest neighbour as
AR-Net's code); normalisation is per backbone.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from bisect import bisect_right
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .errors import ConfigError
from .sampling import Sampling

SHORT_SIDE = 256
CROP = 224
SEEK_MODES = ("auto", "exact", "pass", "keyframe")
# Decoding cost of one seek (flush + demuxer seek), in frames decoded; measured by bench/extract.py.
SEEK_COST_FRAMES = 12
MAX_WORKERS = 16  # decoding processes per rank: what the README's GPU estimates assume


def default_workers() -> int:
    """Decoding processes per rank when none are asked for: the cores this process may run on
    (``os.sched_getaffinity``) shared among the node's ranks (``LOCAL_WORLD_SIZE``, set by torchrun;
    1 otherwise), less one for the main process; at least 1, at most ``MAX_WORKERS``."""
    cores = len(os.sched_getaffinity(0))
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_WORKERS, cores // ranks - 1))


class VideoError(RuntimeError):
    """A video that cannot be used; the message is the reason recorded in ``/failed``."""


class Video(Protocol):
    """One opened video, as every decoder serves it: its frames in presentation order, indexed from
    0, their timestamps and keyframes, and the frames themselves as uint8 RGB ``(K, H, W, 3)``."""

    def __len__(self) -> int: ...

    def fps(self) -> float:
        """The container's average frame rate."""

    def times(self) -> np.ndarray:
        """``(n + 1,)`` float64 seconds: frame ``i`` is shown from ``times[i]`` to ``times[i + 1]``."""

    def keyframes(self) -> list[int]:
        """The indices of the keyframes, sorted."""

    def frames(self, targets: list[int]) -> np.ndarray:
        """The frames ``targets`` (sorted, distinct; a few at a time: the caller bounds memory)."""

    def sequential(self, targets: list[int]) -> Iterator[np.ndarray]:
        """Each frame of ``targets`` (sorted, distinct), ``(H, W, 3)``, in one pass from the start."""


class DecordVideo:
    """decord's ``VideoReader`` on one thread (decord 0.6 bundles its own FFmpeg). Its length is the
    frames of its own packet index, never more: ``len(VideoReader)`` is the header's count, which
    can over-report, and decord asked for a frame past the real end loops forever (dmlc/decord#373)."""

    def __init__(self, path: str):
        import decord
        from decord.video_reader import _CAPI_VideoReaderGetFramePTS  # what get_frame_timestamp reads

        self.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.spans = _CAPI_VideoReaderGetFramePTS(self.reader._handle).asnumpy().astype(np.float64)
        self.spans = self.spans[:len(self.reader)]

    def __len__(self) -> int:
        return len(self.spans)

    def fps(self) -> float:
        return float(self.reader.get_avg_fps())

    def times(self) -> np.ndarray:
        return np.append(self.spans[:, 0], self.spans[-1, 1])

    def keyframes(self) -> list[int]:
        return sorted(int(k) for k in self.reader.get_key_indices())

    def frames(self, targets: list[int]) -> np.ndarray:
        return self.reader.get_batch(list(targets)).asnumpy()

    def sequential(self, targets: list[int]) -> Iterator[np.ndarray]:
        self.reader.seek(0)
        pos = 0
        for t in targets:
            if t > pos:
                self.reader.skip_frames(int(t - pos))
            yield self.reader.next().asnumpy()
            pos = int(t) + 1


class PacketIndex:
    """A video stream's frames as its packets list them, read once without decoding (PyAV's demuxer):
    ``pts`` and ``durations`` (stream time base units) in presentation order, ``keyframes``
    (indices), ``base`` (seconds per unit). Its length is the frames that exist in the file,
    never the header's count (which can over-report: a decoder asked for a frame past the real
    end can loop forever)."""

    def __init__(self, path: str):
        import av

        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            packets = sorted((p.pts, p.duration or 0, p.is_keyframe) for p in container.demux(stream)
                             if p.size and p.pts is not None)
            self.base = float(stream.time_base)
            self.rate = float(stream.average_rate) if stream.average_rate else 0.0
        if not packets:
            raise ValueError("no video frames")
        self.pts = np.array([p[0] for p in packets], dtype=np.int64)
        self.durations = np.array([p[1] for p in packets], dtype=np.int64)
        self.keyframes = [i for i, p in enumerate(packets) if p[2]] or [0]

    def times(self) -> np.ndarray:
        return np.append(self.pts, self.pts[-1] + self.durations[-1]).astype(np.float64) * self.base

    def fps(self) -> float:
        return self.rate or len(self.pts) / max(self.times()[-1] - self.times()[0], 1e-9)


class Indexed:
    """What a decoder over a :class:`PacketIndex` (``self.index``) serves from the index itself."""

    index: PacketIndex

    def __len__(self) -> int:
        return len(self.index.pts)

    def fps(self) -> float:
        return self.index.fps()

    def times(self) -> np.ndarray:
        return self.index.times()

    def keyframes(self) -> list[int]:
        return self.index.keyframes


class PyAVVideo(Indexed):
    """PyAV (FFmpeg's libraries bundled with the ``av`` wheel) on one thread, over a
    :class:`PacketIndex`: a frame is found by its timestamp, decoding forward from the keyframe
    before it (from the position reached, when the next target is in the same group of pictures)."""

    def __init__(self, path: str):
        import av

        self.index = PacketIndex(path)
        self.container = av.open(path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "SLICE"
        self.stream.codec_context.thread_count = 1
        self.decoded = None  # the decoding generator, and the index of the last frame it gave
        self.position = -1

    def _frame_at(self, target: int) -> np.ndarray:
        keyframes = self.index.keyframes
        key = keyframes[max(0, bisect_right(keyframes, target) - 1)]
        if self.decoded is None or not key <= self.position < target:
            self.container.seek(int(self.index.pts[key]), stream=self.stream, backward=True, any_frame=False)
            self.decoded, self.position = self.container.decode(self.stream), -1
        want = self.index.pts[target]
        for frame in self.decoded:
            if frame.pts is None or frame.pts < want:
                continue
            if frame.pts > want:  # the decoder skipped it (a damaged packet): never another frame instead
                raise ValueError(f"frame {target} could not be decoded")
            self.position = target
            return frame.to_ndarray(format="rgb24")
        raise ValueError(f"frame {target} could not be decoded (the stream ended first)")

    def frames(self, targets: list[int]) -> np.ndarray:
        return np.stack([self._frame_at(int(t)) for t in targets])

    def sequential(self, targets: list[int]) -> Iterator[np.ndarray]:
        for t in targets:
            yield self._frame_at(int(t))


FFMPEG_MISSING = ("torchcodec needs FFmpeg's shared libraries (versions 4 to 8): install them "
                  "(Debian/Ubuntu: apt-get install ffmpeg; conda: conda install -c conda-forge ffmpeg), "
                  "or choose --decoder decord or pyav")


def torchcodec_problem() -> str:
    """Why ``--decoder torchcodec`` cannot run here, in one line; "" when it can."""
    try:
        from torchcodec._core import get_ffmpeg_library_versions

        get_ffmpeg_library_versions()  # loads FFmpeg's libraries (torchcodec 0.17 defers it): fails without them
    except ImportError as err:
        if "torchcodec" in str(err) and "No module" in str(err):
            return "torchcodec is not installed: pip install -e '.[torchcodec]' (it needs FFmpeg 4-8 too)"
        return FFMPEG_MISSING
    except (OSError, RuntimeError):
        return FFMPEG_MISSING
    return ""


class TorchcodecVideo(Indexed):
    """torchcodec's ``VideoDecoder`` (PyTorch's decoder, on the system's FFmpeg) on one thread, over a
    :class:`PacketIndex` given to it as its frame mappings: frame ``i`` is the one PyAV's index names,
    found by torchcodec's exact seeking (``get_frames_at``)."""

    def __init__(self, path: str):
        problem = torchcodec_problem()
        if problem:
            raise ConfigError(problem)
        self.path, self.index, self.decoder = path, PacketIndex(path), None

    def _decoder(self):
        """torchcodec's decoder, opened at the first read (after :func:`open_video`'s checks)."""
        if self.decoder is None:
            from torchcodec.decoders import VideoDecoder

            keys = set(self.index.keyframes)
            mappings = {"frames": [{"pts": int(p), "duration": int(d), "key_frame": int(i in keys)} for i, (p, d)
                                   in enumerate(zip(self.index.pts, self.index.durations, strict=True))]}
            self.decoder = VideoDecoder(self.path, num_ffmpeg_threads=1, dimension_order="NHWC", device="cpu",
                                        custom_frame_mappings=json.dumps(mappings))
        return self.decoder

    def frames(self, targets: list[int]) -> np.ndarray:
        return self._decoder().get_frames_at(list(targets)).data.numpy()

    def sequential(self, targets: list[int]) -> Iterator[np.ndarray]:
        for start in range(0, len(targets), 8):  # torchcodec decodes forward within a GOP itself
            yield from self.frames(targets[start:start + 8])


DECODERS: dict[str, Callable[[str], Video]] = {"decord": DecordVideo, "pyav": PyAVVideo, "torchcodec": TorchcodecVideo}


def decoder_version(name: str) -> str:
    """``name`` and its package's version, as the cache records it (``decord 0.6.0``; torchcodec
    with the system FFmpeg it decodes with: ``torchcodec 0.17.0 (FFmpeg 5.1.9)``)."""
    version = f"{name} {importlib.metadata.version('av' if name == 'pyav' else name)}"
    if name == "torchcodec":
        from torchcodec._core import get_ffmpeg_library_versions

        version += f" (FFmpeg {get_ffmpeg_library_versions()['ffmpeg_version'].split('-')[0]})"
    return version


# ``auto``'s order: the fastest per core first, as bench/decode.py measured on sampled reads (16 segments,
# 1 fps, scattered) of long H.264 videos (docs/benchmarks.md: torchcodec 1.02-1.25x, PyAV 1.01-1.18x decord's
# frames per CPU-second, frames identical); the first that can run here is taken.
AUTO = ("torchcodec", "pyav", "decord")


def decoder_problem(name: str) -> str:
    """Why decoder ``name`` cannot run here, in one line; "" when it can."""
    return torchcodec_problem() if name == "torchcodec" else ""


def check_decoder(name: str) -> None:
    """Refuse, in one line, a decoder name that is not a key of ``DECODERS`` or ``auto``, or one that
    cannot run here (torchcodec without FFmpeg's libraries: what to install)."""
    if name != "auto" and name not in DECODERS:
        raise ConfigError(f"decoder={name!r}: decoder must be auto or one of {', '.join(sorted(DECODERS))}")
    problem = decoder_problem(name) if name != "auto" else ""
    if problem:
        raise ConfigError(f"--decoder {name}: {problem}")


def resolve_decoder(name: str, recorded: str = "") -> str:
    """The decoder to use for ``name``: itself (checked by :func:`check_decoder`), or for ``auto`` the
    one a cache ``recorded`` when it can run here (a cache is never decoded by two), else the first of
    ``AUTO`` that can."""
    check_decoder(name)
    if name != "auto":
        return name
    if recorded in DECODERS and not decoder_problem(recorded):
        return recorded
    return next(d for d in AUTO if not decoder_problem(d))


def open_video(path: str, decoder: str = "decord") -> Video:
    """``path`` opened with ``decoder`` (a key of ``DECODERS``, or ``auto``: :func:`resolve_decoder`),
    or :class:`VideoError` saying what is wrong. Frame timestamps must increase: frames are found by
    time, and a decoder returns repeated frames otherwise."""
    decoder = resolve_decoder(decoder)
    if not os.path.isfile(path):
        raise VideoError(f"file not found: {path}")
    if os.path.getsize(path) == 0:
        raise VideoError("zero-byte file")
    try:
        video = DECODERS[decoder](path)
    except Exception as err:  # the decoders raise their own errors with FFmpeg's words
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise VideoError(f"cannot open video stream ({reason})") from None
    if len(video) == 0:
        raise VideoError("no video frames")
    try:
        starts = video.times()[:-1]
    except Exception as err:
        raise decoding_failed(err) from None
    stuck = np.flatnonzero(np.diff(starts) <= 0)
    if len(stuck):
        raise VideoError(f"frame timestamps do not increase ({len(stuck)} of {len(starts) - 1} steps stand still or go "
                         f"back, the first after frame {stuck[0]}): frames cannot be found by time, the decoder "
                         "would return repeated ones; re-encode the file")
    return video


def seek_cost(targets: np.ndarray, keyframes: list[int]) -> int:
    """Frames decoded when seeking to each sorted target: decord jumps to the target's keyframe
    unless it can decode forward from the previous target inside the same GOP."""
    cost, pos = 0, -1
    for t in targets:
        key = keyframes[max(0, bisect_right(keyframes, t) - 1)] if keyframes else 0
        if key <= pos < t:
            cost += t - pos
        else:
            cost += t - key + 1 + SEEK_COST_FRAMES
        pos = t
    return int(cost)


def choose_strategy(targets: np.ndarray, keyframes: list[int]) -> str:
    """``exact`` (seek to each sample) or ``pass`` (one sequential pass), whichever decodes less."""
    return "pass" if int(targets[-1]) + 1 <= seek_cost(targets, keyframes) else "exact"


def short_side(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 RGB -> ``(T, 3, H', W')`` uint8 with the short side resized to 256 (antialiased)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    return x if min(x.shape[-2:]) == SHORT_SIDE else TF.resize(x, [SHORT_SIDE], antialias=True)


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 RGB -> ``(T, 3, 224, 224)`` uint8: short side 256, centre crop 224."""
    return TF.center_crop(short_side(frames), [CROP, CROP]).contiguous()


def _nearest(keyframes: list[int], t: int) -> int:
    i = bisect_right(keyframes, t)
    candidates = keyframes[max(0, i - 1): i + 1]
    return min(candidates, key=lambda k: (abs(k - t), k))


def sample_indices(video: Video, sampling: Sampling) -> np.ndarray:
    """``sampling``'s frame indices in ``video`` (see :meth:`Sampling.indices`: by the container's
    timestamps where the frame rate varies), or :class:`VideoError` saying why not."""
    try:
        return sampling.indices(len(video), video.fps(), video.times())
    except ValueError as err:
        raise VideoError(f"cannot sample it: {err}") from None


def read_frames(path: str, sampling: Sampling, seek: str = "auto", decoder: str = "decord"
                ) -> tuple[torch.Tensor, np.ndarray, str]:
    """Decode and preprocess the sampled frames of ``path``.

    Returns ``(frames (T, 3, 224, 224) uint8, source indices (T,), strategy used)``; a repeated frame
    is decoded once (:func:`read_distinct`) and copied here.
    """
    crops, indices, rows, strategy = read_distinct(path, sampling, seek, decoder)
    return crops[rows], indices, strategy


def read_distinct(path: str, sampling: Sampling, seek: str = "auto", decoder: str = "decord"
                  ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, str]:
    """Decode and preprocess each distinct sampled frame of ``path`` once.

    Returns ``(crops (U, 3, 224, 224) uint8 of the distinct frames in frame order, source indices (T,)
    as :func:`sample_indices` gives them, rows (T,): the crop of each sample, strategy used)``. ``seek``
    is ``auto`` (cheaper of ``exact`` and ``pass``), ``exact``, ``pass`` or ``keyframe`` (each sample
    moved to its nearest keyframe: faster, inexact; the indices returned are the frames read);
    ``decoder`` a key of ``DECODERS``. Raises :class:`VideoError` for a video that cannot be sampled
    or decoded.
    """
    video = open_video(path, decoder)
    try:
        indices = sample_indices(video, sampling)
        keyframes = video.keyframes()
        if seek == "keyframe" and keyframes:
            indices = np.array([_nearest(keyframes, int(t)) for t in indices], dtype=np.int64)
        targets = np.unique(indices)
        strategy = choose_strategy(targets, keyframes) if seek == "auto" else seek
        decoded = []
        if strategy == "pass":
            raw = []
            for frame in video.sequential(targets.tolist()):
                raw.append(frame)
                if len(raw) == 8:
                    decoded.append(preprocess(np.stack(raw)))
                    raw = []
            if raw:
                decoded.append(preprocess(np.stack(raw)))
        else:
            for start in range(0, len(targets), 8):  # 8 frames at a time: bounded memory for 4K sources
                decoded.append(preprocess(video.frames(targets[start:start + 8].tolist())))
    except VideoError:
        raise
    except Exception as err:
        raise decoding_failed(err) from None
    crops = torch.cat(decoded)
    if len(crops) != len(targets):  # never a shorter clip than asked for, silently
        raise VideoError(f"decoding failed (the decoder gave {len(crops)} of the {len(targets)} frames asked for)")
    return crops, indices, np.searchsorted(targets, indices), strategy


def decoding_failed(err: Exception) -> VideoError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return VideoError(f"decoding failed ({reason})")


def frames_at(video: Video, indices: np.ndarray, transform: Callable[[np.ndarray], torch.Tensor] = preprocess
              ) -> torch.Tensor:
    """``transform`` (default :func:`preprocess`) of the frames ``indices`` of ``video`` (any order,
    repeats allowed), each distinct frame decoded once, 8 at a time (bounded memory for 4K
    sources); a decoder's error becomes :class:`VideoError`."""
    indices = np.asarray(indices, dtype=np.int64)
    targets = np.unique(indices)
    try:
        parts = [transform(video.frames(targets[s:s + 8].tolist())) for s in range(0, len(targets), 8)]
    except Exception as err:
        raise decoding_failed(err) from None
    return torch.cat(parts)[np.searchsorted(targets, indices)]


def read_resized(path: str, choose: Callable[[int], np.ndarray], decoder: str = "decord") -> torch.Tensor:
    """The frames ``choose(n)`` of a video of ``n`` frames (any order, repeats allowed), short side
    resized to 256 (antialiased), not cropped: ``(K, 3, H, W)`` uint8. For training crops;
    extraction uses :func:`read_frames`."""
    video = open_video(path, decoder)
    return frames_at(video, choose(len(video)), short_side)


DOWNSAMPLE = {"antialias": "antialiased bilinear resize of the 224 crop",
              "nearest": "nearest-neighbour resize of the 224 crop (AR-Net's code)"}


@functools.cache
def normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A backbone's ``(mean, std)`` as float32 ``(1, 3, 1, 1)`` tensors on ``device``, built once per
    distinct triple: ``(x - mean) / std`` of frames in [0, 1]."""
    return torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)


def resize_crop(crops: torch.Tensor, resolution: int, downsample: str = "antialias",
                interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 ``(B, 3, 224, 224)`` crops -> float ``(B, 3, r, r)`` in [0, 1], resized as ``downsample``
    says (a key of ``DOWNSAMPLE``): ``antialias`` with the backbone's ``interpolation`` (bilinear, or
    bicubic for most timm models, clamped to [0, 1])."""
    x = crops.float().div_(255)
    if resolution != crops.shape[-1]:
        if downsample == "nearest":
            x = F.interpolate(x, size=(resolution, resolution), mode="nearest")
        else:
            x = F.interpolate(x, size=(resolution, resolution), mode=interpolation, antialias=True,
                              align_corners=False)
            if interpolation == "bicubic":
                x = x.clamp_(0, 1)  # bicubic overshoots
    return x
