"""Methods that pick frames for the expensive model from a cheap look at the video, or stop early
on a fixed order: ListenToLook's image-only variant (Gao et al., CVPR 2020), OCSampler (Lin et al.,
CVPR 2022) and FrameExit (Ghodrati et al., CVPR 2021), on cached features.

As with every method here the backbones are frozen and their features cached: each method
trains its own small modules on them and pays, per video, the cache's GFLOPs for what it read
plus its modules priced like every method's. Action codes: :func:`read_codes`; the steps are the
frames read in the order taken (``step_frame``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import pairwise
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import ConfigError
from extract.training import soft_cross_entropy

from ..data import Batch
from ..ops import (
    frame_mask,
    keep_where,
    label_entropy,
    label_mass,
    per_video_mean,
    price,
    read,
    read_costs,
    read_many,
    real_mask,
    running_mean,
    spread_index,
    step_ce,
    step_loss,
    steps_of,
)
from ..run_folder import ActionCodes
from .base import (
    AFTER_STOP,
    NOT_READ,
    Frames,
    Inference,
    Method,
    Steps,
    TrainConfig,
    read_codes,
    register_method,
    step_inference,
)


@dataclass
class ListenToLookConfig(TrainConfig):
    hidden: int = 512
    frames: int = 10  # frames given the expensive features
    tau: float = 1.0  # Gumbel-softmax temperature of the frame choice


class ListenToLookNet(Steps):
    def __init__(self, fine_dim: int, coarse_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.memory = nn.Linear(coarse_dim, hidden)  # the preview of every frame
        self.query = nn.Linear(hidden, hidden)
        self.lstm = nn.LSTMCell(fine_dim + coarse_dim, hidden)
        self.classifier = nn.Linear(fine_dim, num_classes)  # a frame's prediction from its expensive features


@register_method
class ListenToLook(Method):
    """ListenToLook, image-only (MobileNetV2 preview | ResNet-101 in AR-Net's table): the cheap
    features of every frame are a preview memory; an LSTM queries it ``frames`` times, each time
    picking one frame not picked yet (straight-through Gumbel-softmax in training, argmax at
    inference), reads its expensive features and feeds both back; the prediction averages the
    frame classifier's logits over the picked frames. The original previews audio (the "(IA|R)"
    rows) and trains its backbones; here only the image variant exists, on frozen features."""

    name = "listentolook"
    display = "ListenToLook"
    Config = ListenToLookConfig
    claims_beats_random = True

    @classmethod
    def label(cls, config: dict) -> str:
        return f"{cls.display} (Image, {config['frames']} frames)"

    @property
    def codes(self) -> ActionCodes:
        return read_codes(preview="previewed (cheap features)")

    @staticmethod
    def needs(cfg: TrainConfig) -> list[str]:
        return [cfg.coarse, cfg.fine]

    def build(self) -> nn.Module:
        return ListenToLookNet(self.dims[self.cfg.fine], self.dims[self.cfg.coarse], self.num_classes, self.cfg.hidden)

    @cached_property
    def costs(self) -> tuple[float, float]:
        """GMACs (per previewed frame: cheap backbone + memory; per pick, before attention: expensive
        backbone, LSTM step, query, classifier)."""
        m, dc, df = self.model, self.dims[self.cfg.coarse], self.dims[self.cfg.fine]
        preview = self.flops[self.cfg.coarse] + price(m.memory, 1, dc)
        pick = (self.flops[self.cfg.fine] + price(m.lstm, 1, df + dc) + price(m.query, 1, self.cfg.hidden)
                + price(m.classifier, 1, df))
        return preview, pick

    def rollout(self, model: nn.Module, batch: Batch, hard: bool) -> dict:
        """``logits`` (N, K, C) of each pick, ``frames`` (N, K) picked (-1: no frame left to pick)."""
        fine, length = batch.features[self.cfg.fine], batch.length
        n, steps = len(length), steps_of(batch)
        coarse = batch.features[self.cfg.coarse]
        coarse = coarse if isinstance(coarse, torch.Tensor) else coarse.all_features(self.cfg.coarse)  # every preview
        memory = model.memory(coarse)
        free = real_mask(length, steps)
        h = torch.zeros(n, self.cfg.hidden, device=length.device)
        c = torch.zeros_like(h)
        logits, frames = [], []
        for _ in range(self.cfg.frames):
            has = free.any(1)
            scores = (memory @ model.query(h).unsqueeze(2)).squeeze(2) / self.cfg.hidden ** 0.5
            scores = scores.masked_fill(~free, float("-inf")).masked_fill(~has.unsqueeze(1), 0.0)
            if hard:  # the frame picked, read alone (recognize computes only it)
                weight = F.one_hot(scores.argmax(1), steps).float()
                picked_fine = read(fine, self.cfg.fine, has, scores.argmax(1))
            else:  # straight-through: gradients reach every frame's score
                weight = F.gumbel_softmax(scores, tau=self.cfg.tau, hard=True)
                picked_fine = (weight.unsqueeze(2) * fine).sum(1)
            picked_coarse = (weight.unsqueeze(2) * coarse).sum(1)
            h2, c2 = model.lstm(torch.cat([picked_fine, picked_coarse], 1), (h, c))
            h, c = keep_where(has, (h2, c2), (h, c))
            logits.append(model.classifier(picked_fine))
            frames.append(torch.where(has, weight.argmax(1), -1))
            free = free & ~(weight.detach() > 0.5)
        return {"logits": torch.stack(logits, 1), "frames": torch.stack(frames, 1)}

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """The preview of every frame (one batched pass), then each pick's expensive features only."""
        return self.infer(model, self.lazy_batch(frames, {self.cfg.coarse: frames, self.cfg.fine: frames}))

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(self.rollout, batch, False)
        taken = out["frames"] >= 0
        ce = soft_cross_entropy(running_mean(out["logits"], taken)[:, -1], batch.labels).mean()
        return ce, {"ce": ce.detach()}

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        out = model(self.rollout, batch, True)
        taken = out["frames"] >= 0
        preview, pick = self.costs
        steps = steps_of(batch)
        attention = 2 * steps * self.cfg.hidden / 1e9  # scores over every frame and the weighted sums
        cost = taken * (pick + attention)
        cost[:, 0] += batch.length.to(cost) * preview
        return step_inference(running_mean(out["logits"], taken).softmax(-1), out["frames"], cost, batch.length, steps,
                              preview=real_mask(batch.length, steps))


@dataclass
class OCSamplerConfig(TrainConfig):
    hidden: int = 512
    frames: int = 5  # K frames picked in one step for the expensive model (the published 10to5 setting)
    warmup_epochs: int = 10  # first the classifier on every frame's expensive features, then it is frozen


class OCSamplerNet(Steps):
    def __init__(self, fine_dim: int, coarse_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.frame = nn.Linear(coarse_dim, hidden)
        self.context = nn.Linear(coarse_dim, hidden)  # the video's mean cheap feature
        self.score = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(fine_dim, num_classes)


@register_method
class OCSampler(Method):
    """OCSampler: the cheap features of every candidate frame, each with the video's mean as
    context, give one score per frame; the top ``frames`` (in training, K drawn without
    replacement by Gumbel top-K, Plackett-Luce log-probability) go to the expensive model, a frame
    classifier trained first on every frame (``warmup_epochs``) and then frozen, whose averaged
    prediction's probability on the labels is the reward; the greedy top-K's reward is the
    baseline (self-critical REINFORCE). The original's adaptive-K variant is not offered."""

    name = "ocsampler"
    display = "OCSampler"
    Config = OCSamplerConfig
    claims_beats_random = True

    @classmethod
    def label(cls, config: dict) -> str:
        return f"{cls.display} ({config['frames']} frames)"

    @property
    def codes(self) -> ActionCodes:
        return read_codes(preview="scored (cheap features)")

    @staticmethod
    def needs(cfg: TrainConfig) -> list[str]:
        return [cfg.coarse, cfg.fine]

    def build(self) -> nn.Module:
        return OCSamplerNet(self.dims[self.cfg.fine], self.dims[self.cfg.coarse], self.num_classes, self.cfg.hidden)

    def on_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        for p in self.model.classifier.parameters():
            p.requires_grad_(epoch < self.cfg.warmup_epochs)

    def selectable(self, epoch: int) -> bool:
        return epoch >= min(self.cfg.warmup_epochs, self.cfg.epochs - 1)

    def scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(N, T) each frame's score, -inf past the video's length."""
        coarse = batch.features[self.cfg.coarse]
        real = real_mask(batch.length, coarse.shape[1])
        mean = (coarse * real.unsqueeze(2)).sum(1) / batch.length.clamp(min=1).unsqueeze(1).to(coarse)
        hidden = torch.relu(model.frame(coarse) + model.context(mean).unsqueeze(1))
        return model.score(hidden).squeeze(2).masked_fill(~real, float("-inf"))

    def pick(self, scores: torch.Tensor, length: torch.Tensor, noise: bool) -> torch.Tensor:
        """(N, K) frames in the order picked, -1 where a video has fewer than K."""
        k = min(self.cfg.frames, scores.shape[1])
        keyed = scores - torch.log(-torch.log(torch.rand_like(scores).clamp(1e-9, 1 - 1e-9))) if noise else scores
        frames = keyed.topk(k, dim=1).indices
        frames = torch.where(torch.arange(k, device=scores.device).unsqueeze(0) < length.unsqueeze(1), frames, -1)
        if k < self.cfg.frames:
            frames = F.pad(frames, (0, self.cfg.frames - k), value=-1)
        return frames

    @staticmethod
    def log_prob(scores: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(N,) Plackett-Luce log-probability of drawing ``frames`` in that order without replacement."""
        left = scores.clone()
        total = torch.zeros_like(scores[:, 0])
        for k in range(frames.shape[1]):
            valid = frames[:, k] >= 0
            at = frames[:, k].clamp(min=0)
            safe = left.masked_fill(~valid.unsqueeze(1), 0.0)  # a video with no frame left adds nothing (and no NaN)
            term = safe.gather(1, at.unsqueeze(1)).squeeze(1) - torch.logsumexp(safe, 1)
            total = total + term * valid
            left = left.scatter(1, at.unsqueeze(1), float("-inf"))
        return total

    def frame_logits(self, model: nn.Module, batch: Batch, frames: torch.Tensor) -> torch.Tensor:
        return model.classifier(read_many(batch.features[self.cfg.fine], self.cfg.fine, frames.clamp(min=0)))

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if epoch < self.cfg.warmup_epochs:
            fine = batch.features[self.cfg.fine]
            taken = real_mask(batch.length, fine.shape[1])
            ce = step_loss(model(lambda net: net.classifier(fine)), batch.labels, taken.to(fine))
            return ce, {"ce": ce.detach()}
        loss, rewards = model(self.policy_loss, batch)
        return loss, {"reward": rewards[0].mean(), "greedy_reward": rewards[1].mean()}

    def policy_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Self-critical REINFORCE: ``(loss, [reward of the drawn K, reward of the greedy K])``."""
        scores = self.scores(model, batch)
        drawn, greedy = self.pick(scores, batch.length, True), self.pick(scores.detach(), batch.length, False)
        with torch.no_grad():
            rewards = [label_mass(running_mean(self.frame_logits(model, batch, f), f >= 0)[:, -1].softmax(-1),
                                  batch.labels) for f in (drawn, greedy)]
        return -((rewards[0] - rewards[1]) * self.log_prob(scores, drawn)).mean(), rewards

    @cached_property
    def costs(self) -> tuple[float, float, float]:
        """GMACs (per scored frame: cheap backbone + frame scorer; per video: the context; per pick:
        expensive backbone + classifier)."""
        m, dc = self.model, self.dims[self.cfg.coarse]
        scored = self.flops[self.cfg.coarse] + price(m.frame, 1, dc) + price(m.score, 1, self.cfg.hidden)
        pick = self.flops[self.cfg.fine] + price(m.classifier, 1, self.dims[self.cfg.fine])
        return scored, price(m.context, 1, dc), pick

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """The cheap features of every frame, the scores, then the expensive features of the K
        picked frames only (``budget`` does not apply: K is its budget)."""
        c = self.cfg
        coarse = frames.all_features(c.coarse)
        picked = self.pick(model(self.scores, self.lazy_batch(frames, {c.coarse: coarse, c.fine: None})),
                           frames.length, False)
        fine = frames.all_features(c.fine, frame_mask(picked, frames.steps))
        return self.infer(model, self.lazy_batch(frames, {c.coarse: coarse, c.fine: fine}))

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        frames = self.pick(model(self.scores, batch), batch.length, False)
        taken = frames >= 0
        scored, context, pick = self.costs
        cost = taken * pick
        cost[:, 0] += batch.length.to(cost) * scored + context
        steps = batch.features[self.cfg.fine].shape[1]
        probs = running_mean(model(self.frame_logits, batch, frames), taken).softmax(-1)
        return step_inference(probs, frames, cost, batch.length, steps, preview=real_mask(batch.length, steps))


# The official FrameExit code's reading order of its 10 uniformly sampled frames (its training and
# inference scripts both index the clip with it)
FRAMEEXIT_ORDER = (5, 0, 9, 2, 7, 4, 6, 3, 8, 1)


@lru_cache(maxsize=None)
def coarse_to_fine(n: int) -> tuple[int, ...]:
    """Our coarse-to-fine order of ``n`` frames (0-based): the middle, the first, the last, then the
    midpoints of ever finer equal parts. Our reading of the paper's description; on 10 frames it is
    not the official code's order (``FRAMEEXIT_ORDER``)."""
    order = list(dict.fromkeys([(n + 1) // 2 - 1, 0, n - 1])) if n > 0 else []
    seen, parts = set(order), 2
    while len(order) < n:
        bounds = np.floor(np.linspace(1, n, parts + 1)).astype(int)
        for a, b in pairwise(bounds):
            middle = int(a + b) // 2 - 1
            if middle not in seen:
                seen.add(middle)
                order.append(middle)
        parts *= 2
    return tuple(order)


@lru_cache(maxsize=None)
def reading_orders(steps: int, frames: int) -> torch.Tensor:
    """(steps + 1, frames) row ``n``: the first ``frames`` of :func:`coarse_to_fine` (``n``), -1 past
    its end; a batch's orders are rows of it, found on the device without reading lengths back."""
    rows = [list(coarse_to_fine(n)[:frames]) for n in range(steps + 1)]
    return torch.tensor([r + [-1] * (frames - len(r)) for r in rows])


@dataclass
class FrameExitConfig(TrainConfig):
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "order")

    hidden: int = 512
    max_frames: int = 10  # frames read at most
    # official: max_frames frames spread uniformly, read in FRAMEEXIT_ORDER (coarse_to_fine of them
    # when max_frames is not 10); coarse-to-fine: ours, every cached frame in coarse_to_fine's order
    order: str = "official"
    pooling: str = "max"  # accumulated feature pooling: max | mean
    epsilon: float = 0.1  # a gate's target is 1 (exit) where its step's CE - H(labels) (the KL) is below this
    gate_weight: float = 1.0


class FrameExitNet(Steps):
    def __init__(self, dim: int, num_classes: int, hidden: int, steps: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)
        self.gates = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(steps))  # one per step (a cascade)


@register_method
class FrameExit(Method):
    """FrameExit: ``max_frames`` frames spread uniformly over the video, read in the official code's
    order (``FRAMEEXIT_ORDER``; ``order=coarse-to-fine``: every cached frame in :func:`coarse_to_fine`'s
    order); their expensive features, embedded, are pooled over the frames read so far (max, or
    mean); a frame read twice (a video shorter than ``max_frames``) is computed once; one classifier on
    the pooled feature, and a gate per step that exits at the first step whose gate fires (at most
    ``max_frames``). Training: cross-entropy at every step plus each gate's binary cross-entropy
    against its on-the-fly target, 1 where that step's cross-entropy, less the entropy of the
    video's normalised labels (so the KL divergence to them, which a perfect prediction brings to 0
    on any label set: a 2-label video's cross-entropy is at least log 2), is below ``epsilon``. The
    original trains its backbone end to end; here the backbone is frozen (its cached features),
    and a gate reads the pooled feature only."""

    name = "frameexit"
    display = "FrameExit"
    Config = FrameExitConfig
    stops_at_budget = True
    stops_early = True
    claims_beats_random = True

    @property
    def codes(self) -> ActionCodes:
        return read_codes(stops=True)

    def build(self) -> nn.Module:
        if self.cfg.pooling not in ("max", "mean"):
            raise ConfigError(f"pooling must be max or mean, not {self.cfg.pooling!r}")
        return FrameExitNet(self.dims[self.cfg.fine], self.num_classes, self.cfg.hidden, self.cfg.max_frames)

    @cached_property
    def step_costs(self) -> float:
        """GMACs of one step: the expensive backbone, the embedding, the classifier and a gate."""
        m, hidden = self.model, self.cfg.hidden
        return (self.flops[self.cfg.fine] + price(m.embed, 1, self.dims[self.cfg.fine])
                + price(m.classifier, 1, hidden) + price(m.gates[0], 1, hidden))

    def order(self, length: torch.Tensor, steps: int) -> torch.Tensor:
        """(N, S) the frames of each video (at most ``steps``) in reading order, -1 past its length
        (S = ``max_frames``)."""
        k = self.cfg.max_frames
        if self.cfg.order == "coarse-to-fine":
            return reading_orders(steps, k).to(length.device)[length]
        sequence = list(FRAMEEXIT_ORDER if k == len(FRAMEEXIT_ORDER) else coarse_to_fine(k))
        return torch.where((length > 0).unsqueeze(1), spread_index(length, k)[:, sequence], -1)

    def rollout(self, model: nn.Module, batch: Batch, exits: bool, budget: int = 0) -> dict:
        """Frames in its order, one step at a time: a step's expensive features, embedded and pooled
        with those read before, the classifier and the step's gate; with ``exits`` a video stops at
        the first step whose gate fires (or its ``budget``-th read), else (training) every step is
        taken. ``logits`` (N, S, C), gate logits ``gates`` (N, S), ``frames`` (N, S) read at each
        step, -1 once stopped. The one rollout of training, inference and ``recognize``."""
        c, length = self.cfg, batch.length
        order = self.order(length, steps_of(batch))
        alive = length > 0
        total = count = None
        out: dict[str, list] = {"logits": [], "gates": [], "frames": []}
        for s in range(order.shape[1]):
            rows = alive & (order[:, s] >= 0)
            x = model.embed(read(batch.features[c.fine], c.fine, rows, order[:, s].clamp(min=0)))
            if total is None:
                total, count = x, rows.long()
            else:
                total = torch.where(rows.unsqueeze(1), x.maximum(total) if c.pooling == "max" else total + x, total)
                count = count + rows.long()
            pooled = total if c.pooling == "max" else total / count.clamp(min=1).unsqueeze(1)
            pooled = torch.where(rows.unsqueeze(1), pooled, 0.0)
            gate = model.gates[s](pooled).squeeze(1)
            out["logits"].append(model.classifier(pooled))
            out["gates"].append(gate)
            out["frames"].append(torch.where(rows, order[:, s], -1))
            if exits:
                last = order[:, s + 1] < 0 if s + 1 < order.shape[1] else True
                alive = rows & ~((gate > 0) | last | (s + 1 == budget))
        return {k: torch.stack(v, 1) for k, v in out.items()}

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(self.rollout, batch, False)
        taken = (out["frames"] >= 0).to(out["logits"])
        ce = step_ce(out["logits"], batch.labels)
        target = self.exit_targets(ce.detach(), batch.labels)
        gate = F.binary_cross_entropy_with_logits(out["gates"], target, reduction="none")
        per_video = per_video_mean(ce + self.cfg.gate_weight * gate, taken)
        return per_video.mean(), {"ce": per_video_mean(ce, taken).mean().detach(),
                                  "exit_target": (target * taken).sum() / taken.sum().clamp(min=1)}

    def exit_targets(self, ce: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, S) 1.0 where a step's prediction is good enough to exit: its cross-entropy ``ce`` (N, S)
        less the entropy of the video's normalised ``labels`` (N, C), the KL divergence, below ``epsilon``."""
        return (ce - label_entropy(labels).unsqueeze(1) < self.cfg.epsilon).to(ce)

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """:meth:`infer` itself, each step's expensive features computed for the videos still going."""
        return self.infer(model, self.lazy_batch(frames, {self.cfg.fine: frames}), budget)

    def infer(self, model: nn.Module, batch: Batch, budget: int = 0) -> Inference:
        """The rollout, exiting at the first gate that fires; ``budget`` K caps the reads at K."""
        out = model(self.rollout, batch, True, budget)
        frames = out["frames"]
        backbone = self.flops[self.cfg.fine]
        cost = read_costs(frames, self.step_costs - backbone, backbone)
        inf = step_inference(out["logits"].softmax(-1), frames, cost, batch.length, steps_of(batch))
        inf.actions[inf.actions == NOT_READ] = AFTER_STOP  # every frame not read comes after the exit in its order
        return inf
