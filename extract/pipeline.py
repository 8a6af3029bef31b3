"""The extraction run: decode each video once in DataLoader workers, run every backbone on the
frames of several videos batched together, journal the results, assemble the cache at the end."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import distributed
from .backbones import Backbone, WeightsUnavailable, create_backbone, finetuned_path, parse_name
from .cache import CacheMismatch, Journal, VideoFeatures, assemble, read_info, run_identity
from .datasets import load_annotations
from .decode import (CROP, DOWNSAMPLE, SHORT_SIDE, VideoError, default_workers, normalisation, read_frames,
                     resize_crop)
from .flops import FlopsEntry, backbone_flops
from .sampling import Sampling

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
    frames: int = 0
    seconds: float = 0.0


class _DecodedVideos(Dataset):
    """Item ``k`` -> ``(video index, uint8 crops (T,3,224,224) | None, frame indices | None, error | None)``."""

    def __init__(self, items: list[tuple[int, str]], sampling: Sampling, seek: str):
        self.items, self.sampling, self.seek = items, sampling, seek

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        index, path = self.items[k]
        try:
            frames, indices, _ = read_frames(path, self.sampling, self.seek)
            return index, frames, indices, None
        except VideoError as err:
            return index, None, None, str(err)


def _single(batch: list):
    return batch[0]


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def place_backbone(backbone: Backbone, device: torch.device) -> None:
    """Move ``backbone`` to ``device`` once, as :func:`compute_features` feeds it: channels_last, float16
    on CUDA, float32 on the CPU (bf16 is far slower there)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backbone.module.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def compute_features(backbones: list[Backbone], crops: torch.Tensor, device: torch.device,
                     downsample: str = "antialias") -> dict[str, np.ndarray]:
    """Features ``name -> (B, D) float16`` of uint8 ``crops`` for every backbone, one resize per resolution,
    all brought to the host in one transfer. Inputs are normalised in float32, then cast to the module's
    dtype (see :func:`place_backbone`), channels_last."""
    x = crops.to(device, non_blocking=True)
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for res in sorted({b.resolution for b in backbones}, reverse=True):
            scaled = resize_crop(x, res, downsample)
            for b in (b for b in backbones if b.resolution == res):
                mean, std = normalisation(b.arch.mean, b.arch.std, device)
                dtype = next(b.module.parameters()).dtype
                inp = ((scaled - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)
                outputs[b.name] = b.module(inp).half()
    host = torch.cat(list(outputs.values()), dim=1).cpu().numpy()
    bounds = np.cumsum([0] + [out.shape[1] for out in outputs.values()])
    return {name: host[:, lo:hi] for name, lo, hi in zip(outputs, bounds[:-1], bounds[1:])}


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
                                     "normalisation": "per backbone (ImageNet mean/std; EfficientNet-Lite 0.5/0.5)"}),
        "created_by": "extract-features",
    }


def _extract_group(cfg: ExtractConfig, backbones: list[Backbone], items: list[tuple[int, str]], ids: list[str],
                   journal: Journal, device: torch.device, bar: tqdm, summary: Summary) -> None:
    """Decode ``items`` once, run ``backbones`` on every frame in batches of ``cfg.batch_size`` (the frames
    of several videos together; one partial batch, at the end of the group), journal results every chunk."""
    loader = DataLoader(
        _DecodedVideos(items, cfg.sampling, cfg.seek), batch_size=1, collate_fn=_single, num_workers=cfg.workers,
        worker_init_fn=_one_thread if cfg.workers else None, prefetch_factor=4 if cfg.workers else None,
        pin_memory=device.type == "cuda",
    )
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
            done.append(VideoFeatures(index, indices, {n: feats[n][start:start + len(indices)] for n in names}))
            start += len(indices)
        for n in names:
            ready[n] = [feats[n][start:]]

    def write_chunk() -> None:
        nonlocal last_write
        journal.write(done, failed, {b.name: b.weights for b in backbones})
        done.clear()
        failed.clear()
        last_write = time.monotonic()

    for index, frames, indices, error in loader:
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


def run_extraction(cfg: ExtractConfig) -> Summary:
    """Extract ``cfg.backbones`` for every video not yet cached, then assemble ``cfg.out``.

    Under ``torchrun`` rank r takes the videos with ``index % world == r``; rank 0 assembles.
    """
    started = time.monotonic()
    info_dist, device = distributed.setup(cfg.device)
    ann = load_annotations(cfg.dataset, cfg.annotations, cfg.video_root, cfg.classes)
    attrs = cache_attrs(cfg)
    requested = canonical(cfg.backbones)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    if info_dist.main and not os.path.exists(cfg.out):  # from now on the cache always opens; the journal waits
        assemble(cfg.out, chunks=[], videos=ann.videos, classes=ann.classes, problems=ann.problems, attrs=attrs,
                 flops={}, weights={}, max_length=cfg.sampling.max_length)
    distributed.barrier()
    info = read_info(cfg.out, dataset=cfg.dataset, sampling=attrs["sampling"], preprocessing=attrs["preprocessing"],
                     classes=ann.classes)
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
    existing = set(info.ids)
    groups: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    for index, video in enumerate(ann.videos):
        if index % info_dist.world != info_dist.rank or index in failed:
            continue
        needed = [n for n in requested if n not in info.backbones] if video.id in existing else \
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
    unchanged = not journal.chunks() and {where for where, _ in ann.problems} <= set(info.failed)
    if info_dist.main and unchanged:  # nothing new: leave the cache as it is rather than rewrite it
        summary.cached, summary.failed = len(info.ids), len(info.failed)
    elif info_dist.main:
        names = sorted(set(info.backbones) | set(models))
        flops = {**info.flops, **prices}
        weights = {**info.weights, **{n: m.weights for n, m in models.items()}}
        summary.cached, summary.failed = assemble(
            cfg.out, chunks=journal.chunks(), videos=ann.videos, classes=ann.classes, problems=ann.problems,
            attrs=attrs, flops={n: flops[n] for n in names}, weights=weights, max_length=cfg.sampling.max_length)
        journal.remove()
    distributed.barrier()
    distributed.teardown(info_dist)
    summary.seconds = time.monotonic() - started
    return summary
