"""The extraction run: decode each video once in DataLoader workers, run every backbone on the
frames of several videos batched together, journal the results, assemble the cache at the end."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from . import distributed
from .backbones import Backbone, WeightsUnavailable, create_backbone, finetuned_path, parse_name
from .cache import (
    Cache,
    CacheInfo,
    CacheMismatch,
    Journal,
    VideoFeatures,
    annotation_digest,
    assemble,
    read_info,
    relative_paths,
    run_identity,
    sweep_temporary,
)
from .datasets import Annotations, VideoRecord, load_annotations
from .decode import (
    CROP,
    DOWNSAMPLE,
    SHORT_SIDE,
    VideoError,
    decoder_version,
    default_workers,
    normalisation,
    read_frames,
    resize_crop,
    resolve_decoder,
)
from .flops import FlopsEntry, backbone_flops
from .locks import exclusive_job
from .sampling import Sampling
from .workers import guarded, prefetch

CHUNK_SECONDS = 30.0  # journal a chunk at least this often


@dataclass
class ExtractConfig:
    dataset: str
    annotations: list[str]
    video_root: str
    backbones: list[str]  # arch@res
    sampling: Sampling
    out: str
    classes: str | None = None
    seek: str = "auto"
    downsample: str = "antialias"  # how 168/112/84 are made from the 224 crop (a key of decode.DOWNSAMPLE)
    decoder: str = "auto"  # a key of decode.DECODERS, or auto (resolve_decoder); recorded in the cache
    weights: str = "imagenet"
    device: str = "auto"
    batch_size: int = 32  # frames per forward pass
    workers: int = field(default_factory=default_workers)  # decoding processes
    chunk_videos: int = 32  # journal a chunk after this many videos: the most a kill can lose
    progress: bool = True


@dataclass
class Summary:
    cached: int = 0
    failed: int = 0
    processed: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # annotation problems (where, reason)
    new_failures: list[tuple[str, str]] = field(default_factory=list)  # (video id, reason)
    changes: str = ""  # how the annotations differ from the cache's before this run (annotation_changes)
    frames: int = 0
    seconds: float = 0.0


class _DecodedVideos(Dataset):
    """Item ``k`` -> ``(video index, uint8 crops (T,3,224,224) | None, frame indices | None, error | None)``."""

    def __init__(self, items: list[tuple[int, str]], sampling: Sampling, seek: str, decoder: str):
        self.items, self.sampling, self.seek, self.decoder = items, sampling, seek, decoder

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        index, path = self.items[k]
        try:
            frames, indices, _ = read_frames(path, self.sampling, self.seek, self.decoder)
            return index, frames, indices, None
        except VideoError as err:
            return index, None, None, str(err)


def place_backbone(backbone: Backbone, device: torch.device) -> None:
    """Move ``backbone`` to ``device`` once, as :func:`compute_features` feeds it: channels_last, float16
    on CUDA, float32 on the CPU (bf16 is far slower there)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backbone.module.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def compute_features(backbones: list[Backbone], crops: torch.Tensor, device: torch.device,
                     downsample: str = "antialias") -> dict[str, np.ndarray]:
    """Features ``name -> (B, D) float16`` of uint8 ``crops`` for every backbone, one resize per resolution
    and interpolation, all brought to the host in one transfer. Inputs are normalised in float32, then cast
    to the module's dtype (see :func:`place_backbone`), channels_last."""
    x = crops.to(device, non_blocking=True)
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for res, how in sorted({(b.resolution, b.arch.interpolation) for b in backbones}, reverse=True):
            scaled = resize_crop(x, res, downsample, how)
            for b in (b for b in backbones if (b.resolution, b.arch.interpolation) == (res, how)):
                mean, std = normalisation(b.arch.mean, b.arch.std, device)
                dtype = next(b.module.parameters()).dtype
                inp = ((scaled - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)
                outputs[b.name] = b.module(inp).half()
    host = torch.cat(list(outputs.values()), dim=1).cpu().numpy()
    bounds = np.cumsum([0] + [out.shape[1] for out in outputs.values()])
    return {name: host[:, lo:hi] for name, (lo, hi) in zip(outputs, pairwise(bounds), strict=True)}


def canonical(names: list[str]) -> list[str]:
    """Normalised, de-duplicated ``arch@res`` names in the order given."""
    seen: list[str] = []
    for name in names:
        arch, res = parse_name(name)
        if f"{arch}@{res}" not in seen:
            seen.append(f"{arch}@{res}")
    return seen


def weights_for(cfg: ExtractConfig, name: str) -> str:
    """``cfg.weights`` for backbone ``name``: ``finetuned`` names its file from ``finetune-backbone``."""
    if cfg.weights != "finetuned":
        return cfg.weights
    path = finetuned_path(cfg.dataset, name)
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"--weights finetuned: no {path}; make it with `finetune-backbone --dataset "
                                 f"{cfg.dataset} --backbone {name}` or pass --weights PATH")
    return path


def cache_attrs(cfg: ExtractConfig) -> dict[str, str]:
    sampling = {"num_frames": cfg.sampling.num_frames, "fps": cfg.sampling.fps,
                "max_frames": cfg.sampling.max_frames, "seek": "keyframe" if cfg.seek == "keyframe" else "exact"}
    return {
        "dataset": cfg.dataset,
        "video_root": os.path.abspath(cfg.video_root),
        "sampling": json.dumps(sampling, sort_keys=True),
        "preprocessing": json.dumps({"resize_short_side": SHORT_SIDE, "center_crop": CROP,
                                     "lower_resolutions": DOWNSAMPLE[cfg.downsample],
                                     "decoder": decoder_version(cfg.decoder),
                                     "normalisation": "per backbone (ImageNet mean/std; EfficientNet-Lite 0.5/0.5)"}),
        "created_by": "extract-features",
    }


def _extract_group(cfg: ExtractConfig, backbones: list[Backbone], items: list[tuple[int, str]], ids: list[str],
                   journal: Journal, device: torch.device, bar: tqdm, summary: Summary) -> None:
    """Decode ``items`` once, run ``backbones`` on every frame in batches of ``cfg.batch_size`` (the frames
    of several videos together; one partial batch, at the end of the group), journal results every chunk."""
    names = [b.name for b in backbones]
    waiting: list[tuple[int, np.ndarray]] = []  # (index, frame indices) of videos not all computed, in order
    queued: list[torch.Tensor] = []  # their frames not run yet, on the device
    ready: dict[str, list[np.ndarray]] = {n: [] for n in names}  # features of their frames run so far
    done: list[VideoFeatures] = []
    failed: list[tuple[int, str]] = []
    last_write = time.monotonic()

    def run_queued(final: bool) -> None:
        """Run the queued frames in full batches, the remainder too when ``final``, and hand on every
        video whose frames have all run."""
        frames = torch.cat(queued)
        stop = len(frames) if final else len(frames) - len(frames) % cfg.batch_size
        for s in range(0, stop, cfg.batch_size):
            out = compute_features(backbones, frames[s:s + cfg.batch_size], device, cfg.downsample)
            for n in names:
                ready[n].append(out[n])
        queued[:] = [frames[stop:]] if stop < len(frames) else []
        summary.frames += stop
        feats = {n: np.concatenate(ready[n]) for n in names}
        start = 0
        while waiting and start + len(waiting[0][1]) <= len(feats[names[0]]):
            index, indices = waiting.pop(0)
            video = {n: feats[n][start:start + len(indices)] for n in names}
            bad = [n for n in names if not np.isfinite(video[n]).all()]
            if bad:  # float16 overflow or a broken model: never cached
                reason = f"non-finite features from {', '.join(bad)} (float16 overflow or broken weights)"
                failed.append((index, reason))
                summary.new_failures.append((ids[index], reason))
            else:
                done.append(VideoFeatures(index, indices, video))
            start += len(indices)
        for n in names:
            ready[n] = [feats[n][start:]]

    def write_chunk() -> None:
        nonlocal last_write
        journal.write(done, failed, {b.name: b.weights for b in backbones})
        done.clear()
        failed.clear()
        last_write = time.monotonic()

    decoded = guarded(_DecodedVideos(items, cfg.sampling, cfg.seek, cfg.decoder), [path for _, path in items],
                      cfg.workers, lambda k, reason: (items[k][0], None, None, reason), pin=device.type == "cuda")
    for index, frames, indices, error in prefetch(decoded):
        if error is not None:
            failed.append((index, error))
            summary.new_failures.append((ids[index], error))
        else:
            waiting.append((index, indices))
            queued.append(frames.to(device, non_blocking=True))  # from pinned memory on CUDA: no pageable copy
            if sum(len(f) for f in queued) >= cfg.batch_size:
                run_queued(final=False)
        summary.processed += 1
        bar.update(1)
        bar.set_postfix(frames_per_s=f"{summary.frames / max(bar.format_dict['elapsed'], 1e-9):.1f}",
                        failed=len(summary.new_failures), refresh=False)
        if len(done) + len(failed) >= cfg.chunk_videos or time.monotonic() - last_write > CHUNK_SECONDS:
            write_chunk()
    if queued:
        run_queued(final=True)
    if done or failed:
        write_chunk()


def recorded_decoder(path: str) -> str:
    """The decoder cache ``path`` was extracted with; "" when there is no readable cache there (a
    damaged one is reported when it is read)."""
    try:
        with Cache(path) as cache:
            return cache.decoder
    except Exception:  # noqa: BLE001  (only a preference: auto's choice)
        return ""


def run_extraction(cfg: ExtractConfig) -> Summary:
    """Extract ``cfg.backbones`` for every video not yet cached, then assemble ``cfg.out``.

    One run writes a cache at a time: rank 0 holds ``<cache>.lock`` (:mod:`extract.locks`) from start
    to finish, and a second run on the same ``--out`` is refused (every rank agrees before going on).
    Under ``torchrun`` rank r takes the videos with ``index % world == r``; rank 0 assembles.
    """
    started = time.monotonic()
    cfg = dataclasses.replace(cfg, decoder=resolve_decoder(cfg.decoder, recorded_decoder(cfg.out)))
    info_dist, device = distributed.setup(cfg.device)
    ann = load_annotations(cfg.dataset, cfg.annotations, cfg.video_root, cfg.classes)  # refused: nothing written
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with exclusive_job(cfg.out + ".lock", cfg.out, main=info_dist.main, device=device,
                       advice="wait for that run to finish, or pass another --out",
                       then=lambda: sweep_temporary(cfg.out)):  # no other writer lives: what a killed one left can go
        summary = _extract(cfg, ann, info_dist, device)
    distributed.teardown(info_dist)
    summary.seconds = time.monotonic() - started
    return summary


def annotation_changes(info: CacheInfo, path: str, videos: list[VideoRecord], paths: list[str],
                       classes: list[str]) -> str:
    """One line saying how ``videos`` (the annotations now; ``paths`` their files relative to the
    video root) differ from what cache ``path`` (read as ``info``) was assembled from; empty when
    nothing countable differs. Labels and splits are read only here, when the annotations changed."""
    now = {v.id: v for v in videos}
    dropped = sum(i not in now for i in info.ids)
    here = dict(zip((v.id for v in videos), paths, strict=True))
    moved = sum(i in now and here[i] != p for i, p in zip(info.ids, info.paths, strict=True))
    relabelled = resplit = 0
    with Cache(path) as cache:
        held = np.array(cache.classes + [""])
        for i, split, row in zip(cache.ids, cache.split.tolist(), cache.labels, strict=True):
            if i in now:
                resplit += split != now[i].split
                relabelled += set(held[np.flatnonzero(row)]) != {classes[c] for c in now[i].labels}
    counts = [f"{n} {what}" for n, what in ((dropped, "dropped"), (moved, "with another file (re-extracted)"),
                                             (relabelled, "relabelled"), (resplit, "moved to another split")) if n]
    return ", ".join(counts)


def _extract(cfg: ExtractConfig, ann: Annotations, info_dist: distributed.Dist, device: torch.device) -> Summary:
    attrs = cache_attrs(cfg)
    here = relative_paths([v.path for v in ann.videos], attrs["video_root"])  # each video's file, as the cache names it
    attrs["annotations"] = annotation_digest(ann.videos, here, ann.classes, ann.problems)
    requested = canonical(cfg.backbones)
    if info_dist.main and not os.path.exists(cfg.out):  # from now on the cache always opens; the journal waits
        assemble(cfg.out, chunks=[], videos=ann.videos, classes=ann.classes, problems=ann.problems, attrs=attrs,
                 flops={}, weights={}, max_length=cfg.sampling.max_length)
    distributed.barrier()
    info = read_info(cfg.out, dataset=cfg.dataset, sampling=attrs["sampling"], preprocessing=attrs["preprocessing"])
    journal = Journal(cfg.out, info_dist.rank, run_identity(attrs, ann.videos))
    state = journal.load()
    journalled = set().union(*state.done.values())
    unfinished = sorted(journalled - set(requested) - set(info.backbones))
    if unfinished:
        raise CacheMismatch(f"{journal.folder} holds {', '.join(unfinished)} from an interrupted run: add "
                            f"--backbone {' --backbone '.join(unfinished)} to finish it, or delete that folder")
    models: dict[str, Backbone] = {}
    prices: dict[str, FlopsEntry] = {}  # priced at load, on the CPU in float32

    def model(name: str) -> Backbone:
        if name not in models:
            backbone = create_backbone(name, weights=weights_for(cfg, name))
            for where, held, advice in ((cfg.out, {info.weights.get(name)}, "pass another --out"),
                                        (journal.folder, state.weights.get(name, set()),
                                         "delete that folder or pass another --out")):
                other = held - {None, backbone.weights}
                if other:
                    raise CacheMismatch(f"{where} holds {name} computed with weights {other.pop()}, "
                                        f"this run uses {backbone.weights}: {advice}")
            prices[name] = backbone_flops(backbone)
            place_backbone(backbone, device)
            models[name] = backbone
        return models[name]

    for name in requested + sorted(journalled - set(requested)):  # checks their weights; prices them
        model(name)
    done, failed = state.done, state.failed
    existing = set(zip(info.ids, info.paths, strict=True))  # (id, file): a video whose file changed is extracted again
    groups: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    for index, video in enumerate(ann.videos):
        if index % info_dist.world != info_dist.rank or index in failed:
            continue
        needed = [n for n in requested if n not in info.backbones] if (video.id, here[index]) in existing else \
            sorted(set(requested) | set(info.backbones))
        if needed and not set(needed) <= done.get(index, set()):
            groups.setdefault(tuple(needed), []).append((index, video.path))
    todo = sum(len(items) for items in groups.values())
    summary = Summary(problems=ann.problems)
    with tqdm(total=todo, desc=f"extract {cfg.dataset}", unit="video", disable=not (cfg.progress and info_dist.main),
              dynamic_ncols=True) as bar:
        for needed, items in groups.items():
            _extract_group(cfg, [model(n) for n in needed], items, [v.id for v in ann.videos], journal, device,
                           bar, summary)
    distributed.barrier()
    if info_dist.main and not journal.chunks() and info.annotations == attrs["annotations"]:
        summary.cached, summary.failed = len(info.ids), len(info.failed)  # nothing new: the cache stays as it is
    elif info_dist.main:
        if info.ids:
            summary.changes = annotation_changes(info, cfg.out, ann.videos, here, ann.classes)
        journal.load()  # every chunk is still this run's (the lock keeps other runs out)
        names = sorted(set(info.backbones) | set(models))
        flops = {**info.flops, **prices}
        weights = {**info.weights, **{n: m.weights for n, m in models.items()}}
        summary.cached, summary.failed = assemble(
            cfg.out, chunks=journal.chunks(), videos=ann.videos, classes=ann.classes, problems=ann.problems,
            attrs=attrs, flops={n: flops[n] for n in names}, weights=weights, max_length=cfg.sampling.max_length)
        journal.remove()
    distributed.barrier()
    return summary
