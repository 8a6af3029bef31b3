"""The networks trained on cached features: LiteEval (coarse-to-fine) and the UNIFORM / LSTM baselines.

Shapes: features ``(N, T, D)``, ``length`` ``(N,)`` real steps; steps past ``length`` leave every
state unchanged and never open the gate. Outputs are per-step logits ``(N, T, C)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from extract.errors import ConfigError


def project_inputs(cell: nn.LSTMCell, x: torch.Tensor) -> torch.Tensor:
    """The input half of an LSTM cell's gates for every step at once: ``(N, T, 4H)``."""
    return F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh)


def cell_step(cell: nn.LSTMCell, gates_x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """One ``nn.LSTMCell`` step (gate order i, f, g, o) given the projected input ``gates_x``."""
    i, f, g, o = (gates_x + F.linear(h, cell.weight_hh)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def real_mask(length: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps) bool: True at each video's real steps (``t < length``), False on padding."""
    return torch.arange(steps, device=length.device).unsqueeze(0) < length.unsqueeze(1)


def projection(dim_in: int, dim_out: int) -> nn.Sequential:
    """The official LiteEval code's input projection: BatchNorm, Linear, BatchNorm, ReLU."""
    return nn.Sequential(nn.BatchNorm1d(dim_in), nn.Linear(dim_in, dim_out), nn.BatchNorm1d(dim_out), nn.ReLU())


def project_real(module: nn.Module, x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``module`` on the real steps of (N, T, D) ``x`` only (BatchNorm statistics exclude padding); zeros elsewhere."""
    real = real_mask(length, x.shape[1])
    out = x.new_zeros(*x.shape[:2], module[1].out_features)
    out[real] = module(x[real])
    return out


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

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor, length: torch.Tensor, *, mode: str = "argmax",
                tau: float = 1.0, gate: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``mode``: ``gumbel`` (straight-through Gumbel-softmax at ``tau``, eqs. 6-7), ``bernoulli``
        (hard samples, for REINFORCE), ``sample`` (Gumbel-max), ``argmax``; ``gate`` (N, T) forces B_t.

        Returns ``logits`` (N, T, C), ``gate`` B (N, T), ``log_prob`` of the chosen B (N, T) and, with
        the RL baseline, ``baseline`` (N,) from the mean coarse feature over the real frames. The
        baseline is computed here, inside ``forward``, so that DistributedDataParallel sees it.
        With ``checkpoint_steps`` K > 0, training keeps the activations of K steps at a time and
        recomputes them in the backward pass (same numbers and noise; less memory, more compute).
        """
        n, steps, _ = coarse.shape
        if self.project_coarse is not None:
            coarse = project_real(self.project_coarse, coarse, length)
            fine = project_real(self.project_fine, fine, length)
        state = (coarse.new_zeros(n, self.hidden_coarse), coarse.new_zeros(n, self.hidden_coarse),
                 coarse.new_zeros(n, self.hidden_fine), coarse.new_zeros(n, self.hidden_fine))
        chunk = self.checkpoint_steps if self.checkpoint_steps and torch.is_grad_enabled() else steps
        parts = []
        for t0 in range(0, steps, chunk):
            args = (coarse[:, t0:t0 + chunk], fine[:, t0:t0 + chunk], length - t0,
                    None if gate is None else gate[:, t0:t0 + chunk], *state)
            if chunk < steps:
                *part, hc, cc, hf, cf = checkpoint(self._steps, *args, mode=mode, tau=tau, use_reentrant=False)
            else:
                *part, hc, cc, hf, cf = self._steps(*args, mode=mode, tau=tau)
            state = (hc, cc, hf, cf)
            parts.append(part)
        out = {key: torch.cat([p[i] for p in parts], 1) for i, key in enumerate(("logits", "gate", "log_prob"))}
        if self.baseline is not None:
            mean_coarse = coarse.sum(1) / length.clamp(min=1).unsqueeze(1).to(coarse.dtype)
            out["baseline"] = self.baseline(mean_coarse).squeeze(1)
        return out

    def _steps(self, coarse: torch.Tensor, fine: torch.Tensor, length: torch.Tensor, gate: torch.Tensor | None,
               hc: torch.Tensor, cc: torch.Tensor, hf: torch.Tensor, cf: torch.Tensor, *, mode: str,
               tau: float) -> tuple[torch.Tensor, ...]:
        """Eqs. 1-4 over the steps of ``coarse`` (N, K, Dc) from the states given; ``length`` counts
        from the first of them. Returns logits (N, K, C), B (N, K), log-probabilities (N, K) and the
        four states after the last step."""
        logits, gates, log_probs = [], [], []
        coarse_in = project_inputs(self.clstm, coarse)  # one large matmul instead of K small ones
        fine_in = project_inputs(self.flstm, torch.cat([coarse, fine], dim=2))
        for t in range(coarse.shape[1]):
            real = (t < length).to(coarse.dtype).unsqueeze(1)
            vc = coarse[:, t]
            b = self.gate(torch.cat([vc, hf, cf], dim=1))
            if gate is not None:
                B = gate[:, t].to(coarse)
            elif mode == "gumbel":
                B = F.gumbel_softmax(b, tau=tau, hard=True)[:, 1]
            elif mode == "bernoulli":
                B = torch.bernoulli(b.softmax(dim=1)[:, 1]).detach()
            elif mode == "sample":
                B = (b - torch.empty_like(b).exponential_().log()).argmax(dim=1).to(coarse.dtype)
            else:
                B = b.argmax(dim=1).to(coarse.dtype)
            B = B * real[:, 0]
            log_probs.append(torch.where(B > 0.5, b.log_softmax(1)[:, 1], b.log_softmax(1)[:, 0]) * real[:, 0])
            hc_next, cc_next = cell_step(self.clstm, coarse_in[:, t], hc, cc)  # eq. 1
            hf_new, cf_new = cell_step(self.flstm, fine_in[:, t], hf, cf)  # eq. 3
            if self.sync:  # B_t = 0: h^f_t = [h^c_t, h^f_{t-1}[D_c:]], same for c
                hf_skip = torch.cat([hc_next, hf[:, self.hidden_coarse:]], dim=1)
                cf_skip = torch.cat([cc_next, cf[:, self.hidden_coarse:]], dim=1)
            else:
                hf_skip, cf_skip = hf, cf
            Bc = B.unsqueeze(1)
            hf_next = (1 - Bc) * hf_skip + Bc * hf_new  # eq. 4
            cf_next = (1 - Bc) * cf_skip + Bc * cf_new
            hc, cc = real * hc_next + (1 - real) * hc, real * cc_next + (1 - real) * cc
            hf, cf = real * hf_next + (1 - real) * hf, real * cf_next + (1 - real) * cf
            logits.append(self.classifier(hf))
            gates.append(B)
        return torch.stack(logits, 1), torch.stack(gates, 1), torch.stack(log_probs, 1), hc, cc, hf, cf


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
