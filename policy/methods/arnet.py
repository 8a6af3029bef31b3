"""AR-Net (Meng et al., ECCV 2020) on cached features, and its baselines Random Policy,
Multi-Scale and SCSampler.

Backbones are frozen: their features at every resolution are in the cache, so each backbone
``Psi_l`` becomes a linear classifier head on its features. The policy is an LSTM over the
policy's feature (``policy``: the cache's cheapest by default; MobileNetV2@84 in the paper) with a
linear layer to L + M logits: L resolutions (descending) then M skips. Choosing a skip F skips the
current frame and the next F - 1: the policy does not read them and they cost nothing. The video
prediction averages the logits of the chosen frames.

Action codes in ``predictions.h5``: 0..L-1 the resolution (backbone) chosen, L..L+M-1 the skip
chosen at that frame, -2 skipped over by an earlier skip, -3 sampled after the stop
(``recognize --budget``), -1 no frame (padding).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.backbones import parse_name
from extract.errors import ConfigError
from extract.training import soft_cross_entropy

from ..data import Batch
from ..ops import Source, keep_where, numpy, price, read, read_where, real_mask, running_mean, steps_in
from ..run_folder import ActionCodes, RunFolder
from .base import Ablation, Frames, Inference, Method, TrainConfig, register_method, resolve_auto

SKIPPED_OVER, AFTER_STOP = -2, -3


@dataclass
class ARNetConfig(TrainConfig):
    """AR-Net's defaults: SGD momentum 0.9; warm-up 10 epochs at 0.02, joint 50 at 0.001,
    finetune 50 at 0.0005; tau 5 decayed by exp(-0.045) per epoch; alpha 0.1, beta 0.3."""

    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "stochastic_eval", "policy_head")

    # the stages' epochs set the length of training: 0 (unset) becomes their total; another value is refused
    epochs: int = 0
    backbones: tuple[str, ...] = ()  # highest resolution first; (): one feature per resolution of the cache
    policy: str = ""  # the policy's feature; "": the cache's cheapest
    hidden: int = 512
    skips: tuple[int, ...] = (1, 2, 4)
    actions: str = "both"  # both | resolution | skip (AR-Net Table 4)
    alpha: float = 0.1
    beta: float = 0.3
    tau_start: float = 5.0
    tau_decay: float = 0.045
    stages: tuple[str, ...] = ("warmup", "joint", "finetune")
    warmup_epochs: int = 10
    joint_epochs: int = 50
    finetune_epochs: int = 50
    warmup_lr: float = 0.02
    joint_lr: float = 0.001
    finetune_lr: float = 0.0005
    momentum: float = 0.9
    optim: str = "sgd"  # sgd (the paper's, with momentum) | adam (the stage learning rates apply to it)
    stochastic_eval: bool = False  # sample actions at evaluation (the official code) instead of argmax
    # the official code: the lowest resolution's prediction is a head on the policy LSTM's state
    policy_head: bool = False


@dataclass
class RandomConfig(ARNetConfig):
    match_run: str = ""  # draw actions with this run's per-frame action shares instead of uniformly


@dataclass
class SCSamplerConfig(ARNetConfig):
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "rank")

    topk: int = 10  # frames kept for the highest resolution
    rank: str = "softmax"  # frames ranked by max softmax | logit: by max logit (AR-Net's re-implementation)


class ARNet(nn.Module):
    """Heads per resolution plus the policy LSTM; ``forward`` returns per-frame head logits
    ``(N, T, L, C)`` and, unless ``mode == "all"``, the one-hot actions ``P`` ``(N, T, L + M)``,
    the action codes ``(N, T)`` and the policy's logits at visited frames (-inf for actions not
    allowed) and zero at frames it did not visit."""

    def __init__(self, dims: list[int], policy_dim: int, num_classes: int, *, hidden: int = 512, skips: int = 3,
                 policy_head: bool = False):
        super().__init__()
        self.policy_head = policy_head  # the lowest resolution's head reads the policy LSTM's hidden state
        dims = [*dims[:-1], hidden] if policy_head else dims
        self.heads = nn.ModuleList(nn.Sequential(nn.Dropout(0.5), nn.Linear(d, num_classes)) for d in dims)
        self.lstm = nn.LSTMCell(policy_dim, hidden)
        self.fc = nn.Linear(hidden, len(dims) + skips)

    def head_logits(self, feats: list[torch.Tensor], states: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T, L, C) logits of every head on every frame; with ``policy_head`` the last head reads
        ``states``, the policy LSTM's hidden state at each step (N, T, hidden)."""
        feats = [*feats[:-1], states] if self.policy_head else feats
        return torch.stack([head(x) for head, x in zip(self.heads, feats, strict=True)], dim=2)

    def states(self, policy_feats: torch.Tensor) -> torch.Tensor | None:
        """The policy LSTM's hidden state after each frame when it reads every frame (N, T, hidden),
        for the warm-up and the baselines; ``None`` without ``policy_head``."""
        if not self.policy_head:
            return None
        h = policy_feats.new_zeros(policy_feats.shape[0], self.lstm.hidden_size)
        c, out = torch.zeros_like(h), []
        for t in range(policy_feats.shape[1]):
            h, c = self.lstm(policy_feats[:, t], (h, c))
            out.append(h)
        return torch.stack(out, 1)

    def forward(self, feats: list[Source], policy_feats: Source, length: torch.Tensor, *,
                skips: torch.Tensor, allowed: torch.Tensor, mode: str = "argmax", tau: float = 1.0,
                forced: torch.Tensor | None = None, budget: int = 0,
                names: tuple[list[str], str] | None = None) -> dict[str, torch.Tensor]:
        """The policy frame by frame, then the chosen heads: the one rollout of training, inference
        and ``recognize``. ``feats`` (one per resolution) and ``policy_feats`` are (N, T, D) tensors,
        or for ``recognize`` a :class:`Frames` (``names``: the resolutions' and the policy's feature
        names), from which the policy's feature is computed only at the frames it visits and each
        resolution's only at the frames that chose it.

        ``mode``: gumbel (straight-through, eq. 8), sample (Gumbel-max, eq. 6), argmax, or all (no
        policy: every head on every frame, tensors only). ``forced`` (N, T) fixes the actions.
        ``budget`` K > 0: each video stops after its K-th read at the highest resolution (later
        frames get ``AFTER_STOP``). ``frame_P`` (N, T, L + M) is ``P`` with each frame skipped over
        given the one-hot of the skip that jumped it (eq. 11 counts it)."""
        if mode == "all":
            return {"logits": self.head_logits(feats, None if policy_feats is None else self.states(policy_feats))}
        n, steps, L = len(length), steps_in(policy_feats), len(self.heads)
        resolutions, policy = names or ([""] * L, "")
        h = torch.zeros(n, self.lstm.hidden_size, device=length.device)
        c = torch.zeros_like(h)
        remaining, reads = (torch.zeros(n, dtype=torch.long, device=length.device) for _ in range(2))
        alive = length > 0
        carried = h.new_zeros(n, L + len(skips))  # the one-hot of the skip still running
        actions, codes, scores, frames, states = [], [], [], [], []
        for t in range(steps):
            active = (remaining == 0) & (t < length) & alive
            h_new, c_new = self.lstm(read(policy_feats, policy, active, t), (h, c))
            states.append(h_new)
            h, c = keep_where(active, (h_new, c_new), (h, c))
            z = self.fc(h_new).masked_fill(~allowed, float("-inf"))
            if forced is not None:
                P = F.one_hot(forced[:, t], z.shape[1]).to(z)
            elif mode == "gumbel":
                P = F.gumbel_softmax(z, tau=tau, hard=True)
            elif mode == "sample":
                P = F.one_hot((z - torch.empty_like(z).exponential_().log()).argmax(1), z.shape[1]).to(z)
            else:
                P = F.one_hot(z.argmax(1), z.shape[1]).to(z)
            P = P * active.unsqueeze(1).to(z)
            chosen = P.argmax(1)
            remaining, code, skip = advance(chosen, active, t, length, remaining, skips, L)
            codes.append(torch.where(~alive & (t < length), AFTER_STOP, code))
            actions.append(P)
            over = ((t < length) & ~active).unsqueeze(1)
            frames.append(torch.where(over, carried, P))
            carried = torch.where(active.unsqueeze(1), P * skip.unsqueeze(1).to(P), carried)
            scores.append(torch.where(active.unsqueeze(1), z, torch.zeros_like(z)))  # not z * a: -inf * 0 is NaN
            if budget:
                reads = reads + (active & (chosen == 0)).long()
                alive = alive & (reads < budget)
        P = torch.stack(actions, 1)
        feats = [read_where(x, name, P[:, :, level] > 0)
                 for level, (x, name) in enumerate(zip(feats, resolutions, strict=True))]
        return {"logits": self.head_logits(feats, torch.stack(states, 1)), "P": P, "codes": torch.stack(codes, 1),
                "frame_P": torch.stack(frames, 1), "policy_logits": torch.stack(scores, 1)}


def advance(chosen: torch.Tensor, active: torch.Tensor, t: int, length: torch.Tensor, remaining: torch.Tensor,
            skips: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the skip bookkeeping: ``(frames each video still skips after this one, this
    step's action codes, where a skip was chosen)`` from the action ``chosen`` where ``active``."""
    skip = active & (chosen >= L)
    span = skips[(chosen - L).clamp(min=0)]
    remaining = torch.where(skip, span - 1, torch.where(active, torch.zeros_like(remaining),
                                                         (remaining - 1).clamp(min=0)))
    return remaining, torch.where(active, chosen, torch.where(t < length, SKIPPED_OVER, -1)), skip


def video_logits(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over frames of (N, T, C) logits; a video with no chosen frame gets zeros."""
    return (logits * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp(min=1e-6)


def averaged_inference(frame_logits: torch.Tensor, weight: torch.Tensor, actions: np.ndarray,
                       step_gflops: np.ndarray) -> Inference:
    """What every method of the family reports: the video's softmax of the weighted mean frame logits
    (N, T, C) -> (N, C), the same after each step, the action codes and the GMACs spent by each step."""
    return Inference(scores=numpy(video_logits(frame_logits, weight).softmax(-1)),
                     step_scores=numpy(running_mean(frame_logits, weight).softmax(-1)), actions=actions,
                     step_gflops=step_gflops)


def step_gflops(P: torch.Tensor, per_action: torch.Tensor, visit: float) -> torch.Tensor:
    """GMACs at each step (N, T): the chosen action's cost, plus ``visit`` wherever the policy read the frame."""
    return (P * per_action).sum(-1) + visit * P.sum(-1)


def flops_per_frame(P: torch.Tensor, per_action: torch.Tensor, visit: float, length: torch.Tensor) -> torch.Tensor:
    """Eq. 10 per video: (1/T) sum_t GFLOPs(a_t)."""
    return step_gflops(P, per_action, visit).sum(1) / length.clamp(min=1).to(P.dtype)


def uniform_usage(frame_P: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Eq. 11: sum over actions of (batch frequency of the action - 1 / (L + M))^2. Every frame of
    a video counts, normalised over its T frames: a frame skipped over carries the one-hot of the
    skip that jumped it (``frame_P``), as in the official code, so the frequencies sum to 1."""
    frequency = (frame_P.sum(1) / length.clamp(min=1).to(frame_P.dtype).unsqueeze(1)).mean(0)
    return ((frequency - 1.0 / frame_P.shape[2]) ** 2).sum()


class _Family(Method):
    """What AR-Net and its baselines share: heads per resolution, stage-free warm-up training."""

    Config = ARNetConfig

    @classmethod
    def resolve(cls, cfg: TrainConfig, flops: dict[str, float], sampling: dict) -> TrainConfig:
        """A copy of ``cfg``: policy = the cheapest feature; backbones = per resolution (descending)
        its most expensive feature; ``auto`` choices as every method (:func:`resolve_auto`)."""
        cfg = resolve_auto(cfg, sampling)
        policy, backbones = cfg.policy or min(flops, key=flops.get), cfg.backbones
        if not backbones:
            best: dict[int, str] = {}
            for name in sorted(flops, key=flops.get):
                best[parse_name(name)[1]] = name
            backbones = tuple(best[r] for r in sorted(best, reverse=True))
        return dataclasses.replace(cfg, policy=policy, backbones=tuple(backbones), fine=cfg.fine or backbones[0])

    @staticmethod
    def needs(cfg) -> list[str]:
        return list(dict.fromkeys([*cfg.backbones, cfg.policy]))

    @property
    def names(self) -> list[str]:
        return list(self.cfg.backbones)

    @property
    def skips(self) -> list[int]:
        return list(self.cfg.skips)

    @property
    def codes(self) -> ActionCodes:
        """0..L-1 a resolution, L.. a skip, -2 skipped over; expensive = the highest resolution."""
        L = len(self.names)
        skips = {L + j: f for j, f in enumerate(self.skips)}
        return ActionCodes(legend={-1: "no frame", AFTER_STOP: "after the stop", SKIPPED_OVER: "skipped over",
                                   **dict(enumerate(self.names)), **{code: f"skip {f}" for code, f in skips.items()}},
                           marks={AFTER_STOP: "x", SKIPPED_OVER: ".", **{i: n.rpartition("@")[2] for i, n in
                                                                       enumerate(self.names)},
                                  **{code: f"s{f}" for code, f in skips.items()}},
                           visited=tuple(range(L + len(skips))), expensive=(0,), stopped=(AFTER_STOP,))

    @classmethod
    def staged(cls, cfg: TrainConfig, stages: list[str]) -> TrainConfig:
        """``cfg`` with ``epochs`` the total of the ``<stage>_epochs`` of ``stages`` (the stages trained):
        an ``epochs`` set to another number is refused, naming the fields that set it, rather than
        trained for a length other than asked."""
        counts = {s: getattr(cfg, f"{s}_epochs") for s in stages}
        total = sum(counts.values())
        if total == 0 or cfg.epochs not in (0, total):
            asked = f"epochs={cfg.epochs}: " if cfg.epochs else ""
            spelled = " + ".join(f"{s}_epochs {n}" for s, n in counts.items())
            raise ConfigError(f"{asked}{cls.name} trains for its stages' epochs ({spelled} = {total}): set "
                             f"{', '.join(f'{s}_epochs' for s in counts)} (epochs is their total, at least 1)")
        return dataclasses.replace(cfg, epochs=total)

    def build(self) -> nn.Module:
        if self.cfg.policy_head and self.names[-1] != self.cfg.policy:
            raise ConfigError(f"policy_head needs the lowest resolution to be the policy's feature {self.cfg.policy}, "
                             f"not {self.names[-1]}")
        return ARNet([self.dims[n] for n in self.names], self.dims[self.cfg.policy], self.num_classes,
                     hidden=self.cfg.hidden, skips=len(self.skips), policy_head=self.cfg.policy_head)

    def optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.optim == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=self.cfg.warmup_lr, weight_decay=self.cfg.weight_decay)
        if self.cfg.optim != "sgd":
            raise ConfigError(f"optim must be sgd or adam, not {self.cfg.optim!r}")
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.warmup_lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def _feats(self, batch: Batch) -> list[torch.Tensor]:
        return [batch.features[n] for n in self.names]

    def all_logits(self, model, batch: Batch) -> torch.Tensor:
        """Every head on every frame, no policy: (N, T, L, C)."""
        return model(self._feats(batch), batch.features[self.cfg.policy], batch.length, mode="all",
                     skips=None, allowed=None)["logits"]

    def warmup_loss(self, model, batch: Batch) -> torch.Tensor:
        """Every head on every real frame (the policy is not used): mean over heads of the video CE."""
        logits = self.all_logits(model, batch)
        weight = real_mask(batch.length, logits.shape[1]).to(logits)
        return torch.stack([soft_cross_entropy(video_logits(logits[:, :, head], weight), batch.labels)
                            for head in range(logits.shape[2])]).mean()

    @cached_property
    def head_costs(self) -> list[float]:
        """GMACs of each resolution's classifier head on one frame."""
        return [price(h, 1, h[1].in_features) for h in self.model.heads]

    @cached_property
    def costs(self) -> tuple[list[float], float]:
        """GMACs of each action when taken (resolution: backbone + head, the policy's own feature
        counted once; skip: 0) and of visiting a frame (policy feature + LSTM step + fc)."""
        m = self.model
        per_action = [(0.0 if n == self.cfg.policy else self.flops[n]) + h
                      for n, h in zip(self.names, self.head_costs, strict=True)]
        visit = (self.flops[self.cfg.policy] + price(m.lstm, 1, self.dims[self.cfg.policy])
                 + price(m.fc, 1, m.fc.in_features))
        return per_action + [0.0] * len(self.skips), visit

    def allowed(self, device) -> torch.Tensor:
        L, M = len(self.names), len(self.skips)
        kind = self.cfg.actions
        if kind not in ("both", "resolution", "skip"):
            raise ConfigError(f"actions must be both, resolution or skip, not {kind!r}")
        mask = [kind != "skip" or i == 0 for i in range(L)] + [kind != "resolution"] * M
        return torch.tensor(mask, device=device)

    def _route(self, model, batch: Batch, **policy) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Run the policy over ``batch``: ``(outputs, per-frame logits of the chosen head (N, T, C),
        frame weights (N, T): 1 where a head was chosen)``."""
        device = batch.length.device
        out = model(self._feats(batch), batch.features[self.cfg.policy], batch.length,
                    skips=torch.tensor(self.skips, device=device), allowed=self.allowed(device),
                    names=(self.names, self.cfg.policy), **policy)
        chosen = out["P"][:, :, :len(self.names)]
        return out, (out["logits"] * chosen.unsqueeze(-1)).sum(2), chosen.sum(-1)

    def action_costs(self, device) -> tuple[torch.Tensor, float]:
        per_action, visit = self.costs
        return torch.tensor(per_action, device=device), visit

    def policy_inference(self, model, batch: Batch, mode: str, budget: int = 0) -> Inference:
        out, frame_logits, weight = self._route(model, batch, mode=mode, budget=budget)
        spent = step_gflops(out["P"], *self.action_costs(batch.length.device))
        return averaged_inference(frame_logits, weight, numpy(out["codes"]), numpy(spent.cumsum(1)).astype(np.float64))


@register_method
class ARNetMethod(_Family):
    """AR-Net: loss (1 - alpha) CE + alpha L_flops + beta L_uni (eqs. 9-12), in stages."""

    name = "arnet"
    display = "AR-Net"
    stops_at_budget = True
    spends_per_frame = True
    claims_savings = True
    ablations = (Ablation("actions", "AR-Net action spaces (AR-Net Table 4)", {"actions": "actions"},
                          tuple(f"--set actions={a}" for a in ("resolution", "skip", "both")), references=True),
                 Ablation("losses", "AR-Net losses (AR-Net Table 5)", {"α": "alpha", "β": "beta"},
                          tuple(f"--set alpha={a} --set beta={b}" for a, b in ((0, 0), (0.1, 0), (0.1, 0.3))),
                          sort=True),
                 Ablation("stages", "AR-Net training stages (AR-Net Table 6)", {"stages": "stages"},
                          tuple(f"--set stages={s}" for s in ("joint", "warmup,joint", "warmup,joint,finetune"))))

    @classmethod
    def label(cls, config: dict) -> str:
        """``AR-Net``, plus the action space, α and β, and the stages where they are not the paper's."""
        extra = [] if config["actions"] == "both" else [config["actions"] + " only"]
        if (config["alpha"], config["beta"]) != (0.1, 0.3):
            extra.append(f"α={config['alpha']:g}, β={config['beta']:g}")
        if list(config["stages"]) != ["warmup", "joint", "finetune"]:
            extra.append(",".join(config["stages"]))
        return f"{cls.display} ({'; '.join(extra)})" if extra else cls.display

    @staticmethod
    def schedule_of(cfg) -> list[str]:
        """The stage of each epoch, from ``stages`` and the stages' epoch counts."""
        if not cfg.stages or set(cfg.stages) - {"warmup", "joint", "finetune"}:
            raise ConfigError(f"stages are a comma list of warmup, joint, finetune, not {','.join(cfg.stages)!r}")
        return [s for s in ("warmup", "joint", "finetune") if s in cfg.stages
                for _ in range(getattr(cfg, f"{s}_epochs"))]

    @classmethod
    def resolve(cls, cfg: TrainConfig, flops: dict[str, float], sampling: dict) -> TrainConfig:
        """As the family's, with ``epochs`` the length of the stage schedule (:meth:`staged`)."""
        cfg = super().resolve(cfg, flops, sampling)
        cls.schedule_of(cfg)  # refuses stages other than warmup, joint, finetune
        return cls.staged(cfg, [s for s in ("warmup", "joint", "finetune") if s in cfg.stages])

    def __init__(self, cfg: ARNetConfig, dims: dict[str, int], num_classes: int, flops: dict[str, float]):
        super().__init__(cfg, dims, num_classes, flops)
        self.schedule = self.schedule_of(cfg)

    def stage(self, epoch: int) -> str:
        return self.schedule[epoch]

    def tau(self, epoch: int) -> float:
        start = self.schedule.index("joint") if "joint" in self.schedule else 0
        return self.cfg.tau_start * math.exp(-self.cfg.tau_decay * max(0, epoch - start))

    def on_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        stage = self.stage(epoch)
        for group in optimizer.param_groups:
            group["lr"] = getattr(self.cfg, f"{stage}_lr")
        policy = list(self.model.lstm.parameters()) + list(self.model.fc.parameters())
        for p in policy:
            p.requires_grad_(stage == "joint")

    def selectable(self, epoch: int) -> bool:
        return self.stage(epoch) == self.schedule[-1]

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage(epoch) == "warmup":
            return self.warmup_loss(model, batch), {}
        out, frame_logits, weight = self._route(model, batch, mode="gumbel", tau=self.tau(epoch))
        ce = soft_cross_entropy(video_logits(frame_logits, weight), batch.labels)
        flops = flops_per_frame(out["P"], *self.action_costs(batch.length.device), batch.length)
        uniform = uniform_usage(out["frame_P"], batch.length)
        loss = (1 - self.cfg.alpha) * ce.mean() + self.cfg.alpha * flops.mean() + self.cfg.beta * uniform
        return loss, {"ce": ce.mean().detach(), "gflops_per_frame": flops.mean().detach()}

    def infer(self, model: nn.Module, batch: Batch, budget: int = 0) -> Inference:
        """The rollout (:meth:`ARNet.forward`) by argmax (or sampled, ``stochastic_eval``); ``budget``
        K: each video stops after its K-th read at the highest resolution."""
        return self.policy_inference(model, batch, "sample" if self.cfg.stochastic_eval else "argmax", budget)

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """:meth:`infer` itself, reading from ``frames``: the policy's feature at the frames it
        visits (frames skipped over are never read), then each resolution's at the frames that
        chose it, in one batched pass per resolution once the policy has run."""
        return self.infer(model, self.lazy_batch(frames, {name: frames for name in self.needs(self.cfg)}), budget)


class _WarmupOnly(_Family):
    """Baselines that train only what AR-Net's warm-up trains: every head on every frame."""

    @classmethod
    def resolve(cls, cfg: TrainConfig, flops: dict[str, float], sampling: dict) -> TrainConfig:
        """As the family's, with ``epochs`` the warm-up's (:meth:`staged`)."""
        return cls.staged(super().resolve(cfg, flops, sampling), ["warmup"])

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.warmup_loss(model, batch), {}


def frame_shares(run: RunFolder, actions: int) -> np.ndarray:
    """Share of sampled frames per action code ``0 .. actions - 1`` in ``run``'s predictions, a frame
    skipped over (sampled, not visited) counted with the action that jumped it (as eq. 11 counts frames)."""
    codes, roles = run.actions, run.codes
    jumped = roles.sampled(codes) & ~roles.is_visited(codes)
    at = np.where(jumped, 0, np.arange(codes.shape[1]))
    filled = np.take_along_axis(codes, np.maximum.accumulate(at, axis=1), axis=1)
    counts = np.bincount(filled[(filled >= 0) & roles.sampled(codes)], minlength=actions)[:actions].astype(np.float64)
    return counts / max(counts.sum(), 1.0)


@register_method
class RandomPolicy(_WarmupOnly):
    """Random Policy (AR-Net Table 1): the warm-up's heads; each frame independently gets an action
    drawn uniformly over the allowed L resolutions and M skips, and a skip drops that frame only.
    The policy network still reads every frame, as in the paper's framework (its cost is charged:
    with AR-Net's ResNet set this gives the published 1.04 GFLOPs/f). With ``match_run``, actions
    are drawn with that run's per-frame action shares (frames skipped over counted with their skip),
    which spends the learned run's backbone budget."""

    name = "random"
    display = "Random Policy"
    Config = RandomConfig

    def __init__(self, cfg: ARNetConfig, dims: dict[str, int], num_classes: int, flops: dict[str, float]):
        super().__init__(cfg, dims, num_classes, flops)
        self.probs = self.allowed("cpu").double()
        if cfg.match_run:
            self.probs = torch.from_numpy(frame_shares(RunFolder.load(cfg.match_run), len(self.probs)))
        self.probs = self.probs / self.probs.sum()

    @property
    def codes(self) -> ActionCodes:
        """As AR-Net's, but a skip drops its own frame only, and the policy reads every frame."""
        L = len(self.names)
        skips = {L + j: f for j, f in enumerate(self.skips)}
        return ActionCodes(legend={-1: "no frame", **dict(enumerate(self.names)),
                                   **{code: f"skip {f} (this frame only)" for code, f in skips.items()}},
                           marks={**{i: n.rpartition("@")[2] for i, n in enumerate(self.names)},
                                  **{code: f"s{f}" for code, f in skips.items()}},
                           visited=tuple(range(L + len(skips))), expensive=(0,))

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        logits = self.all_logits(model, batch)
        n, steps, L = logits.shape[:3]
        real = real_mask(batch.length, steps)
        drawn = torch.multinomial(self.probs.float(), n * steps, replacement=True).view(n, steps).to(logits.device)
        chosen = F.one_hot(drawn, len(self.probs)).to(logits) * real.unsqueeze(-1)
        frame_logits = (logits * chosen[:, :, :L].unsqueeze(-1)).sum(2)
        weight = chosen[:, :, :L].sum(-1)
        spent = step_gflops(chosen, *self.action_costs(logits.device))
        return averaged_inference(frame_logits, weight, numpy(torch.where(real, drawn, -1)),
                                  numpy(spent.cumsum(1)).astype(np.float64))


@register_method
class MultiScale(_WarmupOnly):
    """Multi-Scale: every resolution on every frame, logits averaged over heads and frames."""

    name = "multiscale"
    display = "Multi-Scale"

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """No decisions: every resolution on every frame (``budget`` does not apply)."""
        used = self.lazy_needs(self.cfg)
        return self.infer(model, self.lazy_batch(frames, {name: frames.all_features(name) if name in used else None
                                                          for name in self.needs(self.cfg)}))

    @classmethod
    def lazy_needs(cls, cfg) -> list[str]:
        """Every resolution; the policy's feature only when a head reads the policy's state."""
        return list(dict.fromkeys([*cfg.backbones, *([cfg.policy] if cfg.policy_head else [])]))

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        logits = self.all_logits(model, batch)
        real = real_mask(batch.length, logits.shape[1])
        frame_logits = logits.mean(2)
        weight = real.to(logits)
        per_frame = sum(self.flops[n] + h  # everything, every frame
                        for n, h in zip(self.names, self.head_costs, strict=True))
        return averaged_inference(frame_logits, weight, np.where(numpy(real), 0, -1),
                                  np.cumsum(numpy(real) * float(per_frame), 1))


@register_method
class SCSampler(_WarmupOnly):
    """SCSampler: a classifier on the cheapest (sampler) feature ranks frames by confidence (max
    softmax, or max logit with ``rank=logit`` as AR-Net's re-implementation); the top ``topk`` are
    classified at the highest resolution and their logits averaged. Both heads are trained as the
    warm-up trains every head: video-level cross-entropy of the frame-averaged logits (the official
    re-implementation's default sampler loss; a stand-in for SCSampler's saliency ranking loss)."""

    name = "scsampler"
    display = "SCSampler"

    Config = SCSamplerConfig

    @classmethod
    def resolve(cls, cfg: TrainConfig, flops: dict[str, float], sampling: dict) -> TrainConfig:
        """As the warm-up's, with two heads: the highest resolution and the sampler's feature."""
        cfg = super().resolve(cfg, flops, sampling)
        return dataclasses.replace(cfg, backbones=(cfg.backbones[0], cfg.policy))

    @property
    def codes(self) -> ActionCodes:
        return ActionCodes(legend={-1: "no frame", 1: f"{self.cfg.policy} only", 0: self.names[0]},
                           marks={1: "c", 0: "F"}, visited=(0, 1), expensive=(0,))

    def kept(self, logits: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """(N, T) the ``topk`` frames by the sampler head's confidence (its logits at ``[:, :, 1]``)."""
        real = real_mask(length, logits.shape[1])
        sampler_logits = logits[:, :, 1] if self.cfg.rank == "logit" else logits[:, :, 1].softmax(-1)
        confidence = sampler_logits.amax(-1).masked_fill(~real, float("-inf"))
        rank = confidence.argsort(1, descending=True).argsort(1)
        return (rank < torch.clamp(length, max=self.cfg.topk).unsqueeze(1)) & real

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """The sampler's feature on every frame, then the highest resolution on the kept frames only
        (``budget`` does not apply: it reads in confidence order, not in time)."""
        full, cheap = self.names
        sampler = frames.all_features(cheap)
        keep = self.kept(self.all_logits(model, self.lazy_batch(frames, {full: None, cheap: sampler})), frames.length)
        return self.infer(model, self.lazy_batch(frames, {full: frames.all_features(full, keep), cheap: sampler}))

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        logits = self.all_logits(model, batch)
        real = real_mask(batch.length, logits.shape[1])
        keep = self.kept(logits, batch.length)
        weight = keep.to(logits)
        full, sampler = self.flops[self.names[0]] + self.head_costs[0], self.flops[self.cfg.policy] + self.head_costs[1]
        step = numpy(real) * sampler + numpy(keep) * full
        return averaged_inference(logits[:, :, 0], weight, np.where(numpy(keep), 0, np.where(numpy(real), 1, -1)),
                                  np.cumsum(step, 1))

