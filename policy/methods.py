"""Method registry: one config dataclass, one model, one loss and one inference per method.

Actions (``predictions.h5/actions``, legend in its ``actions_legend`` attribute), per frame for
LiteEval, UNIFORM and LSTM: -1 no frame (padding), 1 coarse features only, 2 fine features (for
LiteEval coarse and fine; for UNIFORM/LSTM fine only). AR-Net's codes are in :mod:`policy.arnet`.
GFLOPs (GMACs) per video = backbone costs from the cache's FLOPs table for what was computed,
plus the policy's own modules priced with :func:`extract.flops.count_gflops`.

Where the papers and their official code differ, the paper's reading is the default and the
code's is a named option; each config lists those fields in ``CONVENTIONS`` (shown in every row
whose run departs from the default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.flops import count_gflops

from .data import Batch
from .models import FrameClassifier, LiteEval, LSTMClassifier

ACTIONS_LEGEND = {-1: "no frame", 1: "coarse only", 2: "fine"}


def sampled_by_fps(sampling: dict) -> bool:
    """Whether a cache's sampling (its ``sampling`` attribute) is LiteEval's (frames per second)
    rather than AR-Net's / TSN's (a fixed number of segments)."""
    return sampling.get("fps") is not None


def resolve_auto(cfg, sampling: dict) -> None:
    """The ``auto`` choices a cache decides (see :class:`TrainConfig`, :class:`UniformConfig`)."""
    if cfg.normalise == "auto":
        cfg.normalise = "l2" if sampled_by_fps(sampling) else "none"
    if getattr(cfg, "frames", 0) == -1:
        cfg.frames = 25 if sampled_by_fps(sampling) else 0


@dataclass
class TrainConfig:
    """Options every method shares (LiteEval's optimiser: Adam, lr 1e-4)."""

    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on",)

    method: str = ""
    features: str = ""  # cache path
    out: str = ""  # run folder
    seed: int = 0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    # features as read: l2 (per-frame L2 normalisation, as LiteEval's code) | none (raw pooled features, as
    # AR-Net's heads see them) | auto: one choice for every method on a cache, so one table compares like with
    # like: l2 on caches sampled by fps (LiteEval's protocol), none on caches of T segments (AR-Net's)
    normalise: str = "auto"
    select_on: str = "val"  # the checkpoint kept: best on the held-out val split | eval (both official codes)
    val_fraction: float = 0.1
    device: str = "auto"
    memory_budget_gb: float = 0.0  # 0: half the memory available
    fine: str = ""  # feature name; "": the cache's most expensive feature
    coarse: str = ""  # feature name; "": the cache's cheapest feature


@dataclass
class LiteEvalConfig(TrainConfig):
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "budget", "project", "stochastic_eval")

    hidden_coarse: int = 512  # FCVID 512/2048, ActivityNet 64/512
    hidden_fine: int = 2048
    gamma: float = 0.05  # target fine-feature usage
    lam: float = 2.0  # lambda of eq. 5
    tau_start: float = 5.0  # Gumbel temperature, annealed exponentially per epoch ...
    tau_end: float = 0.5  # ... to this small positive value
    sync: bool = True
    stochastic_eval: bool = False
    budget: str = "video"  # eq. 5 per video: mean over videos of (usage - gamma)^2 | batch: the code's (batch usage - gamma)^2
    project: bool = False  # the code's BN-Linear-BN-ReLU on each feature (coarse -> hidden_coarse, fine -> its own dim)
    checkpoint_steps: int = 0  # > 0: recompute activations in blocks of this many steps (memory for compute)


@dataclass
class UniformConfig(TrainConfig):
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "consensus")

    frames: int = -1  # K frames spread uniformly over each video's frames; 0: all; -1: 25 on fps caches, else all
    consensus: str = "softmax"  # average of frame softmaxes (LiteEval) | logits: average of logits (TSN, AR-Net's code)


@dataclass
class LSTMConfig(TrainConfig):
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "readout")

    hidden: int = 2048
    frames: int = -1  # as UNIFORM's
    readout: str = "last"  # last: the last step's prediction (LiteEval) | mean: per-step logits averaged (AR-Net's code)


@dataclass
class Inference:
    scores: np.ndarray  # (N, C) video-level prediction (probabilities)
    step_scores: np.ndarray  # (N, T, C) prediction if stopped after each step
    actions: np.ndarray  # (N, T) int, see the method's legend
    step_gflops: np.ndarray  # (N, T) GMACs spent up to and including each step (a prediction included)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def gflops(self) -> np.ndarray:
        """(N,) GMACs per video: what was spent by the last step."""
        return self.step_gflops[:, -1]


class Method:
    """Base class; subclasses set ``name``, ``Config`` and implement the four hooks."""

    name: ClassVar[str]
    Config: ClassVar[type] = TrainConfig
    fine_code: ClassVar[int] = 2  # the action whose share is reported as "fine_usage"

    def __init__(self, cfg, dims: dict[str, int], num_classes: int, flops: dict[str, float]):
        self.cfg, self.dims, self.num_classes, self.flops = cfg, dims, num_classes, flops
        self.model = self.build()

    @staticmethod
    def resolve(cfg, flops: dict[str, float], sampling: dict) -> None:
        """Fill what was left to the cache: feature names from its FLOPs table (GMACs per frame by
        name; fine = the most expensive feature, coarse = the cheapest) and ``auto`` choices from
        its ``sampling`` (see :class:`TrainConfig`)."""
        by_cost = sorted(flops, key=flops.get)
        if by_cost and not cfg.fine:
            cfg.fine = by_cost[-1]
        if by_cost and not cfg.coarse:
            cfg.coarse = by_cost[0]
        resolve_auto(cfg, sampling)

    @staticmethod
    def needs(cfg) -> list[str]:
        return [cfg.fine]

    @property
    def legend(self) -> dict[int, str]:
        return ACTIONS_LEGEND

    def on_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before each training epoch (stages, learning rates, freezing)."""

    def selectable(self, epoch: int) -> bool:
        """Whether this epoch's model may become the kept checkpoint."""
        return True

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        raise NotImplementedError

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


METHODS: dict[str, type[Method]] = {}
CHOICES = {"normalise": ("l2", "none"), "select_on": ("val", "eval"), "budget": ("video", "batch"),
           "consensus": ("softmax", "logits"), "readout": ("last", "mean"), "rank": ("softmax", "logit")}


def check_config(cfg) -> None:
    """Refuse a value of a string option that is not one of its ``CHOICES`` (after ``resolve``)."""
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key, allowed[0])
        if value not in allowed:
            raise ValueError(f"--set {key}={value}: {key} must be one of {', '.join(allowed)}")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the multi-hot labels normalised to a distribution (one-hot: plain CE)."""
    target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1)


def last_step(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``x[i, length[i] - 1]`` for (N, T, ...) ``x``."""
    return x[torch.arange(len(x)), (length - 1).clamp(min=0)]


def real_mask(length: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.arange(steps, device=length.device).unsqueeze(0) < length.unsqueeze(1)


def spread_frames(batch: Batch, names: list[str], k: int) -> Batch:
    """``batch`` cut to ``k`` frames per video spread uniformly over its real frames (the centre of
    ``k`` equal segments, TSN's test-time sampling); all of them when a video has fewer. ``k`` 0:
    unchanged. Features of ``names`` only; steps are the picked frames in order."""
    if k <= 0:
        return batch
    kept = batch.length.clamp(max=k)
    i = torch.arange(k, device=kept.device).unsqueeze(0)
    step = ((i + 0.5) * batch.length.unsqueeze(1) / kept.clamp(min=1).unsqueeze(1)).long()
    step = torch.where(i < kept.unsqueeze(1), step.clamp(max=batch.length.max().item() - 1), 0)
    rows = torch.arange(len(kept), device=kept.device).unsqueeze(1)
    return Batch(batch.index, {n: batch.features[n][rows, step] for n in names}, batch.labels, kept)


def numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def price(module: nn.Module, *shape: int) -> float:
    """GMACs of ``module`` on one zero input of ``shape``, on the module's device (shapes decide, not weights)."""
    return count_gflops(module, torch.zeros(*shape, device=next(module.parameters()).device))


@register_method
class Uniform(Method):
    """UNIFORM: a frame classifier on the fine features of ``frames`` frames spread over the video;
    the video's scores are the average of the frame softmaxes (or of the logits, TSN's consensus)."""

    name = "uniform"
    Config = UniformConfig

    def build(self) -> nn.Module:
        return FrameClassifier(self.dims[self.cfg.fine], self.num_classes)

    def loss(self, model, batch, epoch):
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        mask = real_mask(batch.length, logits.shape[1])
        per_frame = soft_cross_entropy(logits[mask], batch.labels.repeat_interleave(batch.length, dim=0))
        return per_frame.mean(), {}

    @cached_property
    def frame_cost(self) -> float:
        """GMACs per frame: the fine backbone and the classifier."""
        return self.flops[self.cfg.fine] + price(self.model.head, 1, self.dims[self.cfg.fine])

    def infer(self, model, batch):
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        mask = real_mask(batch.length, logits.shape[1])
        probs = logits.softmax(-1) * mask.unsqueeze(-1)
        seen = torch.arange(1, probs.shape[1] + 1, device=probs.device).view(1, -1, 1)
        if self.cfg.consensus == "logits":
            running = ((logits * mask.unsqueeze(-1)).cumsum(1) / seen).softmax(-1)
        else:
            running = probs.cumsum(1) / seen
        real = numpy(mask)
        return Inference(scores=numpy(last_step(running, batch.length)), step_scores=numpy(running),
                         actions=np.where(real, 2, -1), step_gflops=np.cumsum(real * self.frame_cost, 1),
                         extra={"frame_scores": numpy(probs)})


@register_method
class LSTMBaseline(Method):
    """LSTM: an LSTM over the fine features of ``frames`` frames spread over the video; the
    prediction is the last step's (``readout=last``) or the running mean of the per-step logits
    (``readout=mean``, AR-Net's LSTM baseline)."""

    name = "lstm"
    Config = LSTMConfig

    def build(self) -> nn.Module:
        return LSTMClassifier(self.dims[self.cfg.fine], self.num_classes, hidden=self.cfg.hidden)

    def step_logits(self, model, batch: Batch) -> torch.Tensor:
        """(N, T, C): what the video's prediction would be after each step."""
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        if self.cfg.readout == "mean":
            mask = real_mask(batch.length, logits.shape[1]).unsqueeze(-1)
            seen = torch.arange(1, logits.shape[1] + 1, device=logits.device).view(1, -1, 1)
            logits = (logits * mask).cumsum(1) / seen
        return logits

    def loss(self, model, batch, epoch):
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = self.step_logits(model, batch)
        return soft_cross_entropy(last_step(logits, batch.length), batch.labels).mean(), {}

    @cached_property
    def costs(self) -> tuple[float, float]:
        """GMACs (per frame: fine backbone + LSTM step; per video: classifier)."""
        step = price(self.model.lstm, 1, 1, self.dims[self.cfg.fine])
        return self.flops[self.cfg.fine] + step, price(self.model.classifier, 1, self.cfg.hidden)

    def infer(self, model, batch):
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = self.step_logits(model, batch)
        mask = real_mask(batch.length, logits.shape[1])
        probs = logits.softmax(-1)
        per_frame, head = self.costs
        real = numpy(mask)
        return Inference(scores=numpy(last_step(probs, batch.length)), step_scores=numpy(probs),
                         actions=np.where(real, 2, -1), step_gflops=np.cumsum(real * per_frame, 1) + head)


@register_method
class LiteEvalMethod(Method):
    """LiteEval: loss CE(rho_T) + lambda (mean_t B_t - gamma)^2 (eq. 5), straight-through Gumbel."""

    name = "liteeval"
    Config = LiteEvalConfig

    @staticmethod
    def needs(cfg) -> list[str]:
        return [cfg.coarse, cfg.fine]

    def build(self) -> nn.Module:
        c = self.cfg
        return LiteEval(self.dims[c.coarse], self.dims[c.fine], self.num_classes, hidden_coarse=c.hidden_coarse,
                        hidden_fine=c.hidden_fine, sync=c.sync, rl_baseline=self.name == "liteeval-rl",
                        checkpoint_steps=c.checkpoint_steps, project=c.project)

    def tau(self, epoch: int) -> float:
        c = self.cfg
        if c.epochs <= 1:
            return c.tau_end
        return c.tau_start * (c.tau_end / c.tau_start) ** (epoch / (c.epochs - 1))

    def _run(self, model, batch, **kwargs):
        return model(batch.features[self.cfg.coarse], batch.features[self.cfg.fine], batch.length, **kwargs)

    def usage(self, gate: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return gate.sum(1) / length.clamp(min=1)

    def budget(self, usage: torch.Tensor) -> torch.Tensor:
        """lambda (usage - gamma)^2 per video (eq. 5), or ``budget=batch``: of the batch's mean usage
        (the official code's MSE), the same value for every video of the batch."""
        if self.cfg.budget == "batch":
            return self.cfg.lam * (usage.mean() - self.cfg.gamma) ** 2 * torch.ones_like(usage)
        return self.cfg.lam * (usage - self.cfg.gamma) ** 2

    def loss(self, model, batch, epoch):
        out = self._run(model, batch, mode="gumbel", tau=self.tau(epoch))
        ce = soft_cross_entropy(last_step(out["logits"], batch.length), batch.labels)
        usage = self.usage(out["gate"], batch.length)
        return (ce + self.budget(usage)).mean(), {"ce": ce.mean().item(), "usage": usage.mean().item()}

    @cached_property
    def policy_costs(self) -> tuple[float, float, float]:
        """GMACs of (per frame: coarse projection + cLSTM step + gate; per fine read: fine projection
        + fLSTM step; per video: classifier)."""
        m, dc, df = self.model, self.dims[self.cfg.coarse], self.dims[self.cfg.fine]
        per_frame = price(m.clstm, 1, m.clstm.input_size) + price(m.gate, 1, m.gate.in_features)
        per_read = price(m.flstm, 1, m.flstm.input_size)
        if m.project_coarse is not None:
            per_frame += price(m.project_coarse, 1, dc)
            per_read += price(m.project_fine, 1, df)
        return per_frame, per_read, price(m.classifier, 1, m.hidden_fine)

    def infer(self, model, batch):
        out = self._run(model, batch, mode="sample" if self.cfg.stochastic_eval else "argmax")
        probs = out["logits"].softmax(-1)
        mask = numpy(real_mask(batch.length, probs.shape[1]))
        gate = numpy(out["gate"])
        per_frame, per_read, head = self.policy_costs
        read = gate > 0.5
        step = mask * (self.flops[self.cfg.coarse] + per_frame) + read * (self.flops[self.cfg.fine] + per_read)
        return Inference(scores=numpy(last_step(probs, batch.length)), step_scores=numpy(probs),
                         actions=np.where(mask, 1 + read, -1), step_gflops=np.cumsum(step, 1) + head)


@register_method
class LiteEvalRL(LiteEvalMethod):
    """LiteEval-RL: the same model, gate trained with REINFORCE and a learned, input-dependent baseline.

    Reward R = -(CE + lambda (usage - gamma)^2) per video; the baseline regresses R from the mean
    coarse feature; the LSTMs and classifier are trained by back-propagating CE through the sampled path.
    """

    name = "liteeval-rl"

    def loss(self, model, batch, epoch):
        out = self._run(model, batch, mode="bernoulli")
        ce = soft_cross_entropy(last_step(out["logits"], batch.length), batch.labels)
        usage = self.usage(out["gate"], batch.length)
        reward = -(ce + self.budget(usage)).detach()
        baseline = out["baseline"]
        advantage = (reward - baseline).detach()
        policy = -(advantage * out["log_prob"].sum(1))
        loss = ce + policy + F.mse_loss(baseline, reward, reduction="none")
        return loss.mean(), {"ce": ce.mean().item(), "usage": usage.mean().item()}


from . import arnet  # noqa: E402,F401  (registers AR-Net and its baselines)
