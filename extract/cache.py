"""The HDF5 feature cache: its schema, the journal that makes extraction resumable, and assembly.

Schema (browse with ``h5ls -r CACHE.h5``)::

    /classes                 (C,) str          class names; index = label id
    /videos/id               (N,) str
    /videos/path             (N,) str          video file, relative to attribute video_root
    /videos/split            (N,) str          train | val | test
    /videos/labels           (N, C) uint8      multi-hot
    /videos/length           (N,) int32        real frames per video (<= T)
    /videos/frame_index      (N, T) int64      source frame of each step, -1 past `length`
    /features/<arch>@<res>   (N, T, D) float16 zero past `length`
    /flops                   table: name, resolution, gflops (GMACs/frame), params, dim
    /failed                  table: id, reason
    attrs: dataset, video_root, sampling, preprocessing, weights (JSON), version, created_by

Crash safety: the cache file is only ever replaced whole (written to ``*.tmp``, fsynced,
``os.replace``). Work in progress lives in ``<cache>.parts/``: chunk files, each itself written
atomically. A run killed at any moment leaves the previous cache and complete chunks; the next
run skips what the chunks hold and assembles everything into the cache at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import __version__
from .datasets import VideoRecord
from .flops import FlopsEntry

STR = h5py.string_dtype()
FLOPS_DTYPE = np.dtype([("name", STR), ("resolution", "<i4"), ("gflops", "<f8"), ("params", "<i8"), ("dim", "<i4")])
FAILED_DTYPE = np.dtype([("id", STR), ("reason", STR)])


class CacheMismatch(ValueError):
    """An existing cache that belongs to another dataset, sampling or weights."""


@dataclass
class VideoFeatures:
    """What extraction produced for one video (its position in the annotation list)."""

    index: int
    frame_index: np.ndarray  # (L,) int64
    features: dict[str, np.ndarray]  # name -> (L, D) float16


@dataclass
class CacheInfo:
    """What an existing cache already holds (empty when there is no cache yet)."""

    ids: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)
    flops: dict[str, FlopsEntry] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # ids in /failed


def write_atomic(path: str, fill) -> None:
    """Create HDF5 ``path`` by calling ``fill(h5file)`` on a temporary file, then rename it in place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_info(path: str, *, dataset: str, sampling: str, classes: list[str]) -> CacheInfo:
    """Read what ``path`` holds, refusing a cache made for another dataset, sampling or class list."""
    if not os.path.exists(path):
        return CacheInfo()
    with h5py.File(path, "r") as f:
        for key, want in (("dataset", dataset), ("sampling", sampling)):
            have = f.attrs.get(key)
            if have != want:
                raise CacheMismatch(f"{path} holds {key} {have}, not {want}: pass another --out")
        if [c.decode() for c in f["classes"][:]] != classes:
            raise CacheMismatch(f"{path} has another class list than these annotations: pass another --out")
        flops = {row["name"].decode(): FlopsEntry(row["name"].decode(), int(row["resolution"]), float(row["gflops"]),
                                                   int(row["params"]), int(row["dim"])) for row in f["flops"][:]}
        return CacheInfo(ids=[i.decode() for i in f["videos/id"][:]], backbones=sorted(f["features"].keys()),
                         flops=flops, weights=json.loads(f.attrs["weights"]),
                         failed=[r["id"].decode() for r in f["failed"][:]])


class Journal:
    """The chunk files of ``<cache>.parts/``; ``write`` is atomic, ``load`` sees every finished chunk."""

    def __init__(self, cache_path: str, rank: int = 0):
        self.folder = cache_path + ".parts"
        self.rank = rank
        self._seq = 0

    def write(self, done: list[VideoFeatures], failed: list[tuple[int, str]], backbones: list[str]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        length = max([len(v.frame_index) for v in done], default=0)

        def fill(f: h5py.File) -> None:
            f.attrs["backbones"] = json.dumps(backbones)
            f["index"] = np.array([v.index for v in done], dtype=np.int64)
            f["length"] = np.array([len(v.frame_index) for v in done], dtype=np.int32)
            frame_index = np.full((len(done), length), -1, dtype=np.int64)
            for row, v in enumerate(done):
                frame_index[row, : len(v.frame_index)] = v.frame_index
            f["frame_index"] = frame_index
            for name in backbones:
                dim = done[0].features[name].shape[1] if done else 0
                data = np.zeros((len(done), length, dim), dtype=np.float16)
                for row, v in enumerate(done):
                    data[row, : len(v.frame_index)] = v.features[name]
                f[f"features/{name}"] = data
            f["failed_index"] = np.array([i for i, _ in failed], dtype=np.int64)
            f["failed_reason"] = np.array([r for _, r in failed], dtype=STR)

        self._seq += 1
        write_atomic(os.path.join(self.folder, f"{time.time_ns()}-r{self.rank}-{self._seq}.h5"), fill)

    def chunks(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder) if n.endswith(".h5"))

    def load(self) -> tuple[dict[int, set[str]], dict[int, str]]:
        """``(done: video index -> backbones held, failed: video index -> reason)`` over all chunks."""
        done: dict[int, set[str]] = {}
        failed: dict[int, str] = {}
        for chunk in self.chunks():
            with h5py.File(chunk, "r") as f:
                backbones = set(json.loads(f.attrs["backbones"]))
                for i in f["index"][:]:
                    done.setdefault(int(i), set()).update(backbones)
                for i, reason in zip(f["failed_index"][:], f["failed_reason"][:]):
                    failed[int(i)] = reason.decode()
        return done, failed

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def assemble(path: str, *, videos: list[VideoRecord], classes: list[str], problems: list[tuple[str, str]],
             attrs: dict[str, str], flops: dict[str, FlopsEntry], weights: dict[str, str],
             max_length: int | None) -> tuple[int, int]:
    """Merge the existing cache at ``path`` and the journal's chunks into a new cache, atomically.

    Videos keep annotation order. A video is in ``/videos`` when it has features for every
    backbone; a video that failed in the journal is dropped from ``/videos`` and listed in
    ``/failed``. Returns ``(videos cached, videos failed)``.
    """
    journal = Journal(path)
    old = h5py.File(path, "r") if os.path.exists(path) else None
    try:
        old_rows = {i.decode(): r for r, i in enumerate(old["videos/id"][:])} if old else {}
        old_backbones = set(old["features"].keys()) if old else set()
        sources: dict[int, dict[str, tuple]] = {}  # video index -> backbone -> (h5 file, row)
        chunk_files = [h5py.File(c, "r") for c in journal.chunks()]
        failed_now: dict[int, str] = {}
        for chunk in chunk_files:
            for row, i in enumerate(chunk["index"][:]):
                for name in chunk["features"].keys():
                    sources.setdefault(int(i), {})[name] = (chunk, row)
            failed_now.update({int(i): r.decode() for i, r in zip(chunk["failed_index"][:], chunk["failed_reason"][:])})
        backbones = sorted(old_backbones | {n for s in sources.values() for n in s})
        for i, video in enumerate(videos):
            if video.id in old_rows:
                for name in old_backbones:
                    sources.setdefault(i, {}).setdefault(name, (old, old_rows[video.id]))
        keep = [i for i in sorted(sources) if i not in failed_now and set(sources[i]) >= set(backbones)]
        failures = list(problems) + [(videos[i].id, reason) for i, reason in sorted(failed_now.items())]
        failures += [(videos[i].id, "features missing for " + ", ".join(sorted(set(backbones) - set(sources[i]))))
                     for i in sorted(sources) if i not in failed_now and i not in keep]

        def length_of(i: int) -> tuple[int, np.ndarray]:
            h5, row = sources[i][backbones[0]]
            n = int(h5["length"][row] if "length" in h5 else h5["videos/length"][row])
            fi = h5["frame_index"] if "frame_index" in h5 else h5["videos/frame_index"]
            return n, fi[row, :n]

        lengths = [length_of(i) for i in keep]
        T = max_length or max([n for n, _ in lengths], default=0)

        def fill(f: h5py.File) -> None:
            f.attrs.update(attrs)
            f.attrs["weights"] = json.dumps({k: weights[k] for k in backbones}, sort_keys=True)
            f.attrs["version"] = __version__
            f["classes"] = np.array(classes, dtype=STR)
            g = f.create_group("videos")
            g["id"] = np.array([videos[i].id for i in keep], dtype=STR)
            root = attrs.get("video_root", "")
            g["path"] = np.array([os.path.relpath(videos[i].path, root) if root else videos[i].path for i in keep],
                                 dtype=STR)
            g["split"] = np.array([videos[i].split for i in keep], dtype=STR)
            labels = np.zeros((len(keep), len(classes)), dtype=np.uint8)
            for row, i in enumerate(keep):
                labels[row, list(videos[i].labels)] = 1
            g["labels"] = labels
            g["length"] = np.array([n for n, _ in lengths], dtype=np.int32)
            frame_index = np.full((len(keep), T), -1, dtype=np.int64)
            for row, (n, fi) in enumerate(lengths):
                frame_index[row, :n] = fi
            g["frame_index"] = frame_index
            feats = f.create_group("features")
            for name in backbones:
                out = feats.create_dataset(name, shape=(len(keep), T, flops[name].dim), dtype=np.float16)
                for row, i in enumerate(keep):
                    h5, src = sources[i][name]
                    n = lengths[row][0]
                    data = h5["features"][name][src, :n]
                    out[row] = np.pad(data, ((0, T - n), (0, 0)))
            f["flops"] = np.array([(n, flops[n].resolution, flops[n].gflops, flops[n].params, flops[n].dim)
                                   for n in backbones], dtype=FLOPS_DTYPE)
            f["failed"] = np.array(failures, dtype=FAILED_DTYPE)

        write_atomic(path, fill)
        for chunk in chunk_files:
            chunk.close()
    finally:
        if old is not None:
            old.close()
    journal.remove()
    return len(keep), len(failures)
