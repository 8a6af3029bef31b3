"""The HDF5 feature cache: its schema, its one reader (:class:`Cache`), its writers (:func:`assemble`
for extraction, :func:`write_cache` for synthetic caches) and the journal that makes extraction
resumable. No other module spells a path inside the cache.

Schema (browse with ``h5ls -r CACHE.h5``)::

    /classes                 (C,) str          class names; index = label id
    /videos/id               (N,) str
    /videos/path             (N,) str          video file, relative to attribute video_root
    /videos/split            (N,) str          train | val | test
    /videos/labels           (N, C) uint8      multi-hot
    /videos/length           (N,) int32        real frames per video (<= T)
    /videos/frame_index      (N, T) int64      source frame of each step, -1 past `length`
    /features/<arch>@<res>   (N, T, D) float16 zero past `length`; one chunk per video, LZF-
                                               compressed (h5py's built-in filter): the zero padding
                                               takes next to no disk, so the file grows with real
                                               frames, not with N x T
    /flops                   table: name, resolution, gflops (GMACs/frame), params, dim
    /failed                  table: id, reason
    attrs: dataset, video_root, sampling, preprocessing, weights (JSON), version, created_by

Crash safety: the cache file is only ever replaced whole (written to ``*.tmp``, fsynced,
``os.replace``). Work in progress lives in ``<cache>.parts/``: chunk files, each itself written
atomically. A run killed at any moment leaves the previous cache and complete chunks; the next
run skips what the chunks hold (also when the cache file itself is gone) and assembles everything
into the cache at the end. A chunk records the identity of its run (dataset, sampling, video list)
and the weights of each backbone, so that a run never merges work that is not its own.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, Union

import h5py
import numpy as np

from . import __version__
from .atomic import check_space, replacing, sweep
from .datasets import VideoRecord
from .errors import UserError
from .flops import FlopsEntry

STR = h5py.string_dtype()
FLOPS_DTYPE = np.dtype([("name", STR), ("resolution", "<i4"), ("gflops", "<f8"), ("params", "<i8"), ("dim", "<i4")])
FAILED_DTYPE = np.dtype([("id", STR), ("reason", STR)])
BLOCK_BYTES = 256 << 20  # assembly writes each backbone's features in blocks of rows of about this size


class CacheMismatch(UserError, ValueError):
    """An existing cache that belongs to another dataset, sampling or weights."""


class Cache:
    """Read a cache: the one reader ``policy/``, ``eval/``, ``bench/`` and the tests use. Per-video
    arrays are read on first use; features stay on disk until :meth:`features` is read."""

    def __init__(self, path: str):
        self.path = path
        self.file = h5py.File(path, "r")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attr(self, key: str, default: str = "") -> str:
        return self.file.attrs.get(key, default)

    @property
    def dataset(self) -> str:
        return self.attr("dataset", "?")

    @property
    def video_root(self) -> str:
        return self.attr("video_root")

    @cached_property
    def sampling(self) -> dict:
        return json.loads(self.attr("sampling", "{}"))

    @cached_property
    def preprocessing(self) -> dict:
        return json.loads(self.attr("preprocessing", "{}"))

    @property
    def decoder(self) -> str:
        """The decoder the frames were read with (a key of ``extract.decode.DECODERS``; a cache made
        before decoders were recorded: decord, the only one then)."""
        return self.preprocessing.get("decoder", "decord").split()[0]

    @cached_property
    def weights(self) -> dict[str, str]:
        """Backbone name -> identity of the weights its features were computed with."""
        return json.loads(self.attr("weights", "{}"))

    @cached_property
    def classes(self) -> list[str]:
        return [c.decode() for c in self.file["classes"][:]]

    @cached_property
    def ids(self) -> list[str]:
        return [i.decode() for i in self.file["videos/id"][:]]

    @cached_property
    def split(self) -> np.ndarray:
        """(N,) str: train | val | test."""
        return np.array([s.decode() for s in self.file["videos/split"][:]])

    @cached_property
    def labels(self) -> np.ndarray:
        """(N, C) uint8 multi-hot."""
        return self.file["videos/labels"][:]

    @cached_property
    def length(self) -> np.ndarray:
        """(N,) int64 real frames per video."""
        return self.file["videos/length"][:].astype(np.int64)

    def frame_index(self, row: int) -> np.ndarray:
        """(T,) int64 source frame of each step of video ``row``, -1 past its length."""
        return self.file["videos/frame_index"][row]

    @property
    def has_paths(self) -> bool:
        return "videos/path" in self.file

    def video_path(self, row: int) -> str:
        """The video file of ``row`` (joined to the cache's ``video_root``)."""
        return os.path.join(self.video_root, self.file["videos/path"][row].decode())

    @cached_property
    def backbones(self) -> list[str]:
        """Names of the features held, sorted."""
        return sorted(self.file["features"].keys()) if "features" in self.file else []

    def features(self, name: str) -> h5py.Dataset:
        """(N, T, D) float16 features ``name``, zero past each video's length; read what you slice."""
        return self.file["features"][name]

    @cached_property
    def flops(self) -> dict[str, FlopsEntry]:
        """Backbone name -> its FLOPs-table entry (GMACs per frame)."""
        return {row["name"].decode(): FlopsEntry(row["name"].decode(), int(row["resolution"]), float(row["gflops"]),
                                                 int(row["params"]), int(row["dim"])) for row in self.file["flops"][:]}

    @cached_property
    def failed(self) -> dict[str, str]:
        """Video id -> why it is not in the cache."""
        return {r["id"].decode(): r["reason"].decode() for r in self.file["failed"][:]} if "failed" in self.file else {}


Features = Union[np.ndarray, Callable[[int, int], np.ndarray]]  # (N, T, D) array, or rows lo..hi -> (hi - lo, T, D)


def _write_layout(f: h5py.File, *, attrs: dict[str, str], weights: dict[str, str], classes: list[str], ids: list[str],
                  paths: list[str], splits: list[str], labels: np.ndarray, length: np.ndarray,
                  frame_index: np.ndarray, flops: dict[str, FlopsEntry],
                  failed: list[tuple[str, str]]) -> dict[str, h5py.Dataset]:
    """Write everything but the features' values into open file ``f``; returns the empty feature
    datasets by name (one LZF chunk per video), to be filled in blocks of rows."""
    f.attrs.update(attrs)
    f.attrs["weights"] = json.dumps(weights, sort_keys=True)
    f.attrs["version"] = __version__
    f["classes"] = np.array(classes, dtype=STR)
    g = f.create_group("videos")
    g["id"] = np.array(ids, dtype=STR)
    g["path"] = np.array(paths, dtype=STR)
    g["split"] = np.array(splits, dtype=STR)
    g["labels"] = labels.astype(np.uint8)
    g["length"] = length.astype(np.int32)
    g["frame_index"] = frame_index.astype(np.int64)
    n, T = frame_index.shape
    packed = n > 0 and T > 0  # HDF5 refuses chunks of an empty dataset
    feats = f.create_group("features")
    outs = {name: feats.create_dataset(name, shape=(n, T, flops[name].dim), dtype=np.float16,
                                       chunks=(1, T, flops[name].dim) if packed else None,
                                       compression="lzf" if packed else None) for name in sorted(flops)}
    f["flops"] = np.array([(e.name, e.resolution, e.gflops, e.params, e.dim) for _, e in sorted(flops.items())],
                          dtype=FLOPS_DTYPE)
    f["failed"] = np.array(failed, dtype=FAILED_DTYPE)
    return outs


def write_cache(path: str, *, dataset: str, sampling: dict, classes: list[str], ids: list[str], splits: list[str],
                labels: np.ndarray, length: np.ndarray, frame_index: np.ndarray, flops: list[FlopsEntry],
                features: dict[str, Features], paths: list[str] | None = None, attrs: dict[str, str] | None = None,
                block_rows: int = 1024) -> None:
    """Write a whole cache atomically from arrays (the synthetic caches of benchmarks and tests).

    ``labels`` (N, C) multi-hot; ``length`` (N,); ``frame_index`` (N, T); ``flops`` one entry per
    feature; ``features`` by name, an (N, T, D) array or a function of ``(lo, hi)`` giving rows
    ``lo:hi`` (written ``block_rows`` at a time, so a cache larger than RAM can be made).
    """
    entries = {e.name: e for e in flops}
    if set(entries) != set(features):
        raise ValueError(f"flops entries {sorted(entries)} and features {sorted(features)} differ")
    n = len(ids)

    def fill(f: h5py.File) -> None:
        outs = _write_layout(f, attrs={"dataset": dataset, "sampling": json.dumps(sampling), "video_root": "",
                                       "preprocessing": "{}", **(attrs or {})},
                             weights={name: "synthetic" for name in entries}, classes=classes, ids=ids,
                             paths=paths if paths is not None else ids, splits=splits, labels=labels, length=length,
                             frame_index=frame_index, flops=entries, failed=[])
        for name, source in features.items():
            for lo in range(0, n, block_rows):
                hi = min(lo + block_rows, n)
                outs[name][lo:hi] = source[lo:hi] if isinstance(source, np.ndarray) else source(lo, hi)

    write_atomic(path, fill)


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
    paths: list[str] = field(default_factory=list)  # relative to the cache's video_root, as /videos/path
    backbones: list[str] = field(default_factory=list)
    flops: dict[str, FlopsEntry] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # ids in /failed
    annotations: str = ""  # annotation_digest of the listing the cache was assembled from


@dataclass
class JournalState:
    """What the journal's chunks hold."""

    done: dict[int, set[str]] = field(default_factory=dict)  # video index -> backbones held
    failed: dict[int, str] = field(default_factory=dict)  # video index -> reason
    weights: dict[str, set[str]] = field(default_factory=dict)  # backbone -> weights identities it was computed with


def run_identity(attrs: dict[str, str], videos: list[VideoRecord]) -> str:
    """What journal chunks are valid for: dataset, sampling, preprocessing and the video list, ids and
    files (chunks address videos by position)."""
    digest = hashlib.sha256("\n".join(f"{v.id}\t{v.path}" for v in videos).encode()).hexdigest()
    return json.dumps({"dataset": attrs["dataset"], "sampling": attrs["sampling"],
                       "preprocessing": attrs["preprocessing"], "videos": digest}, sort_keys=True)


def annotation_digest(videos: list[VideoRecord], paths: list[str], classes: list[str],
                      problems: list[tuple[str, str]]) -> str:
    """sha256 of everything a cache takes from the annotations: the class list, each video's id, file
    (``paths``: relative to the video root, as :func:`relative_paths`), split and labels, and the
    annotation problems. A cache whose ``annotations`` attribute differs is rewritten to follow them."""
    h = hashlib.sha256("\n".join(classes).encode())
    for v, path in zip(videos, paths, strict=True):
        h.update(f"\n{v.id}\t{path}\t{v.split}\t{sorted(v.labels)}".encode())
    for where, reason in problems:
        h.update(f"\n!{where}\t{reason}".encode())
    return h.hexdigest()


def sweep_temporary(path: str) -> None:
    """Remove what interrupted writers of cache ``path`` left: ``<path>.<pid>.tmp`` and temporary
    chunks in ``<path>.parts/``. Call it only while holding the cache's lock."""
    sweep(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".")
    sweep(path + ".parts")


def write_atomic(path: str, fill, *, in_memory: bool = False) -> None:
    """Create HDF5 ``path`` by calling ``fill(h5file)`` on a temporary file, fsync it, rename it in
    place and fsync the folder. A failed write (a full disk, a file-size limit) leaves ``path`` as it
    was and no temporary file, and is :class:`DiskFull`. ``in_memory``: build the file in memory and
    write its bytes in one go (small files: journal chunks), so that no failed write can go unseen;
    HDF5 reports write errors at close only as printed warnings, so a file written in place is
    flushed explicitly first."""
    with replacing(path) as tmp:
        if in_memory:
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as f:
                fill(f)
            with open(tmp, "wb") as out:
                out.write(buffer.getbuffer())
        else:
            with h5py.File(tmp, "w") as f:
                fill(f)
                f.flush()


def read_info(path: str, *, dataset: str, sampling: str, preprocessing: str) -> CacheInfo:
    """Read what ``path`` holds, refusing a cache made for another dataset, sampling or preprocessing
    (the features would differ); its videos, labels and splits are the annotations' business."""
    if not os.path.exists(path):
        return CacheInfo()
    try:
        with Cache(path) as cache:
            for key, want in (("dataset", dataset), ("sampling", sampling), ("preprocessing", preprocessing)):
                have = cache.attr(key, None)
                if key == "preprocessing" and have is not None and "decoder" not in json.loads(have):
                    want = json.dumps({k: v for k, v in json.loads(want).items()  # made before decoders were
                                       if not (k == "decoder" and v.startswith("decord "))})  # recorded: decord's
                if have != want:
                    raise CacheMismatch(f"{path} holds {key} {have}, not {want}: pass another --out")
            return CacheInfo(ids=cache.ids, paths=[p.decode() for p in cache.file["videos/path"][:]],
                             backbones=cache.backbones, flops=cache.flops, weights=cache.weights,
                             failed=list(cache.failed), annotations=cache.attr("annotations"))
    except (OSError, KeyError) as err:
        raise CacheMismatch(f"{path} is not a readable cache ({str(err).splitlines()[0][:120]}): "
                            "delete it (its finished chunks in .parts/ are kept) or pass another --out") from None


class Journal:
    """The chunk files of ``<cache>.parts/``; ``write`` is atomic, ``load`` sees every finished chunk.

    Each chunk records the ``identity`` of the run that wrote it (see :func:`run_identity`) and the
    weights identity of each backbone it holds (attrs ``identity``, ``weights`` JSON).
    """

    def __init__(self, cache_path: str, rank: int = 0, identity: str = ""):
        self.folder = cache_path + ".parts"
        self.rank = rank
        self.identity = identity
        self._seq = 0

    def write(self, done: list[VideoFeatures], failed: list[tuple[int, str]], weights: dict[str, str]) -> None:
        """Journal ``done`` and ``failed`` videos; ``weights``: backbone name -> weights identity."""
        os.makedirs(self.folder, exist_ok=True)
        length = max([len(v.frame_index) for v in done], default=0)

        def fill(f: h5py.File) -> None:
            f.attrs["identity"] = self.identity
            f.attrs["weights"] = json.dumps(weights, sort_keys=True)
            f["index"] = np.array([v.index for v in done], dtype=np.int64)
            f["length"] = np.array([len(v.frame_index) for v in done], dtype=np.int32)
            frame_index = np.full((len(done), length), -1, dtype=np.int64)
            for row, v in enumerate(done):
                frame_index[row, : len(v.frame_index)] = v.frame_index
            f["frame_index"] = frame_index
            for name in weights:
                dim = done[0].features[name].shape[1] if done else 0
                data = np.zeros((len(done), length, dim), dtype=np.float16)
                for row, v in enumerate(done):
                    data[row, : len(v.frame_index)] = v.features[name]
                f[f"features/{name}"] = data
            f["failed_index"] = np.array([i for i, _ in failed], dtype=np.int64)
            f["failed_reason"] = np.array([r for _, r in failed], dtype=STR)

        self._seq += 1
        write_atomic(os.path.join(self.folder, f"{time.time_ns()}-r{self.rank}-{self._seq}.h5"), fill, in_memory=True)

    def chunks(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder) if n.endswith(".h5"))

    def load(self) -> JournalState:
        """What all chunks hold; raises :class:`CacheMismatch` for a chunk written by a run of another identity."""
        state = JournalState()
        for chunk in self.chunks():
            with h5py.File(chunk, "r") as f:
                if f.attrs.get("identity") != self.identity:
                    raise CacheMismatch(f"{self.folder} holds work of another dataset, sampling or video list: "
                                        "delete that folder or pass another --out")
                weights = json.loads(f.attrs["weights"])
                for name, identity in weights.items():
                    state.weights.setdefault(name, set()).add(identity)
                for i in f["index"][:]:
                    state.done.setdefault(int(i), set()).update(weights)
                for i, reason in zip(f["failed_index"][:], f["failed_reason"][:], strict=True):
                    state.failed[int(i)] = reason.decode()
        return state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _groups(values: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(value, positions of that value)`` for each distinct value in ``values``."""
    order = np.argsort(values, kind="stable")
    for at in np.split(order, np.flatnonzero(np.diff(values[order])) + 1):
        if len(at):
            yield int(values[at[0]]), at


def read_rows(dataset: h5py.Dataset, rows: np.ndarray, head: tuple[slice, ...] = ()) -> np.ndarray:
    """``dataset[rows]`` (unique ``rows`` in any order), cut to ``head`` on the next axes, reading those
    rows and no others: one read per run of consecutive rows, straight into the result."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    cut = (tuple(len(range(*s.indices(n))) for s, n in zip(head, dataset.shape[1:], strict=False))
           + dataset.shape[1 + len(head):])
    out = np.empty((len(rows), *cut), dtype=dataset.dtype)
    at = 0
    for run in np.split(ordered, np.flatnonzero(np.diff(ordered) != 1) + 1) if len(rows) else []:
        dataset.read_direct(out, (slice(int(run[0]), int(run[-1]) + 1), *head), np.s_[at:at + len(run)])
        at += len(run)
    if np.array_equal(ordered, rows):
        return out
    result = np.empty_like(out)
    result[order] = out
    return result


def relative_paths(paths: list[str], root: str) -> list[str]:
    """``os.path.relpath(path, root)`` of each path (unchanged without a root), cheaply for paths under the root."""
    if not root:
        return paths
    prefix = os.path.join(os.path.abspath(root), "")
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in map(os.path.abspath, paths)]


def _chunk_features(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"features/{name}": f["features"][name][:] for name in f["features"]}


def assemble(path: str, *, chunks: list[str], videos: list[VideoRecord], classes: list[str],
             problems: list[tuple[str, str]], attrs: dict[str, str], flops: dict[str, FlopsEntry],
             weights: dict[str, str], max_length: int | None) -> tuple[int, int]:
    """Merge the existing cache at ``path`` and the journal ``chunks`` into a new cache, atomically.

    Videos keep annotation order. A video is in ``/videos`` when it has features for every
    backbone; a video that failed in the journal is dropped from ``/videos`` and listed in
    ``/failed``. A later chunk wins over an earlier one, a chunk over the old cache. Linear in the
    number of videos: each chunk is read whole, the old cache in runs of consecutive rows, and
    features are written in blocks of about ``BLOCK_BYTES``. The chunks are left in place.
    Returns ``(videos cached, videos failed)``.
    """
    old = h5py.File(path, "r") if os.path.exists(path) else None
    try:
        tables: list[dict[str, np.ndarray]] = [{}]  # source 0: the old cache (read in runs); s: chunks[s - 1]
        source: dict[str, np.ndarray] = {}  # backbone -> source of each video's features, -1 for none
        row: dict[str, np.ndarray] = {}  # backbone -> row of each video in that source

        def locate(name: str, s: int, indices: np.ndarray, rows: np.ndarray) -> None:
            if name not in source:
                source[name], row[name] = np.full(len(videos), -1), np.zeros(len(videos), dtype=np.int64)
            source[name][indices], row[name][indices] = s, rows

        here = relative_paths([v.path for v in videos], attrs.get("video_root", ""))
        if old is not None:  # a video's features are reused when its id and file are the same
            held = zip(old["videos/id"][:], old["videos/path"][:], strict=True)
            at = {(i.decode(), p.decode()): r for r, (i, p) in enumerate(held)}
            old_rows = np.array([at.get((v.id, p), -1) for v, p in zip(videos, here, strict=True)], dtype=np.int64)
            cached = np.flatnonzero(old_rows >= 0)
            for name in old["features"]:
                locate(name, 0, cached, old_rows[cached])
        failed_now: dict[int, str] = {}
        for s, chunk in enumerate(chunks, 1):
            with h5py.File(chunk, "r") as f:
                index = f["index"][:]
                tables.append({"videos/length": f["length"][:], "videos/frame_index": f["frame_index"][:]})
                failed_now.update(zip(f["failed_index"][:].tolist(), (r.decode() for r in f["failed_reason"][:]),
                                      strict=True))
                names = list(f["features"]) if len(index) else []
            for name in names:
                locate(name, s, index, np.arange(len(index)))
        backbones = sorted(source)
        failed = np.zeros(len(videos), dtype=bool)
        failed[list(failed_now)] = True
        held = np.array([source[n] >= 0 for n in backbones], dtype=bool).reshape(len(backbones), len(videos))
        listed, complete = held.any(axis=0) & ~failed, held.all(axis=0)
        keep = np.flatnonzero(listed & complete)
        failures = list(problems) + [(videos[i].id, reason) for i, reason in sorted(failed_now.items())]
        failures += [(videos[i].id, "features missing for " + ", ".join(np.array(backbones)[~held[:, i]]))
                     for i in np.flatnonzero(listed & ~complete).tolist()]

        def take(name: str, key: str, lo: int, hi: int, out: np.ndarray) -> None:
            """Copy ``key`` of kept videos ``lo:hi`` from where their ``name`` features are into ``out``
            (its first columns when the source is narrower)."""
            head = tuple(slice(0, width) for width in out.shape[1:2])  # the first steps of 2-D and 3-D rows
            sources, rows = source[name][keep[lo:hi]], row[name][keep[lo:hi]]
            for s, at in _groups(sources):
                if s == 0:
                    data = read_rows(old[key], rows[at], head)
                else:
                    if key not in tables[s]:  # a chunk's features: read whole on first use, dropped after last
                        tables[s].update(_chunk_features(chunks[s - 1]))
                    data = tables[s][key][(rows[at], *head)]
                out[(at, *(slice(0, width) for width in data.shape[1:2]))] = data

        lengths = np.zeros(len(keep), dtype=np.int32)
        if backbones:  # lengths and frame indices come from where the first backbone's features are
            take(backbones[0], "videos/length", 0, len(keep), lengths)
        T = max_length or int(lengths.max(initial=0))
        past = np.arange(T) >= lengths[:, None]  # (N, T) steps past each video's length
        frame_index = np.full((len(keep), T), -1, dtype=np.int64)
        if backbones:
            take(backbones[0], "videos/frame_index", 0, len(keep), frame_index)
        frame_index[past] = -1
        kept = [videos[i] for i in keep.tolist()]

        labels = np.zeros((len(kept), len(classes)), dtype=np.uint8)
        labels[np.repeat(np.arange(len(kept)), [len(v.labels) for v in kept]),
               np.array([c for v in kept for c in v.labels], dtype=np.int64)] = 1

        def fill(f: h5py.File) -> None:
            outs = _write_layout(f, attrs=attrs, weights={k: weights[k] for k in backbones}, classes=classes,
                                 ids=[v.id for v in kept], paths=[here[i] for i in keep.tolist()],
                                 splits=[v.split for v in kept], labels=labels, length=lengths,
                                 frame_index=frame_index, flops={n: flops[n] for n in backbones}, failed=failures)
            step = max(1, BLOCK_BYTES // max(1, 2 * T * max((flops[n].dim for n in backbones), default=1)))
            last = np.full(len(tables), -1)  # source -> last kept row it provides
            for name in backbones:
                np.maximum.at(last, source[name][keep], np.arange(len(keep)))
            for lo in range(0, len(kept), step):
                hi = min(lo + step, len(kept))
                for name, out in outs.items():
                    block = np.zeros((hi - lo, T, out.shape[2]), dtype=np.float16)
                    take(name, f"features/{name}", lo, hi, block)
                    block[past[lo:hi]] = 0
                    out[lo:hi] = block
                for s in np.flatnonzero((last >= lo) & (last < hi)).tolist():
                    tables[s] = {k: v for k, v in tables[s].items() if not k.startswith("features/")}

        check_space(path, int(lengths.sum()) * 2 * sum(flops[n].dim for n in backbones) + (64 << 20))
        write_atomic(path, fill)
    finally:
        if old is not None:
            old.close()
    return len(keep), len(failures)
