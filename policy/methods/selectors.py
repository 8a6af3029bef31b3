"""Methods that pick frames for the expensive model from a cheap look at the video, or stop early
on a fixed order: ListenToLook's image-only variant (Gao et al., CVPR 2020), OCSampler (Lin et al.,
CVPR 2022) and FrameExit (Ghodrati et al., CVPR 2021), on cached features.

As with every method here the backbones are frozen and their features cached: each method
trains its own small modules on them and pays, per video, the cache's GFLOPs for what it read
plus its modules priced like every method's. Action codes: :func:`read_codes`; the steps are the
frames read in the order taken (``step_frame``).
"""
from __future__ import annotations

import itertools
import math
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
    embedding,
    first_reads,
    frame_mask,
    keep_where,
    label_entropy,
    on_rows,
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
    hidden: int = 1024
    frames: int = 10  # frames given the expensive features (the episode's steps)


KEY_WIDTH = 512  # ListenToLook's attention: query and keys of 512


class ListenToLookNet(Steps):
    def __init__(self, fine_dim: int, coarse_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.keys = nn.Sequential(nn.Linear(coarse_dim, KEY_WIDTH), nn.ReLU())  # the preview memory's keys
        self.query = nn.Linear(hidden, KEY_WIDTH)
        self.lstm = nn.LSTMCell(coarse_dim, hidden)
        self.attended_classifier = nn.Linear(coarse_dim, num_classes)  # trains the attention (not run at inference)
        self.classifier = nn.Linear(fine_dim, num_classes)  # a frame's prediction from its expensive features


@register_method
class ListenToLook(Method):
    """ListenToLook, image-only (MobileNetV2 preview | ResNet-101 in AR-Net's table), as its official
    code: the cheap features of every frame are a preview memory; an LSTM, fed first the memory's
    mean, queries it ``frames`` times; each time the softmax attention over the frames not yet
    picked gives the LSTM's next input (the attention-weighted memory) and its argmax the frame
    picked. Training: the cross-entropy of a classifier on the mean of the attended memories
    (soft attention end to end; nothing sampled), and the frame classifier's on every frame's
    expensive features (the original's is its pretrained clip network). Prediction: the frame
    classifier's logits averaged over the picked frames, whose expensive features alone are
    computed. The original previews audio (the "(IA|R)" rows) and trains its backbones; here only
    the image variant exists, on frozen features."""

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
    def costs(self) -> tuple[float, float, float, float]:
        """GMACs (per previewed frame: cheap backbone + key; per step: LSTM + query; per step and
        previewed frame: its attention score and its share of the weighted memory; per pick: the
        frame classifier, the expensive backbone apart)."""
        m, dc = self.model, self.dims[self.cfg.coarse]
        preview = self.flops[self.cfg.coarse] + price(m.keys, 1, dc)
        step = price(m.lstm, 1, dc) + price(m.query, 1, self.cfg.hidden)
        return preview, step, (KEY_WIDTH + dc) / 1e9, price(m.classifier, 1, self.dims[self.cfg.fine])

    def rollout(self, model: nn.Module, batch: Batch) -> dict:
        """``attended`` (N, K, D) the attention-weighted memory of each step, ``frames`` (N, K) picked
        (-1: no frame left to pick)."""
        length = batch.length
        coarse = batch.features[self.cfg.coarse]
        coarse = coarse if isinstance(coarse, torch.Tensor) else coarse.all_features(self.cfg.coarse)  # every preview
        free = real_mask(length, coarse.shape[1])
        keys = model.keys(coarse)
        x = (coarse * free.unsqueeze(2)).sum(1) / length.clamp(min=1).unsqueeze(1).to(coarse)  # the memory's mean
        h = torch.zeros(len(length), self.cfg.hidden, device=length.device)
        c = torch.zeros_like(h)
        attended, frames = [], []
        for _ in range(self.cfg.frames):
            has = free.any(1)
            h, c = keep_where(has, model.lstm(x, (h, c)), (h, c))
            scores = (keys @ model.query(h).unsqueeze(2)).squeeze(2) / KEY_WIDTH ** 0.5
            scores = scores.masked_fill(~free, float("-inf")).masked_fill(~has.unsqueeze(1), 0.0)
            pick = scores.argmax(1)
            x = (scores.softmax(1).unsqueeze(2) * coarse).sum(1)
            attended.append(x)
            frames.append(torch.where(has, pick, -1))
            free = free & ~F.one_hot(pick, coarse.shape[1]).bool()
        return {"attended": torch.stack(attended, 1), "frames": torch.stack(frames, 1)}

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """The preview of every frame (one batched pass), then each pick's expensive features only."""
        return self.infer(model, self.lazy_batch(frames, {self.cfg.coarse: frames, self.cfg.fine: frames}))

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        attention, frame = model(self.objectives, batch)
        return attention + frame, {"ce": attention.detach(), "frame_ce": frame.detach()}

    def objectives(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the attention's cross-entropy, the frame classifier's)``, in one pass of the model."""
        out = self.rollout(model, batch)
        taken = (out["frames"] >= 0).unsqueeze(2).to(out["attended"])
        pooled = (out["attended"] * taken).sum(1) / taken.sum(1).clamp(min=1)
        fine = batch.features[self.cfg.fine]
        return (soft_cross_entropy(model.attended_classifier(pooled), batch.labels).mean(),
                step_loss(model.classifier(fine), batch.labels, real_mask(batch.length, fine.shape[1]).to(fine)))

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        out = model(self.rollout, batch)
        frames = out["frames"]
        taken = frames >= 0
        logits = model.classifier(read_many(batch.features[self.cfg.fine], self.cfg.fine, frames.clamp(min=0)))
        preview, step, attention, pick = self.costs
        steps = steps_of(batch)
        cost = taken * (step + batch.length.unsqueeze(1).to(logits) * attention + pick + self.flops[self.cfg.fine])
        cost[:, 0] += batch.length.to(cost) * preview
        return step_inference(running_mean(logits, taken).softmax(-1), frames, cost, batch.length, steps,
                              preview=real_mask(batch.length, steps))


@dataclass
class OCSamplerConfig(TrainConfig):
    hidden: int = 4096  # the classifier's embedding width (FrameExit's head)
    scorer: int = 512  # the frame scorer's hidden units
    # N candidates: the centres of N equal segments (in training a random frame of each, TSN's sampling);
    # 0: every cached frame (ours)
    candidates: int = 10
    frames: int = 5  # K of the candidates picked in one step for the expensive model (the published 10to5)
    warmup_epochs: int = 10  # first the classifier, on K random candidates, then it is frozen
    # the official configs set 0.1 and a parameter hook resets it to 0 before every iteration: 0 is what trained
    entropy: float = 0.0


class OCSamplerNet(Steps):
    def __init__(self, fine_dim: int, coarse_dim: int, num_classes: int, hidden: int, scorer: int):
        super().__init__()
        self.frame = nn.Linear(coarse_dim, scorer)
        self.context = nn.Linear(coarse_dim, scorer)  # the candidates' mean cheap feature
        self.score = nn.Linear(scorer, 1)
        self.embed = embedding(fine_dim, hidden)  # the classifier: FrameExit's, max-pooled over the picks
        self.classifier = nn.Linear(hidden, num_classes)


@register_method
class OCSampler(Method):
    """OCSampler: ``candidates`` N frames spread uniformly over the video; the cheap features of
    each, with the candidates' mean as context, give one score per candidate, and a softmax over
    them is the policy; ``frames`` K of them (at inference the top K, in training K drawn without
    replacement) go to the expensive model in one step. The classifier is FrameExit's head (an
    embedding, max-pooled over the K frames, a linear layer), trained first (``warmup_epochs``, on K
    random candidates) and then frozen. REINFORCE with the official code's label-free reward: the
    top class's probability on the drawn K less that on K candidates spread uniformly (TSN's
    sampling, the baseline); the log-probability is the unordered set's (the sum over its K!
    orders). The original's skim network is a MobileNetV2 with temporal shifts, trained; here the
    cheap features are frozen, so a small scorer with the mean as context reads them. The original's
    adaptive-K variant is not offered."""

    name = "ocsampler"
    display = "OCSampler"
    Config = OCSamplerConfig
    claims_beats_random = True

    @classmethod
    def label(cls, config: dict) -> str:
        return f"{cls.display} (K={config['frames']} of {config.get('candidates', 0) or 'all'})"

    @property
    def codes(self) -> ActionCodes:
        return read_codes(preview="scored (cheap features)")

    @staticmethod
    def needs(cfg: TrainConfig) -> list[str]:
        return [cfg.coarse, cfg.fine]

    def build(self) -> nn.Module:
        if self.cfg.frames > 8:
            raise ConfigError(f"frames={self.cfg.frames}: OCSampler picks at most 8 (the probability of a set of K "
                              "sums its K! orders, as the official code)")
        c = self.cfg
        return OCSamplerNet(self.dims[c.fine], self.dims[c.coarse], self.num_classes, c.hidden, c.scorer)

    def on_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        for module in (self.model.embed, self.model.classifier):
            module.requires_grad_(epoch < self.cfg.warmup_epochs)

    def selectable(self, epoch: int) -> bool:
        return epoch >= min(self.cfg.warmup_epochs, self.cfg.epochs - 1)

    def candidates(self, length: torch.Tensor, steps: int, draw: bool) -> torch.Tensor:
        """(N, M) each video's candidate frames, -1 for none: N (``candidates``) segment centres, or
        with ``draw`` a random frame of each segment; M = T, every frame, when ``candidates`` is 0."""
        n = self.cfg.candidates
        if n == 0:
            frames = torch.arange(steps, device=length.device).expand(len(length), steps)
            return torch.where(real_mask(length, steps), frames, -1)
        if draw:
            start = (length.double().unsqueeze(1) / n * torch.arange(n, device=length.device)).long()
            size = (length.double().unsqueeze(1) / n * torch.arange(1, n + 1, device=length.device)).long() - start
            offset = (torch.rand(start.shape, device=length.device) * size.clamp(min=1)).long()
            frames = (start + offset).clamp(max=(length.clamp(min=1) - 1).unsqueeze(1))
        else:
            frames = spread_index(length, n)
        return torch.where((length > 0).unsqueeze(1), frames, -1)

    def scores(self, model: nn.Module, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
        """(N, M) each candidate's score, -inf where there is none."""
        coarse = read_many(batch.features[self.cfg.coarse], self.cfg.coarse, candidates.clamp(min=0))
        real = candidates >= 0
        mean = (coarse * real.unsqueeze(2)).sum(1) / real.sum(1).clamp(min=1).unsqueeze(1).to(coarse)
        hidden = torch.relu(model.frame(coarse) + model.context(mean).unsqueeze(1))
        return model.score(hidden).squeeze(2).masked_fill(~real, float("-inf"))

    def pick(self, scores: torch.Tensor, noise: bool) -> torch.Tensor:
        """(N, K) the candidates picked (positions in the candidates): the top K in their order
        over time, or with ``noise`` K drawn without replacement from the softmax (Gumbel top-K);
        -1 where a video has fewer than K."""
        k = min(self.cfg.frames, scores.shape[1])
        keyed = scores - torch.log(-torch.log(torch.rand_like(scores).clamp(1e-9, 1 - 1e-9))) if noise else scores
        top = keyed.topk(k, dim=1)
        picked = torch.where(top.values > float("-inf"), top.indices, -1)
        if not noise:  # in time order (the candidates are); none (-1) last
            picked = torch.where(picked >= 0, picked, scores.shape[1]).sort(1).values
            picked = torch.where(picked < scores.shape[1], picked, -1)
        return F.pad(picked, (0, self.cfg.frames - k), value=-1)

    @staticmethod
    def log_prob(scores: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """(N,) the log-probability of drawing the set ``picked`` (N, K; -1: none) without replacement
        from ``softmax(scores)``: the sum over its K! orders of each order's probability."""
        valid = picked >= 0
        logp = scores.log_softmax(1).gather(1, picked.clamp(min=0)).masked_fill(~valid, 0.0)
        orders = torch.tensor(list(itertools.permutations(range(picked.shape[1]))), device=scores.device)
        mass = logp.exp().masked_fill(~valid, 0.0)[:, orders]  # (N, K!, K) in each order
        drawn = mass.cumsum(2) - mass  # the mass drawn before each
        each = logp.sum(1, keepdim=True) - (torch.log1p(-drawn.clamp(max=1 - 1e-6)) * valid[:, orders]).sum(2)
        # each order of the drawn entries appears K! / (K - m)! times, the m missing ones anywhere (they add nothing)
        k, drawn_count = picked.shape[1], valid.sum(1)
        return torch.logsumexp(each, 1) - (math.lgamma(k + 1) - torch.lgamma(drawn_count + 1.0))

    def classify(self, model: nn.Module, batch: Batch, frames: torch.Tensor) -> torch.Tensor:
        """(N, K, C) the classifier's logits after each of ``frames`` (N, K; -1: none): their
        embeddings max-pooled up to it."""
        fine = read_many(batch.features[self.cfg.fine], self.cfg.fine, frames.clamp(min=0))
        pooled = on_rows(model.embed, fine, frames >= 0).cummax(1).values
        return model.classifier(pooled)

    @staticmethod
    def frames_of(candidates: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """(N, K) the frames of the candidates ``picked`` (positions, -1: none)."""
        return torch.where(picked >= 0, candidates.gather(1, picked.clamp(min=0)), -1)

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        candidates = self.candidates(batch.length, steps_of(batch), True)
        if epoch < self.cfg.warmup_epochs:  # the classifier on K candidates drawn uniformly
            uniform = torch.zeros(candidates.shape, device=candidates.device).masked_fill(candidates < 0, float("-inf"))
            frames = self.frames_of(candidates, self.pick(uniform, True))
            ce = soft_cross_entropy(model(self.classify, batch, frames)[:, -1], batch.labels).mean()
            return ce, {"ce": ce.detach()}
        self.model.embed.eval()  # frozen: its BatchNorm keeps its statistics
        loss, rewards = model(self.policy_loss, batch, candidates)
        return loss, {"reward": rewards[0].mean(), "baseline_reward": rewards[1].mean()}

    def policy_loss(self, model: nn.Module, batch: Batch, candidates: torch.Tensor
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """REINFORCE: ``(loss, [reward of the drawn K, reward of the baseline K])``; a reward is the top
        class's probability (no labels); the baseline's K are spread uniformly over the candidates."""
        scores = self.scores(model, batch, candidates)
        count = (candidates >= 0).sum(1)
        uniform = torch.where((count > 0).unsqueeze(1), spread_index(count, self.cfg.frames), -1)
        drawn = self.pick(scores, True)
        with torch.no_grad():
            rewards = [self.classify(model, batch, self.frames_of(candidates, p))[:, -1].softmax(-1).amax(-1)
                       for p in (drawn, uniform)]
        probs, logs = scores.softmax(1), scores.log_softmax(1).masked_fill(candidates < 0, 0.0)
        entropy = -(probs * logs).sum(1)
        return -((rewards[0] - rewards[1]) * self.log_prob(scores, drawn) + self.cfg.entropy * entropy).mean(), rewards

    @cached_property
    def costs(self) -> tuple[float, float, float, float]:
        """GMACs (the cheap backbone on a distinct candidate; the scorer per candidate; per video: the
        context and the classifier's last layer; per pick: the embedding (the expensive backbone on a
        distinct frame apart))."""
        m, c = self.model, self.cfg
        dc = self.dims[c.coarse]
        scorer = price(m.frame, 1, dc) + price(m.score, 1, c.scorer)
        video = price(m.context, 1, dc) + price(m.classifier, 1, c.hidden)
        return self.flops[c.coarse], scorer, video, price(m.embed, 1, self.dims[c.fine])

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """The candidates' cheap features (one batched pass), the scores, then the expensive features
        of the K picked frames only (``budget`` does not apply: K is its budget)."""
        return self.infer(model, self.lazy_batch(frames, {self.cfg.coarse: frames, self.cfg.fine: frames}))

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        steps = steps_of(batch)
        candidates = self.candidates(batch.length, steps, False)
        frames = self.frames_of(candidates, self.pick(model(self.scores, batch, candidates), False))
        cheap, scorer, video, embed = self.costs
        cost = read_costs(frames, embed, self.flops[self.cfg.fine])
        cost[:, 0] += first_reads(candidates).sum(1) * cheap + (candidates >= 0).sum(1) * scorer + video
        probs = model(self.classify, batch, frames).softmax(-1)
        return step_inference(probs, frames, cost, batch.length, steps, preview=frame_mask(candidates, steps))


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
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "order", "pooling")

    hidden: int = 4096  # the embedding's width (Linear, BatchNorm, ReLU on a frame's expensive features)
    max_frames: int = 10  # frames read at most
    # official: max_frames frames spread uniformly, read in FRAMEEXIT_ORDER (coarse_to_fine of them
    # when max_frames is not 10); coarse-to-fine: ours, every cached frame in coarse_to_fine's order
    order: str = "official"
    pooling: str = "max"  # accumulated feature pooling: max (the original) | mean
    # step 0 exits when its top softmax exceeds this (the official configs: 0.99 ActivityNet, 0.95 Mini-Kinetics)
    first_threshold: float = 0.99
    epsilon: float = 0.1  # a gate's target is 1 (exit) where its step's CE - H(labels) (the KL) is below this
    gate_weight: float = 1.0


GATE_WIDTH = 128  # the official gate: a shared body 4096 -> 128 -> 64 on z_t and on z_t-1, a linear layer on the 128


class FrameExitNet(Steps):
    def __init__(self, dim: int, num_classes: int, hidden: int, steps: int):
        super().__init__()
        self.embed = embedding(dim, hidden)
        self.classifiers = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in range(steps))  # one per step
        self.gate_body = nn.Sequential(nn.Linear(hidden, GATE_WIDTH), nn.ReLU(),
                                       nn.Linear(GATE_WIDTH, GATE_WIDTH // 2), nn.ReLU())
        # steps 1 .. steps - 2 (step 0 exits on confidence, the last step always)
        self.gates = nn.ModuleList(nn.Linear(GATE_WIDTH, 1) for _ in range(max(steps - 2, 0)))


@register_method
class FrameExit(Method):
    """FrameExit as its official inference code: ``max_frames`` frames spread uniformly over the
    video, read in its order (``FRAMEEXIT_ORDER``; ``order=coarse-to-fine``: every cached frame in
    :func:`coarse_to_fine`'s order); a frame's expensive features embedded (Linear, BatchNorm,
    ReLU to ``hidden`` = 4096), max-pooled over the frames read so far (accumulated feature pooling;
    ``pooling=mean``); one classifier per step on the pooled feature. Step 0 exits when its top
    softmax exceeds ``first_threshold``; steps 1 to ``max_frames`` - 2 exit when their gate fires
    (a gate reads the pooled feature now and one step before, each through a shared body); the
    last step always exits. A frame read twice (a video shorter than ``max_frames``) is computed
    once. Training: cross-entropy at every step plus each gate's binary cross-entropy against its
    on-the-fly target, 1 where that step's cross-entropy, less the entropy of the video's
    normalised labels (so the KL divergence to them, which a perfect prediction brings to 0 on any
    label set: a 2-label video's cross-entropy is at least log 2), is below ``epsilon``. The
    original trains its backbone end to end; here it is frozen (its cached features)."""

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
    def module_costs(self) -> torch.Tensor:
        """(max_frames,) GMACs of FrameExit's own modules at each step: the embedding and the step's
        classifier; a gate's body on the pooled feature and the gate (steps 1 to ``max_frames`` - 2;
        step 1 also the body on step 0's pooled feature, which had no gate)."""
        m, hidden, steps = self.model, self.cfg.hidden, self.cfg.max_frames
        costs = torch.full((steps,), price(m.embed, 1, self.dims[self.cfg.fine]) + price(m.classifiers[0], 1, hidden),
                           dtype=torch.float64)
        if m.gates:
            body, gate = price(m.gate_body, 1, hidden), price(m.gates[0], 1, GATE_WIDTH)
            costs[1:steps - 1] += body + gate
            costs[1] += body
        return costs

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
        with those read before, the step's classifier and its exit rule; with ``exits`` a video
        stops at the first step that exits (or its ``budget``-th read), else (training) every step
        is taken. ``logits`` (N, S, C), gate logits ``gates`` (N, S; 0 where a step has no gate),
        ``frames`` (N, S) read at each step, -1 once stopped. The one rollout of training,
        inference and ``recognize``."""
        c, length, fine = self.cfg, batch.length, batch.features[self.cfg.fine]
        order = self.order(length, steps_of(batch))
        if model.training:  # every frame at once: BatchNorm's statistics over all the frames the batch reads
            embedded = on_rows(model.embed, read_many(fine, c.fine, order.clamp(min=0)), order >= 0)
        alive = length > 0
        total = count = body = None
        out: dict[str, list] = {"logits": [], "gates": [], "frames": []}
        for s in range(order.shape[1]):
            rows = alive & (order[:, s] >= 0)
            x = embedded[:, s] if model.training else model.embed(read(fine, c.fine, rows, order[:, s].clamp(min=0)))
            if total is None:
                total, count = x, rows.long()
            else:
                total = torch.where(rows.unsqueeze(1), x.maximum(total) if c.pooling == "max" else total + x, total)
                count = count + rows.long()
            pooled = total if c.pooling == "max" else total / count.clamp(min=1).unsqueeze(1)
            pooled = torch.where(rows.unsqueeze(1), pooled, 0.0)
            logits = model.classifiers[s](pooled)
            gate = torch.zeros_like(logits[:, 0])
            if 0 < s <= len(model.gates):
                now = model.gate_body(pooled)
                gate = model.gates[s - 1](torch.cat([now, body], 1)).squeeze(1)
                body = now
            elif s == 0 and len(model.gates):
                body = model.gate_body(pooled)  # step 1's gate also reads it (priced at step 1)
            out["logits"].append(logits)
            out["gates"].append(gate)
            out["frames"].append(torch.where(rows, order[:, s], -1))
            if exits:
                last = order[:, s + 1] < 0 if s + 1 < order.shape[1] else True
                fires = logits.softmax(-1).amax(-1) > c.first_threshold if s == 0 else gate > 0
                alive = rows & ~(fires | last | (s + 1 == budget))
        return {k: torch.stack(v, 1) for k, v in out.items()}

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(self.rollout, batch, False)
        taken = (out["frames"] >= 0).to(out["logits"])
        ce = step_ce(out["logits"], batch.labels)
        target = self.exit_targets(ce.detach(), batch.labels)
        gated = torch.zeros_like(taken)
        gated[:, 1:len(self.model.gates) + 1] = 1.0
        gate = F.binary_cross_entropy_with_logits(out["gates"], target, reduction="none") * gated
        per_video = per_video_mean(ce + self.cfg.gate_weight * gate, taken)
        return per_video.mean(), {"ce": per_video_mean(ce, taken).mean().detach(),
                                  "exit_target": (target * taken * gated).sum() / (taken * gated).sum().clamp(min=1)}

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
        cost = read_costs(frames, self.module_costs.to(frames.device)[:frames.shape[1]], self.flops[self.cfg.fine])
        inf = step_inference(out["logits"].softmax(-1), frames, cost, batch.length, steps_of(batch))
        inf.actions[inf.actions == NOT_READ] = AFTER_STOP  # every frame not read comes after the exit in its order
        return inf
