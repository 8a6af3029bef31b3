"""Tensor helpers the methods share, each written once: masks over real steps, frames spread
over a video, reading features from a tensor (training) or from :class:`~policy.methods.base.Frames`
(``recognize``), losses over steps, LSTM steps, and pricing modules in GMACs.

Shapes: features ``(N, T, D)``, ``length`` ``(N,)`` real steps (steps past it are padding),
per-step values ``(N, S)``; ``pos`` frame indices ``(N,)`` or ``(N, K)``, -1 for none.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.flops import count_gflops
from extract.training import soft_cross_entropy

from .data import Batch

if TYPE_CHECKING:
    from .methods.base import Frames

Source = Union[torch.Tensor, "Frames"]  # features (N, T, D) as a tensor, or as recognize computes them


def real_mask(length: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps) bool: True at each video's real steps (``t < length``), False on padding."""
    return torch.arange(steps, device=length.device).unsqueeze(0) < length.unsqueeze(1)


def keep_where(mask: torch.Tensor, new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...]
               ) -> tuple[torch.Tensor, ...]:
    """Recurrent states (each (N, H)): ``new`` where the (N,) bool ``mask`` holds, ``old`` elsewhere
    (a video past its end, stopped, or not reading at this step keeps its state)."""
    m = mask.unsqueeze(1)
    return tuple(torch.where(m, a, b) for a, b in zip(new, old, strict=True))


def project_inputs(cell: nn.LSTMCell, x: torch.Tensor) -> torch.Tensor:
    """The input half of an LSTM cell's gates: ``(..., 4H)`` for ``x`` (..., D), e.g. every step at once."""
    return F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh)


def cell_step(cell: nn.LSTMCell, gates_x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """One ``nn.LSTMCell`` step (gate order i, f, g, o) given the projected input ``gates_x``."""
    i, f, g, o = (gates_x + F.linear(h, cell.weight_hh)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def projection(dim_in: int, dim_out: int) -> nn.Sequential:
    """The official LiteEval code's input projection: BatchNorm, Linear, BatchNorm, ReLU."""
    return nn.Sequential(nn.BatchNorm1d(dim_in), nn.Linear(dim_in, dim_out), nn.BatchNorm1d(dim_out), nn.ReLU())


def embedding(dim_in: int, dim_out: int) -> nn.Sequential:
    """FrameExit's frame embedding (OCSampler's classifier head is FrameExit's): Linear, BatchNorm, ReLU."""
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.BatchNorm1d(dim_out), nn.ReLU())


def on_rows(module: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``module`` on the entries of (N, S, D) ``x`` where the (N, S) bool ``rows`` holds, all at once
    (BatchNorm's statistics from those only, not from padding); zeros elsewhere."""
    y = module(x[rows])
    out = y.new_zeros(*rows.shape, y.shape[-1])
    out[rows] = y
    return out


def project_real(module: nn.Module, x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``module`` on the real steps of (N, T, D) ``x`` only (:func:`on_rows`); zeros elsewhere."""
    return on_rows(module, x, real_mask(length, x.shape[1]))


def numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def price(module: nn.Module, *shape: int) -> float:
    """GMACs of ``module`` on one zero input of ``shape``, priced on the CPU whatever the module's
    device (shapes decide, not weights)."""
    return count_gflops(module, torch.zeros(*shape))


def last_step(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``x[i, length[i] - 1]`` for (N, T, ...) ``x``."""
    return at_frames(x, (length - 1).clamp(min=0))


def at_frames(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[i, index[i]]`` for (N, T, ...) ``x`` and (N,) ``index``."""
    return x[torch.arange(len(x), device=x.device), index]


def spread_steps(length: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(frames (N, k), frames kept (N,))``: ``k`` frames per video spread uniformly over its real
    frames (the centre of ``k`` equal segments, TSN's test-time sampling), all of them in order when
    a video has fewer (the rest 0, past the kept count)."""
    kept = length.clamp(max=k)
    i = torch.arange(k, device=length.device).unsqueeze(0)
    return torch.where(i < kept.unsqueeze(1), spread_index(length, k, segments=kept), 0), kept


def spread_frames(batch: Batch, names: list[str], k: int) -> Batch:
    """``batch`` cut to the ``k`` frames per video of :func:`spread_steps`; ``k`` 0: unchanged.
    Features of ``names`` only; steps are the picked frames in order."""
    if k <= 0:
        return batch
    step, kept = spread_steps(batch.length, k)
    rows = torch.arange(len(kept), device=kept.device).unsqueeze(1)
    return Batch(batch.index, {n: batch.features[n][rows, step] for n in names}, batch.labels, kept)


def spread_index(length: torch.Tensor, k: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) the centres of ``k`` equal segments of each video's real frames, ``int(n / k * (i +
    0.5))`` in float64 (TSN's test-time sampling; a frame repeats when a video has fewer than
    ``k``); with ``segments`` (N,), the centres of that many segments per video (entries past it
    are past the last real frame, clamped). The one formula of the policies and the reports
    (phase 1 keeps TSN's own code, ``int(tick / 2 + tick * i)``, which rounds otherwise at ties)."""
    i = torch.arange(k, device=length.device, dtype=torch.float64).unsqueeze(0)
    count = k if segments is None else segments.clamp(min=1).unsqueeze(1)
    return (length.double().unsqueeze(1) / count * (i + 0.5)).long().clamp(max=(length.clamp(min=1) - 1).unsqueeze(1))


def frame_mask(pos: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps) bool: True at each video's frames ``pos`` (N, K); entries -1 mark none."""
    mask = torch.zeros(len(pos), steps, dtype=torch.bool, device=pos.device)
    rows = torch.arange(len(pos), device=pos.device).unsqueeze(1).expand_as(pos)
    mask[rows[pos >= 0], pos[pos >= 0]] = True
    return mask


def read(source: torch.Tensor | Frames, name: str, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(N, D) the features at frame ``pos[i]`` of each video: from an (N, T, D) tensor (training,
    :meth:`Method.infer`) or, for ``recognize``, from :class:`Frames`, computed for ``rows`` only."""
    if isinstance(source, torch.Tensor):
        return at_frames(source, pos)
    return source.features(name, rows, pos)


def read_where(source: Source, name: str, mask: torch.Tensor) -> torch.Tensor:
    """(N, T, D) features where the (N, T) ``mask`` holds: a tensor as it is (every frame; the caller
    uses those of ``mask``), :class:`Frames` computed there only (zeros elsewhere)."""
    return source if isinstance(source, torch.Tensor) else source.all_features(name, mask)


def read_many(source: torch.Tensor | Frames, name: str, pos: torch.Tensor) -> torch.Tensor:
    """(N, K, D) the features at frames ``pos`` (N, K) of each video, from a tensor or :class:`Frames`."""
    rows = torch.arange(len(pos), device=pos.device).unsqueeze(1).expand_as(pos)
    if isinstance(source, torch.Tensor):
        return source[rows, pos]
    return source.all_features(name, frame_mask(pos, source.steps))[rows, pos]


def steps_in(source: Source) -> int:
    """T of (N, T, D) features, as a tensor or a :class:`Frames`."""
    return source.shape[1] if isinstance(source, torch.Tensor) else source.steps


def steps_of(batch: Batch) -> int:
    """T of a batch whose features are tensors or a :class:`Frames`."""
    return steps_in(next(iter(batch.features.values())))


def running_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, S, C) the weighted mean of (N, S, C) ``x`` over the steps up to each step, with (N, S)
    ``weight`` (a 0/1 mask: the steps taken); 0 before the first step taken."""
    w = weight.to(x).unsqueeze(-1)
    return (x * w).cumsum(1) / w.cumsum(1).clamp(min=1e-6)


def step_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, S) the cross-entropy of the prediction at every step of (N, S, C) ``logits``."""
    n, s, c = logits.shape
    return soft_cross_entropy(logits.reshape(n * s, c), labels.repeat_interleave(s, dim=0)).view(n, s)


def per_video_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) the mean of (N, S) ``x`` over each video's ``mask``ed steps (0 where none)."""
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def step_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`step_ce` at every taken step (``mask``), averaged per video, then over videos."""
    return per_video_mean(step_ce(logits, labels), mask).mean()


def label_mass(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) the probability a prediction (N, C) puts on each video's labels: the reward of the
    REINFORCE-trained methods, in [0, 1] for single- and multi-label videos alike."""
    return (probs * (labels > 0)).sum(-1)


def reinforce(log_prob: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE's loss, ``-sum_s log pi(a_s) * advantage_s`` over the ``mask``ed steps, mean over videos."""
    return -(log_prob * advantage.detach() * mask).sum(1).mean()


def first_reads(frames: torch.Tensor) -> torch.Tensor:
    """(N, S) bool: step s reads a frame (``frames`` >= 0) that no earlier step of its video read,
    i.e. where a backbone runs; a frame read again is computed once (``recognize`` keeps it)."""
    s = frames.shape[1]
    same = frames.unsqueeze(2) == frames.unsqueeze(1)  # (N, S, S)
    earlier = torch.ones(s, s, dtype=torch.bool, device=frames.device).tril(-1)
    return (frames >= 0) & ~(same & earlier).any(2)


def read_costs(frames: torch.Tensor, modules: float, backbone: float) -> torch.Tensor:
    """(N, S) GMACs of steps that read ``frames`` (-1: none): a method's own ``modules`` at every
    such step, the ``backbone`` on :func:`first_reads` only."""
    return (frames >= 0) * modules + first_reads(frames) * backbone


def label_entropy(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the entropy of each video's normalised label distribution (0 for one label, log k for k
    labels): the least cross-entropy a prediction can reach on it."""
    y = labels / labels.sum(1, keepdim=True).clamp(min=1e-12)
    return -(y * torch.log(y.clamp(min=1e-12))).sum(1)
