"""UNIFORM and LSTM: the baselines every table has, on the fine features of each frame."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from extract.training import soft_cross_entropy

from ..data import Batch
from ..ops import frame_mask, last_step, numpy, price, real_mask, running_mean, spread_frames, spread_steps
from ..run_folder import FRAME_SCORES
from .base import Frames, Inference, Method, TrainConfig, register_method, truncate


class FrameClassifier(nn.Module):
    """UNIFORM: a linear classifier per frame on the fine features; per-step logits (N, T, C)."""

    def __init__(self, fine_dim: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(fine_dim, num_classes))

    def forward(self, fine: torch.Tensor, length: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(fine)}


class LSTMClassifier(nn.Module):
    """LSTM: an LSTM over the fine features, the prediction from the hidden state of each step."""

    def __init__(self, fine_dim: int, num_classes: int, hidden: int = 2048):
        super().__init__()
        self.lstm = nn.LSTM(fine_dim, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, fine: torch.Tensor, length: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden, _ = self.lstm(fine)  # padding comes after the real steps: it cannot reach them
        return {"logits": self.classifier(hidden)}


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
    readout: str = "last"  # last: the last step's prediction (LiteEval) | mean: per-step logits averaged (AR-Net)



class _OnFineFeatures(Method):
    """What UNIFORM and LSTM share: their row names the feature they read."""

    stops_at_budget = True

    @classmethod
    def label(cls, config: dict) -> str:
        return f"{cls.display} ({config.get('fine', '?')})"

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """No decisions: the fine features of the ``frames`` picked (with ``budget`` K, the first K
        of them), then :meth:`infer` on them (frames not picked stay zeros, never read)."""
        length = frames.length
        if self.cfg.frames > 0:
            order, kept = spread_steps(length, self.cfg.frames)
        else:
            order, kept = torch.arange(frames.steps, device=length.device).expand(len(length), -1), length
        used = real_mask(kept, order.shape[1])
        if budget:
            used &= torch.arange(order.shape[1], device=length.device).unsqueeze(0) < budget
        fine = frames.all_features(self.cfg.fine, frame_mask(torch.where(used, order, -1), frames.steps))
        return truncate(self.infer(model, self.lazy_batch(frames, {self.cfg.fine: fine})), self.codes, budget)


@register_method
class Uniform(_OnFineFeatures):
    """UNIFORM: a frame classifier on the fine features of ``frames`` frames spread over the video;
    the video's scores are the average of the frame softmaxes (or of the logits, TSN's consensus)."""

    name = "uniform"
    display = "UNIFORM"
    Config = UniformConfig
    fixed_frames = True
    baseline = True

    def build(self) -> nn.Module:
        return FrameClassifier(self.dims[self.cfg.fine], self.num_classes)

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        mask = real_mask(batch.length, logits.shape[1])
        per_frame = soft_cross_entropy(logits[mask], batch.labels.repeat_interleave(batch.length, dim=0))
        return per_frame.mean(), {}

    @cached_property
    def frame_cost(self) -> float:
        """GMACs per frame: the fine backbone and the classifier."""
        return self.flops[self.cfg.fine] + price(self.model.head, 1, self.dims[self.cfg.fine])

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        mask = real_mask(batch.length, logits.shape[1])
        probs = logits.softmax(-1) * mask.unsqueeze(-1)
        if self.cfg.consensus == "logits":
            running = running_mean(logits, mask).softmax(-1)
        else:
            running = running_mean(probs, mask)
        real = numpy(mask)
        return Inference(scores=numpy(last_step(running, batch.length)), step_scores=numpy(running),
                         actions=np.where(real, 2, -1), step_gflops=np.cumsum(real * self.frame_cost, 1),
                         extra={FRAME_SCORES: numpy(probs)})


@register_method
class LSTMBaseline(_OnFineFeatures):
    """LSTM: an LSTM over the fine features of ``frames`` frames spread over the video; the
    prediction is the last step's (``readout=last``) or the running mean of the per-step logits
    (``readout=mean``, AR-Net's LSTM baseline)."""

    name = "lstm"
    display = "LSTM"
    fixed_frames = True
    Config = LSTMConfig

    def build(self) -> nn.Module:
        return LSTMClassifier(self.dims[self.cfg.fine], self.num_classes, hidden=self.cfg.hidden)

    def step_logits(self, model, batch: Batch) -> torch.Tensor:
        """(N, T, C): what the video's prediction would be after each step."""
        logits = model(batch.features[self.cfg.fine], batch.length)["logits"]
        if self.cfg.readout == "mean":
            logits = running_mean(logits, real_mask(batch.length, logits.shape[1]))
        return logits

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = self.step_logits(model, batch)
        return soft_cross_entropy(last_step(logits, batch.length), batch.labels).mean(), {}

    @cached_property
    def costs(self) -> tuple[float, float]:
        """GMACs (per frame: fine backbone + LSTM step; per video: classifier)."""
        step = price(self.model.lstm, 1, 1, self.dims[self.cfg.fine])
        return self.flops[self.cfg.fine] + step, price(self.model.classifier, 1, self.cfg.hidden)

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        batch = spread_frames(batch, [self.cfg.fine], self.cfg.frames)
        logits = self.step_logits(model, batch)
        mask = real_mask(batch.length, logits.shape[1])
        probs = logits.softmax(-1)
        per_frame, head = self.costs
        real = numpy(mask)
        return Inference(scores=numpy(last_step(probs, batch.length)), step_scores=numpy(probs),
                         actions=np.where(real, 2, -1), step_gflops=np.cumsum(real * per_frame, 1) + head)
