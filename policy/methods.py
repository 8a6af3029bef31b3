"""Method registry: one config dataclass, one model, one loss and one inference per method.

Actions (``predictions.h5/actions``, legend in its ``actions_legend`` attribute), per frame for
LiteEval, UNIFORM and LSTM: -1 no frame (padding), 1 coarse features only, 2 fine features (for
LiteEval coarse and fine; for UNIFORM/LSTM fine only). AR-Net's codes are in :mod:`policy.arnet`.
GFLOPs (GMACs) per video = backbone costs from the cache's FLOPs table for what was computed,
plus the policy's own modules priced with :func:`extract.flops.count_gflops`.
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


@dataclass
class TrainConfig:
    """Options every method shares (LiteEval's optimiser: Adam, lr 1e-4)."""

    method: str = ""
    features: str = ""  # cache path
    out: str = ""  # run folder
    seed: int = 0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    l2_normalise: bool = True  # per-frame L2 normalisation of features, as LiteEval's code
    val_fraction: float = 0.1
    device: str = "auto"
    memory_budget_gb: float = 0.0  # 0: half the memory available
    fine: str = ""  # feature name; "": the cache's most expensive feature
    coarse: str = ""  # feature name; "": the cache's cheapest feature


@dataclass
class LiteEvalConfig(TrainConfig):
    hidden_coarse: int = 512  # FCVID 512/2048, ActivityNet 64/512
    hidden_fine: int = 2048
    gamma: float = 0.05  # target fine-feature usage
    lam: float = 2.0  # lambda of eq. 5
    tau_start: float = 5.0  # Gumbel temperature, annealed exponentially per epoch ...
    tau_end: float = 0.5  # ... to this small positive value
    sync: bool = True
    stochastic_eval: bool = False
    checkpoint_steps: int = 0  # > 0: recompute activations in blocks of this many steps (memory for compute)


@dataclass
class LSTMConfig(TrainConfig):
    hidden: int = 2048


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
    def resolve(cfg, flops: dict[str, float]) -> None:
        """Fill feature names left empty from the cache's FLOPs table (GMACs per frame by name):
        fine = the most expensive feature, coarse = the cheapest."""
        by_cost = sorted(flops, key=flops.get)
        if by_cost and not cfg.fine:
            cfg.fine = by_cost[-1]
        if by_cost and not cfg.coarse:
            cfg.coarse = by_cost[0]

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


def numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def price(module: nn.Module, *shape: int) -> float:
    """GMACs of ``module`` on one zero input of ``shape``, on the module's device (shapes decide, not weights)."""
    return count_gflops(module, torch.zeros(*shape, device=next(module.parameters()).device))


@register_method
class Uniform(Method):
    """UNIFORM: frame classifier on fine features, frame scores averaged over the video."""

    name = "uniform"

    def build(self) -> nn.Module:
        return FrameClassifier(self.dims[self.cfg.fine], self.num_classes)

    def loss(self, model, batch, epoch):
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        mask = real_mask(batch.length, logits.shape[1])
        per_frame = soft_cross_entropy(logits[mask], batch.labels.repeat_interleave(batch.length, dim=0))
        return per_frame.mean(), {}

    @cached_property
    def frame_cost(self) -> float:
        """GMACs per frame: the fine backbone and the classifier."""
        return self.flops[self.cfg.fine] + price(self.model.head, 1, self.dims[self.cfg.fine])

    def infer(self, model, batch):
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        mask = real_mask(batch.length, logits.shape[1])
        probs = logits.softmax(-1) * mask.unsqueeze(-1)
        running = probs.cumsum(1) / torch.arange(1, probs.shape[1] + 1, device=probs.device).view(1, -1, 1)
        real = numpy(mask)
        return Inference(scores=numpy(last_step(running, batch.length)), step_scores=numpy(running),
                         actions=np.where(real, 2, -1), step_gflops=np.cumsum(real * self.frame_cost, 1),
                         extra={"frame_scores": numpy(probs)})


@register_method
class LSTMBaseline(Method):
    """LSTM: an LSTM over the fine features, prediction from the last hidden state."""

    name = "lstm"
    Config = LSTMConfig

    def build(self) -> nn.Module:
        return LSTMClassifier(self.dims[self.cfg.fine], self.num_classes, hidden=self.cfg.hidden)

    def loss(self, model, batch, epoch):
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        return soft_cross_entropy(last_step(logits, batch.length), batch.labels).mean(), {}

    @cached_property
    def costs(self) -> tuple[float, float]:
        """GMACs (per frame: fine backbone + LSTM step; per video: classifier)."""
        step = price(self.model.lstm, 1, 1, self.dims[self.cfg.fine])
        return self.flops[self.cfg.fine] + step, price(self.model.classifier, 1, self.cfg.hidden)

    def infer(self, model, batch):
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
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
                        checkpoint_steps=c.checkpoint_steps)

    def tau(self, epoch: int) -> float:
        c = self.cfg
        if c.epochs <= 1:
            return c.tau_end
        return c.tau_start * (c.tau_end / c.tau_start) ** (epoch / (c.epochs - 1))

    def _run(self, model, batch, **kwargs):
        return model(batch.features[self.cfg.coarse], batch.features[self.cfg.fine], batch.length, **kwargs)

    def usage(self, gate: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return gate.sum(1) / length.clamp(min=1)

    def loss(self, model, batch, epoch):
        out = self._run(model, batch, mode="gumbel", tau=self.tau(epoch))
        ce = soft_cross_entropy(last_step(out["logits"], batch.length), batch.labels)
        usage = self.usage(out["gate"], batch.length)
        budget = self.cfg.lam * (usage - self.cfg.gamma) ** 2
        return (ce + budget).mean(), {"ce": ce.mean().item(), "usage": usage.mean().item()}

    @cached_property
    def policy_costs(self) -> tuple[float, float, float]:
        """GMACs of (per frame: cLSTM step + gate; per fine read: fLSTM step; per video: classifier)."""
        m, dc, df = self.model, self.dims[self.cfg.coarse], self.dims[self.cfg.fine]
        per_frame = price(m.clstm, 1, dc) + price(m.gate, 1, m.gate.in_features)
        return per_frame, price(m.flstm, 1, dc + df), price(m.classifier, 1, m.hidden_fine)

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
        reward = -(ce + self.cfg.lam * (usage - self.cfg.gamma) ** 2).detach()
        baseline = out["baseline"]
        advantage = (reward - baseline).detach()
        policy = -(advantage * out["log_prob"].sum(1))
        loss = ce + policy + F.mse_loss(baseline, reward, reduction="none")
        return loss.mean(), {"ce": ce.mean().item(), "usage": usage.mean().item()}


from . import arnet  # noqa: E402,F401  (registers AR-Net and its baselines)
