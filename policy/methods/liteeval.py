"""LiteEval (Wu et al., NeurIPS 2019) and LiteEval-RL: a coarse LSTM on every frame, a gate that
decides per frame whether to read the fine features too: the network (:class:`LiteEval`) and the method.

Shapes: features ``(N, T, D)``, ``length`` ``(N,)`` real steps; steps past ``length`` leave every
state unchanged and never open the gate. Outputs are per-step logits ``(N, T, C)``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from extract.errors import ConfigError
from extract.training import soft_cross_entropy

from ..data import Batch
from ..ops import (
    Source,
    cell_step,
    keep_where,
    last_step,
    numpy,
    price,
    project_inputs,
    project_real,
    projection,
    read,
    real_mask,
    steps_in,
)
from .base import Ablation, Frames, Inference, Method, TrainConfig, register_method


class LiteEval(nn.Module):
    """LiteEval (Wu et al., NeurIPS 2019), eqs. 1-4 with the cLSTM -> fLSTM synchronisation.

    Eq. 2's ``b_t`` is read as logits (``log b_t = W_g^T [v^c_t, h^f_{t-1}, c^f_{t-1}]``) so that
    eq. 6's ``log b_k`` is defined; index 1 means "compute fine features".

    ``project`` (the official code, not the paper): each feature first goes through BatchNorm ->
    Linear -> BatchNorm -> ReLU, the coarse one to ``hidden_coarse`` units, the fine one to its own
    width; the LSTMs and the gate then read the projected features.
    """

    def __init__(self, coarse_dim: int, fine_dim: int, num_classes: int, *, hidden_coarse: int = 512,
                 hidden_fine: int = 2048, sync: bool = True, rl_baseline: bool = False, checkpoint_steps: int = 0,
                 project: bool = False):
        super().__init__()
        if hidden_coarse > hidden_fine:
            raise ConfigError("the coarse LSTM must not be wider than the fine LSTM (its state is copied into it)")
        self.hidden_coarse, self.hidden_fine, self.sync = hidden_coarse, hidden_fine, sync
        self.checkpoint_steps = checkpoint_steps
        self.project_coarse = projection(coarse_dim, hidden_coarse) if project else None
        self.project_fine = projection(fine_dim, fine_dim) if project else None
        coarse_dim = hidden_coarse if project else coarse_dim
        self.clstm = nn.LSTMCell(coarse_dim, hidden_coarse)  # eq. 1
        self.gate = nn.Linear(coarse_dim + 2 * hidden_fine, 2)  # eq. 2
        self.flstm = nn.LSTMCell(coarse_dim + fine_dim, hidden_fine)  # eq. 3
        self.classifier = nn.Linear(hidden_fine, num_classes)  # rho_t = softmax(W_p^T h^f_t)
        self.baseline = nn.Linear(coarse_dim, 1) if rl_baseline else None  # LiteEval-RL's learned baseline

    def forward(self, coarse: Source, fine: Source, length: torch.Tensor, *, mode: str = "argmax",
                tau: float = 1.0, gate: torch.Tensor | None = None, budget: int = 0,
                names: tuple[str, str] = ("", "")) -> dict[str, torch.Tensor]:
        """Eqs. 1-4 frame by frame: the one rollout of training, :meth:`LiteEvalMethod.infer` and
        ``recognize``. ``coarse`` and ``fine`` are (N, T, D) tensors, or for ``recognize`` a
        :class:`Frames` (then ``names`` are the features' names), from which a frame's fine features
        are computed only where the gate opens.

        ``mode``: ``gumbel`` (straight-through Gumbel-softmax at ``tau``, eqs. 6-7), ``bernoulli``
        (hard samples, for REINFORCE), ``sample`` (Gumbel-max), ``argmax``; ``gate`` (N, T) forces B_t;
        ``budget`` K > 0: each video stops after its K-th fine read (``recognize --budget``).

        Returns ``logits`` (N, T, C), ``gate`` B (N, T), ``log_prob`` of the chosen B (N, T),
        ``processed`` (N, T) the frames the coarse LSTM read and, when training with the RL baseline,
        ``baseline`` (N,) from the mean coarse feature over the real frames (computed here, inside
        ``forward``, so that DistributedDataParallel sees it). With ``checkpoint_steps`` K > 0,
        training keeps the activations of K steps at a time and recomputes them in the backward pass
        (same numbers and noise; less memory, more compute).
        """
        n, steps = len(length), steps_in(coarse)
        projected = self.training and self.project_coarse is not None
        if projected:  # BatchNorm in training needs the batch's statistics: every real frame first
            coarse = project_real(self.project_coarse, coarse, length)
            fine = project_real(self.project_fine, fine, length)
        elif not isinstance(coarse, torch.Tensor) and not budget:
            coarse = coarse.all_features(names[0])  # every frame's coarse features, in one batched pass
        state = (*(torch.zeros(n, self.hidden_coarse, device=length.device) for _ in range(2)),
                 *(torch.zeros(n, self.hidden_fine, device=length.device) for _ in range(2)), length.new_zeros(n))
        chunk = self.checkpoint_steps if self.checkpoint_steps and torch.is_grad_enabled() else steps
        parts = []
        for t0 in range(0, steps, chunk):
            args = (coarse, fine, length, gate, t0, min(steps, t0 + chunk), *state)
            kwargs = dict(mode=mode, tau=tau, budget=budget, names=names, projected=projected)
            if chunk < steps:
                *part, hc, cc, hf, cf, reads = checkpoint(self._steps, *args, **kwargs, use_reentrant=False)
            else:
                *part, hc, cc, hf, cf, reads = self._steps(*args, **kwargs)
            state = (hc, cc, hf, cf, reads)
            parts.append(part)
        out = {key: torch.cat([p[i] for p in parts], 1)
               for i, key in enumerate(("logits", "gate", "log_prob", "processed"))}
        if self.baseline is not None and self.training:
            mean_coarse = coarse.sum(1) / length.clamp(min=1).unsqueeze(1).to(coarse.dtype)
            out["baseline"] = self.baseline(mean_coarse).squeeze(1)
        return out

    def _steps(self, coarse: Source, fine: Source, length: torch.Tensor, gate: torch.Tensor | None, t0: int, t1: int,
               hc: torch.Tensor, cc: torch.Tensor, hf: torch.Tensor, cf: torch.Tensor, reads: torch.Tensor, *,
               mode: str, tau: float, budget: int, names: tuple[str, str], projected: bool) -> tuple[torch.Tensor, ...]:
        """Steps ``t0 .. t1 - 1`` from the states given (``reads``: fine reads so far, per video).
        Returns logits (N, K, C), B (N, K), log-probabilities (N, K), the frames processed (N, K)
        and the five states after the last step."""
        logits, gates, log_probs, processed = [], [], [], []
        batched = self.training  # training reads every frame: the LSTMs' input halves in one matmul each
        if batched:
            coarse_in = project_inputs(self.clstm, coarse[:, t0:t1])
            fine_in = project_inputs(self.flstm, torch.cat([coarse[:, t0:t1], fine[:, t0:t1]], dim=2))
        for t in range(t0, t1):
            real = (t < length) & (reads < budget if budget else True)
            vc = read(coarse, names[0], real, t)
            if not projected and self.project_coarse is not None:
                vc = self.project_coarse(vc)
            b = self.gate(torch.cat([vc, hf, cf], dim=1))
            if gate is not None:
                B = gate[:, t].to(vc)
            elif mode == "gumbel":
                B = F.gumbel_softmax(b, tau=tau, hard=True)[:, 1]
            elif mode == "bernoulli":
                B = torch.bernoulli(b.softmax(dim=1)[:, 1]).detach()
            elif mode == "sample":
                B = (b - torch.empty_like(b).exponential_().log()).argmax(dim=1).to(vc.dtype)
            else:
                B = b.argmax(dim=1).to(vc.dtype)
            B = B * real
            log_probs.append(torch.where(B > 0.5, b.log_softmax(1)[:, 1], b.log_softmax(1)[:, 0]) * real)
            vf = read(fine, names[1], B > 0.5, t)  # recognize computes it only where the gate opened
            if not projected and self.project_fine is not None:
                vf = self.project_fine(vf)
            gx_c = coarse_in[:, t - t0] if batched else project_inputs(self.clstm, vc)
            gx_f = fine_in[:, t - t0] if batched else project_inputs(self.flstm, torch.cat([vc, vf], dim=1))
            hc_next, cc_next = cell_step(self.clstm, gx_c, hc, cc)  # eq. 1
            hf_new, cf_new = cell_step(self.flstm, gx_f, hf, cf)  # eq. 3
            if self.sync:  # B_t = 0: h^f_t = [h^c_t, h^f_{t-1}[D_c:]], same for c
                hf_skip = torch.cat([hc_next, hf[:, self.hidden_coarse:]], dim=1)
                cf_skip = torch.cat([cc_next, cf[:, self.hidden_coarse:]], dim=1)
            else:
                hf_skip, cf_skip = hf, cf
            Bc = B.unsqueeze(1)
            hf_next = (1 - Bc) * hf_skip + Bc * hf_new  # eq. 4
            cf_next = (1 - Bc) * cf_skip + Bc * cf_new
            hc, cc, hf, cf = keep_where(real, (hc_next, cc_next, hf_next, cf_next), (hc, cc, hf, cf))
            reads = reads + (B > 0.5).long()
            logits.append(self.classifier(hf))
            gates.append(B)
            processed.append(real)
        return (torch.stack(logits, 1), torch.stack(gates, 1), torch.stack(log_probs, 1), torch.stack(processed, 1),
                hc, cc, hf, cf, reads)


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
    # eq. 5 per video: mean over videos of (usage - gamma)^2 | batch: the code's (batch usage - gamma)^2
    budget: str = "video"
    project: bool = False  # the code's BN-Linear-BN-ReLU on each feature (coarse -> hidden_coarse, fine -> its own dim)
    checkpoint_steps: int = 0  # > 0: recompute activations in blocks of this many steps (memory for compute)



@register_method
class LiteEvalMethod(Method):
    """LiteEval: loss CE(rho_T) + lambda (mean_t B_t - gamma)^2 (eq. 5), straight-through Gumbel."""

    name = "liteeval"
    display = "LiteEval"
    Config = LiteEvalConfig
    stops_early = True
    spends_per_frame = True
    claims_savings = True
    budget_knob = "gamma"
    stops_at_budget = True
    ablations = (Ablation("sync", "Synchronising the fine LSTM with the coarse LSTM (LiteEval Table 2)",
                          {"sync": "sync"}, ("", "--no-sync")),
                 Ablation("gamma", "Fine-feature usage target γ (LiteEval Table 3)", {"γ": "gamma"},
                          tuple(f"--gamma {g}" for g in (0.01, 0.03, 0.05, 0.1)), sort=True),
                 Ablation("lstm-size", "LSTM sizes (LiteEval Table 4)",
                          {"cLSTM units": "hidden_coarse", "fLSTM units": "hidden_fine"},
                          tuple(f"--set hidden_coarse={u}" for u in (64, 128, 256, 512)), sort=True))

    @classmethod
    def label(cls, config: dict) -> str:
        """``LiteEval (γ=0.05)``, plus ``w/o sync`` and the LSTM sizes when not 512/2048."""
        extra = [f"γ={config['gamma']:g}"]
        if not config.get("sync", True):
            extra.append("w/o sync")
        if (config["hidden_coarse"], config["hidden_fine"]) != (512, 2048):
            extra.append(f"{config['hidden_coarse']}/{config['hidden_fine']}")
        return f"{cls.display} ({', '.join(extra)})"

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
        c = self.cfg
        return model(batch.features[c.coarse], batch.features[c.fine], batch.length, names=(c.coarse, c.fine),
                     **kwargs)

    def usage(self, gate: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return gate.sum(1) / length.clamp(min=1)

    def budget(self, usage: torch.Tensor) -> torch.Tensor:
        """lambda (usage - gamma)^2 per video (eq. 5), or ``budget=batch``: of the batch's mean usage
        (the official code's MSE), the same value for every video of the batch."""
        if self.cfg.budget == "batch":
            return self.cfg.lam * (usage.mean() - self.cfg.gamma) ** 2 * torch.ones_like(usage)
        return self.cfg.lam * (usage - self.cfg.gamma) ** 2

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self._run(model, batch, mode="gumbel", tau=self.tau(epoch))
        ce = soft_cross_entropy(last_step(out["logits"], batch.length), batch.labels)
        usage = self.usage(out["gate"], batch.length)
        return (ce + self.budget(usage)).mean(), {"ce": ce.mean().detach(), "usage": usage.mean().detach()}

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

    def infer(self, model: nn.Module, batch: Batch, budget: int = 0) -> Inference:
        """The rollout (:meth:`LiteEval.forward`) by argmax (or sampled, ``stochastic_eval``); with
        ``budget`` K, each video stops after its K-th fine read (the sampled frames after it are
        "after the stop")."""
        out = self._run(model, batch, mode="sample" if self.cfg.stochastic_eval else "argmax", budget=budget)
        probs, gate, processed = out["logits"].softmax(-1), out["gate"], out["processed"]
        mask, read_ = numpy(processed), numpy(gate) > 0.5
        per_frame, per_read, head = self.policy_costs
        step = mask * (self.flops[self.cfg.coarse] + per_frame) + read_ * (self.flops[self.cfg.fine] + per_read)
        sampled = numpy(real_mask(batch.length, probs.shape[1]))
        return Inference(scores=numpy(last_step(probs, processed.sum(1))), step_scores=numpy(probs),
                         actions=np.where(mask, 1 + read_, np.where(sampled, 0, -1)),
                         step_gflops=np.cumsum(step, 1) + head)

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """:meth:`infer` itself, reading each frame's features from ``frames`` when the rollout gets
        there: the coarse features of every frame (of each frame until the stop, with ``budget``),
        the fine ones only where the gate opens."""
        return self.infer(model, self.lazy_batch(frames, {name: frames for name in self.needs(self.cfg)}), budget)


@register_method
class LiteEvalRL(LiteEvalMethod):
    """LiteEval-RL: the same model, gate trained with REINFORCE and a learned, input-dependent baseline.

    Reward R = -(CE + lambda (usage - gamma)^2) per video; the baseline regresses R from the mean
    coarse feature; the LSTMs and classifier are trained by back-propagating CE through the sampled path.
    """

    name = "liteeval-rl"
    display = "LiteEval-RL"
    stops_early = False  # LiteEval's online curve is the Gumbel method's
    claims_savings = False  # an ablation of LiteEval's training (Table 2), not one of its claims
    ablations = ()

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self._run(model, batch, mode="bernoulli")
        ce = soft_cross_entropy(last_step(out["logits"], batch.length), batch.labels)
        usage = self.usage(out["gate"], batch.length)
        reward = -(ce + self.budget(usage)).detach()
        baseline = out["baseline"]
        advantage = (reward - baseline).detach()
        policy = -(advantage * out["log_prob"].sum(1))
        loss = ce + policy + F.mse_loss(baseline, reward, reduction="none")
        return loss.mean(), {"ce": ce.mean().detach(), "usage": usage.mean().detach()}
