"""``finetune-backbone``: train one ``arch@res`` on a dataset's videos, TSN-style, for phase 1.

AR-Net's step A-1 (``scripts_train.sh``): K segments per video (16), one frame per segment,
average consensus of the frame logits, SGD momentum 0.9, lr 0.02 stepped x0.1 at epochs 20 and
40, weight decay 1e-4, gradient norm clipped at 20, dropout 0.5, 10 epochs. Training frames: a
random offset in each segment, short side 256, random-resized crop to the backbone's resolution
and a horizontal flip (the same for every frame of a clip). Validation (the ``val`` split, else a
seeded 10% of train; never the test split): segment centres through phase 1's own decoding and
preprocessing (short side 256, centre crop 224, resized to the resolution), so it sees what
``extract-features`` sees.

Outputs, next to ``--out``: ``OUT`` (the backbone's state dict with the classifier stripped,
best validation mAP; what ``extract-features --weights`` loads), ``OUT.last.pt`` (resume point),
``OUT.log.csv`` (per epoch). All written atomically; checkpoints load with ``weights_only=True``.
Under ``torchrun`` every rank trains on its shard (DistributedDataParallel); rank 0 validates,
logs and saves.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import click
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

from . import distributed
from .backbones import create_backbone, finetuned_path, parse_name
from .cli import dataset_inputs
from .datasets import DATASETS, AnnotationError, VideoRecord, load_annotations
from .decode import (
    DECODERS,
    VideoError,
    default_workers,
    normalisation,
    read_frames,
    read_resized,
    resize_crop,
    resolve_decoder,
)
from .errors import UserError
from .metrics import hit_at_k, mean_average_precision
from .options import apply_overrides
from .sampling import Sampling
from .training import Loop, fit, resume_point, soft_cross_entropy
from .workers import guarded, prefetch

LITEEVAL_BACKBONES = ("resnet101@224", "mobilenetv2@112")  # LiteEval reads 25 frames; AR-Net's set 16


@dataclass
class FinetuneConfig:
    """``finetune-backbone``'s options; every field can be set with ``--set key=value``."""

    dataset: str = ""
    backbone: str = ""  # arch@res
    out: str = ""  # the finetuned backbone's state dict
    annotations: list[str] = field(default_factory=list)
    video_root: str = ""
    classes: str = ""
    init: str = "imagenet"  # the starting weights: imagenet | none | a state-dict path (as extract-features --weights)
    segments: int = 0  # 0: 25 for LiteEval's backbones, else 16
    epochs: int = 10
    batch_size: int = 48  # videos per step (each `segments` frames)
    lr: float = 0.02
    lr_steps: tuple[int, ...] = (20, 40)  # epochs at which the learning rate is multiplied by 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad: float = 20.0  # max gradient norm
    dropout: float = 0.5
    min_scale: float = 0.25  # random-resized crop: smallest share of the frame's area kept
    amp: str = "bf16"  # CUDA autocast: bf16 | fp16 | none
    accumulate: int = 1  # gradient accumulation: each step's batch_size videos in this many passes (less GPU memory)
    val_fraction: float = 0.1  # without a val split: this share of train, carved with the seed, validates
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False  # CUDA: deterministic kernels (slower)
    tf32: bool = False  # CUDA: TF32 matmuls and convolutions
    workers: int = -1  # decoding processes per rank; -1: the cores per rank less one
    decoder: str = "auto"  # a key of extract.decode.DECODERS, or auto (the fastest here)

    def resolved_segments(self) -> int:
        return self.segments or (25 if self.backbone in LITEEVAL_BACKBONES else 16)


def segment_indices(n: int, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame in each of ``k`` equal segments of ``n`` frames: a random offset (``rng``) or the
    centre (as ``Sampling(num_frames=k)``, so validation sees extraction's frames)."""
    if rng is None:
        return Sampling(num_frames=k).indices(n, 1.0)
    edges = np.floor(np.arange(k + 1) * n / k).astype(np.int64)
    span = np.maximum(edges[1:] - edges[:-1], 1)
    return np.minimum(edges[:-1] + rng.integers(0, span), n - 1)


class Clips(Dataset):
    """Item ``i`` -> ``(video id, clip (K, 3, s, s) uint8 | None, labels (C,) | None, error | None)``:
    training clips cropped to the backbone's resolution, validation clips phase 1's 224 crops (resized
    and normalised on the device by :func:`prepare`: uint8 keeps shared memory and copies small).

    Training draws come from a generator seeded by (seed, epoch, i): the same in any worker, after
    any resume."""

    def __init__(self, videos: list[VideoRecord], num_classes: int, backbone: str, segments: int, *,
                 train: bool, seed: int = 0, min_scale: float = 0.25, decoder: str = "decord"):
        self.videos, self.num_classes, self.segments, self.train = videos, num_classes, segments, train
        self.decoder = decoder
        self.resolution = parse_name(backbone)[1]
        self.seed, self.epoch = seed, 0
        self.augment = v2.Compose([v2.RandomResizedCrop(self.resolution, scale=(min_scale, 1.0), antialias=True),
                                   v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int):
        video = self.videos[i]
        try:
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, i])
                frames = read_resized(video.path, lambda n: segment_indices(n, self.segments, rng), self.decoder)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(rng.integers(2**31)))
                    x = self.augment(frames)  # one crop and flip for the whole clip
            else:
                x, _, _ = read_frames(video.path, Sampling(num_frames=self.segments), decoder=self.decoder)
        except VideoError as err:
            return video.id, None, None, str(err)
        labels = torch.zeros(self.num_classes)
        labels[list(video.labels)] = 1.0
        return video.id, x, labels, None


def prepare(clips: torch.Tensor, resolution: int, mean: torch.Tensor, std: torch.Tensor,
            interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 ``(B, K, 3, s, s)`` clips (on the device) -> float ``(B, K, 3, r, r)`` normalised with the
    backbone's ``mean`` and ``std`` ``(1, 3, 1, 1)``; resized (phase 1's antialiased resize with the
    backbone's ``interpolation``) when ``s != r``."""
    b, k = clips.shape[:2]
    x = resize_crop(clips.flatten(0, 1), resolution, interpolation=interpolation)
    return ((x - mean) / std).view(b, k, *x.shape[1:])


def collate(items: list) -> tuple[list[str], torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """Stack the clips that decoded; return the failures ``(video id, reason)`` apart."""
    good = [it for it in items if it[3] is None]
    failed = [(it[0], it[3]) for it in items if it[3] is not None]
    if not good:
        return [], None, None, failed
    return [g[0] for g in good], torch.stack([g[1] for g in good]), torch.stack([g[2] for g in good]), failed


class TSN(nn.Module):
    """A backbone with a new classifier; video logits = mean of the frame logits (average consensus)."""

    def __init__(self, features: nn.Module, dim: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, r, r) -> (B, C)."""
        b, k = clips.shape[:2]
        return self.fc(self.features(clips.flatten(0, 1))).view(b, k, -1).mean(1)


def clip_batches(dataset: Clips, order: list[int], per_pass: int, workers: int, pin: bool) -> Iterator[tuple]:
    """:func:`collate`d batches of ``per_pass`` clips of ``dataset`` in ``order``, decoded by ``workers``
    processes under :func:`~extract.workers.guarded`'s time limit: a video that hangs its decoder
    or kills its process is a failed clip, and the epoch goes on."""
    def failure(k: int, reason: str) -> tuple:
        return dataset.videos[order[k]].id, None, None, reason

    paths = [dataset.videos[i].path for i in order]
    group = []
    for item in prefetch(guarded(Subset(dataset, order), paths, workers, failure, pin)):
        group.append(item)
        if len(group) == per_pass:
            yield collate(group)
            group = []
    if group:
        yield collate(group)


def evaluate(model: nn.Module, loader: Iterable[tuple], device: torch.device,
             prep: Callable[[torch.Tensor], torch.Tensor],
             failed: dict[str, str], progress: bool) -> tuple[float, float]:
    """Validation ``(mAP, top-1)`` with the project's metrics (sklearn-convention mAP over the classes
    with a positive); videos that do not decode are recorded in ``failed`` and left out."""
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for _, clips, target, bad in tqdm(loader, desc="validate", unit="batch", leave=False, disable=not progress):
            failed.update(bad)
            if clips is None:
                continue
            scores.append(model(prep(clips.to(device, non_blocking=True))).float().softmax(1).cpu().numpy())
            labels.append(target.numpy())
    if not scores:
        return float("nan"), float("nan")
    s, y = np.concatenate(scores), np.concatenate(labels)
    return mean_average_precision(s, y)[0], hit_at_k(s, y, 1)


def carve_validation(videos: list[VideoRecord], seed: int, fraction: float) -> tuple[list, list, str]:
    """``(train, val, what val is)``: the ``val`` split, else a seeded ``fraction`` of train (never test)."""
    train = [v for v in videos if v.split == "train"]
    val = [v for v in videos if v.split == "val"]
    if val or len(train) < 2:
        return train, val, "val"
    order = np.random.default_rng(seed).permutation(len(train))
    cut = max(1, round(fraction * len(train)))
    return [train[i] for i in sorted(order[cut:])], [train[i] for i in sorted(order[:cut])], "carved-from-train"


def finetune(cfg: FinetuneConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Finetune ``cfg.backbone`` on ``cfg.dataset``; returns the best epoch's metrics."""
    cfg = dataclasses.replace(cfg, decoder=resolve_decoder(cfg.decoder))
    distributed.deterministic(cfg.deterministic)
    distributed.allow_tf32(cfg.tf32)
    info, device = distributed.setup(cfg.device)
    ann = load_annotations(cfg.dataset, cfg.annotations, cfg.video_root, cfg.classes or None)
    train_videos, val_videos, val_split = carve_validation(ann.videos, cfg.seed, cfg.val_fraction)
    if not train_videos or not val_videos:
        raise AnnotationError(f"{cfg.dataset}: finetuning needs at least 2 training videos (or train and val); "
                              f"found {len(train_videos)} train and {len(val_videos)} val")
    untrained = sorted(set(range(len(ann.classes))) - {c for v in train_videos for c in v.labels})
    if untrained and info.main:
        names = ", ".join(ann.classes[c] for c in untrained[:5]) + (" ..." if len(untrained) > 5 else "")
        click.echo(f"warning: {len(untrained)} class(es) have no training video ({names}): their classifier rows "
                   "stay untrained; the backbone is trained on the others", err=True)
    segments = cfg.resolved_segments()
    per_pass = max(1, cfg.batch_size // info.world // cfg.accumulate)  # videos per rank and forward pass
    if per_pass * info.world * cfg.accumulate != cfg.batch_size and info.main:
        click.echo(f"warning: --batch-size {cfg.batch_size} does not split into {info.world} rank(s) x "
                   f"accumulate={cfg.accumulate}: each step takes {per_pass * info.world * cfg.accumulate} videos",
                   err=True)
    backbone = create_backbone(cfg.backbone, weights=cfg.init)
    torch.manual_seed(cfg.seed)
    raw_model = TSN(backbone.module, backbone.dim, len(ann.classes), cfg.dropout).to(device)
    raw_model.features.requires_grad_(True)
    if device.type == "cuda":
        raw_model = raw_model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    mean, std = normalisation(backbone.arch.mean, backbone.arch.std, device)

    def prep(clips: torch.Tensor) -> torch.Tensor:
        return prepare(clips, backbone.resolution, mean, std, backbone.arch.interpolation)

    train_set = Clips(train_videos, len(ann.classes), cfg.backbone, segments, train=True, seed=cfg.seed,
                      min_scale=cfg.min_scale, decoder=cfg.decoder)
    val_set = Clips(val_videos, len(ann.classes), cfg.backbone, segments, train=False, decoder=cfg.decoder)
    sampler = DistributedSampler(train_set, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg.seed)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    pin = device.type == "cuda"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    loop = Loop(epochs=cfg.epochs, seed=cfg.seed, best=cfg.out, last=cfg.out + ".last.pt", log=cfg.out + ".log.csv",
                desc=f"finetune {cfg.backbone}", clip_grad=cfg.clip_grad, amp=cfg.amp, accumulate=cfg.accumulate,
                agree_each_step=True,
                meta={"backbone": cfg.backbone, "classes": len(ann.classes), "segments": segments},
                progress=progress)
    failed: dict[str, str] = {}
    frames = [0]

    def batches(epoch: int):
        train_set.epoch = epoch
        sampler.set_epoch(epoch)
        for _, clips, labels, bad in clip_batches(train_set, list(sampler), per_pass, workers, pin):
            failed.update(bad)
            yield None if clips is None else (clips, labels)

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], epoch: int):
        clips, labels = (t.to(device, non_blocking=True) for t in batch)
        frames[0] += clips.shape[0] * clips.shape[1]
        return soft_cross_entropy(model(prep(clips)).float(), labels).mean(), {}

    def on_epoch(epoch: int) -> None:
        frames[0] = 0
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.1 ** sum(epoch >= s for s in cfg.lr_steps)

    def validate(epoch: int, row: dict) -> dict[str, float]:
        val_batches = clip_batches(val_set, list(range(len(val_set))), per_pass, workers, pin)
        val_map, val_top1 = evaluate(raw_model, val_batches, device, prep, failed, progress)
        click.echo(f"epoch {epoch}: val mAP {val_map:.4f}, top-1 {val_top1:.4f} on {len(val_videos)} {val_split} "
                   "videos", err=True)
        rate = frames[0] * info.world / max(row["train_seconds"], 1e-9)
        return {"val_mAP": val_map, "val_top1": val_top1, "train_frames_per_s": rate}

    fitted = fit(loop, raw_model, optimizer, info=info, device=device, batches=batches, step=step,
                 validate=validate, keep=lambda epoch, score: raw_model.features.state_dict(),
                 on_epoch=on_epoch, state=resume_point(loop) if resume else None)
    distributed.teardown(info)
    if info.main:
        for vid, reason in sorted(failed.items())[:20]:
            click.echo(f"failed (skipped): {vid}: {reason}", err=True)
        if len(failed) > 20:
            click.echo(f"... and {len(failed) - 20} more skipped videos", err=True)
    return {"best_val_mAP": fitted.best_mAP, "epochs": fitted.log, "failed": failed}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog="""\b
Examples:
  finetune-backbone --dataset demo --backbone efficientnet_lite0@112 --epochs 3 --batch-size 8
  finetune-backbone --dataset activitynet --backbone resnet50@224      (AR-Net step A-1, then 34@168, 18@112)
  torchrun --standalone --nproc_per_node 4 -m extract.finetune --dataset fcvid --backbone resnet101@224
  extract-features --dataset activitynet --preset arnet --weights finetuned
""")
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), required=True)
@click.option("--backbone", required=True, metavar="ARCH@RES",
              help="One backbone at its own resolution, as extract-features names it (timm:MODEL@RES too).")
@click.option("--annotations", multiple=True, metavar="PATH",
              help="As extract-features (default: data/<dataset>/annotations/).")
@click.option("--video-root", metavar="DIR", help="As extract-features (default: data/<dataset>/videos, data/demo).")
@click.option("--classes", metavar="PATH", help="Class list, for formats whose labels are indices.")
@click.option("--out", metavar="FILE.pt", help="Default: data/weights/<dataset>_<arch>@<res>.pt (what "
                                               "extract-features --weights finetuned reads).")
@click.option("--epochs", type=click.IntRange(1), help="Default 10.")
@click.option("--batch-size", type=click.IntRange(1), help="Videos per step, each --set segments frames. Default 48.")
@click.option("--lr", type=float, help="Default 0.02, x0.1 at --set lr_steps (20,40).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0),
              help="Decoding processes per rank. Default: the cores per rank less one.")
@click.option("--demo-seed", type=int, default=0, show_default=True, help="demo only: the seed of the demo videos.")
@click.option("--decoder", type=click.Choice(["auto", *sorted(DECODERS)]), default="auto", show_default=True,
              help="As extract-features: auto (the fastest here), decord, pyav or torchcodec.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other setting: init, segments, lr_steps, momentum, weight_decay, clip_grad, dropout, "
                   "min_scale, amp, accumulate, val_fraction, seed, deterministic, tf32.")
@click.option("--resume", is_flag=True, help="Continue from OUT.last.pt, the last finished epoch.")
@click.option("--no-progress", is_flag=True)
def main(dataset, backbone, annotations, video_root, classes, out, epochs, batch_size, lr, device, workers, demo_seed,
         decoder, sets, resume, no_progress) -> None:
    """Finetune one ImageNet backbone on a dataset's videos (TSN-style: K segments, average consensus)
    and write its state dict for extract-features --weights."""
    try:
        name = "{}@{}".format(*parse_name(backbone))
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    annotations, video_root = dataset_inputs(dataset, annotations, video_root, demo_seed, not no_progress)
    cfg = FinetuneConfig(dataset=dataset, backbone=name, out=out or finetuned_path(dataset, name),
                         annotations=annotations, video_root=video_root, classes=classes or "", device=device,
                         workers=-1 if workers is None else workers, decoder=decoder)
    named = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    apply_overrides(cfg, tuple(f"{k}={v}" for k, v in named.items() if v is not None) + tuple(sets))
    try:
        result = finetune(cfg, resume=resume, progress=not no_progress)
    except UserError as err:  # one line; anything else is a bug and keeps its traceback
        raise click.ClickException(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{cfg.out}: {cfg.backbone} finetuned on {dataset}, "
                   f"best validation mAP {result['best_val_mAP']:.4f}")


if __name__ == "__main__":
    main()
