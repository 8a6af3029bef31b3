"""Agents trained with REINFORCE that choose which frames to read the expensive features of:
FrameGlimpse (Yeung et al., CVPR 2016), FastForward (Fan et al., IJCAI 2018), AdaFrame (Wu et al.,
CVPR 2019) and MultiAgent (Wu et al., ICCV 2019), on cached features.

Common ground, where the cache replaces the originals' end-to-end backbones: frames are the
cache's sampled frames; an agent "reads" a frame by taking its cached expensive features (``fine``,
the cache's most expensive feature) and pays that backbone's GFLOPs from the cache's table for
every distinct frame it reads (a frame read again is computed once, as ``recognize`` computes it),
plus its own modules at every step, priced like every method's. The reward is the probability the
final prediction puts on the video's labels (:func:`~policy.methods.base.label_mass`), with a
learned baseline (a value head, not charged: it is not run at inference). Classification is
trained by back-propagation, the decisions by REINFORCE; FrameGlimpse and FastForward subtract
``read_penalty`` times the share of the video's frames read from the reward. Action codes: :func:`read_codes`; the
steps are reads in the order taken (``step_frame``). The policies' distributions skip argument
validation (``validate_args=False``): it checks values on the host, a device sync at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Normal

from extract.errors import ConfigError

from ..data import Batch
from ..ops import (
    at_frames,
    first_reads,
    frame_mask,
    keep_where,
    label_mass,
    price,
    read,
    read_costs,
    read_many,
    reinforce,
    spread_index,
    step_loss,
    steps_of,
)
from ..run_folder import ActionCodes
from .base import Frames, Inference, Method, Steps, TrainConfig, read_codes, register_method, step_inference


def _choose(dist, mode: str, forced: torch.Tensor | None) -> torch.Tensor:
    """A decision from ``dist``: ``forced`` when given, else sampled (training) or its mode."""
    if forced is not None:
        return forced
    if mode == "sample":
        return dist.sample()
    if isinstance(dist, Categorical):
        return dist.probs.argmax(-1)
    if isinstance(dist, Bernoulli):
        return (dist.probs > 0.5).to(dist.probs)
    return dist.mean


def agent_start(length: torch.Tensor, hidden: int) -> tuple:
    """How every agent's rollout starts: ``(videos alive, zero LSTM state (h, c), empty per-step records)``."""
    h = torch.zeros(len(length), hidden, device=length.device)
    out: dict[str, list] = {k: [] for k in ("logits", "frames", "log_prob", "entropy", "value")}
    return length > 0, (h, torch.zeros_like(h)), out


class _Agent(Method):
    """What the agents share: a rollout over the expensive features, REINFORCE with a value baseline."""

    stops_early = True
    claims_beats_random = True
    stops: ClassVar[bool] = False  # reads only forward: frames past the last read are "after the stop"

    @property
    def codes(self) -> ActionCodes:
        return read_codes()

    def rollout(self, model: nn.Module, batch: Batch, mode: str, forced: dict | None = None) -> dict:
        """``logits`` (N, S, C), ``frames`` (N, S) read at each step (-1 once stopped), ``log_prob``,
        ``entropy``, ``value`` (N, S); ``mode`` sample | argmax."""
        raise NotImplementedError

    @property
    def module_costs(self) -> float:
        """GMACs of the agent's own modules at one step (the backbone apart: :meth:`costs`)."""
        raise NotImplementedError

    def costs(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, S) GMACs of each step that reads ``frames`` (-1: none): the agent's modules, and the
        expensive backbone on a frame not read before."""
        return read_costs(frames, self.module_costs, self.flops[self.cfg.fine])

    @staticmethod
    def predictions(out: dict) -> torch.Tensor:
        """(N, S, C) the agent's prediction after each step: ``out["probs"]`` where its rollout
        forms one, else the softmax of the classifier at that step."""
        return out["probs"] if "probs" in out else out["logits"].softmax(-1)

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(self.rollout, batch, "sample")
        taken = (out["frames"] >= 0).to(out["logits"])
        ce = step_loss(out["logits"], batch.labels, taken)
        last = (taken.sum(1) - 1).clamp(min=0).long()
        reward = label_mass(at_frames(self.predictions(out), last), batch.labels).detach()
        reward = reward - getattr(self.cfg, "read_penalty", 0.0) * taken.sum(1) / batch.length.clamp(min=1)
        advantage = reward.unsqueeze(1) - out["value"]
        value = ((out["value"] - reward.unsqueeze(1)) ** 2 * taken).sum() / taken.sum().clamp(min=1)
        entropy = (out["entropy"] * taken).sum() / taken.sum().clamp(min=1)
        loss = ce + reinforce(out["log_prob"], advantage, taken) + value - self.cfg.entropy * entropy
        return loss, {"ce": ce.detach(), "reward": reward.mean().detach(), "reads": taken.sum(1).mean().detach()}

    def infer(self, model: nn.Module, batch: Batch, forced: dict | None = None) -> Inference:
        """Decisions by argmax (the policy's mode), or ``forced`` ones (see :meth:`rollout`)."""
        out = model(self.rollout, batch, "argmax", forced)
        return step_inference(self.predictions(out), out["frames"], self.costs(out["frames"]), batch.length,
                              steps_of(batch), stops=self.stops)

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """The rollout itself, reading each frame's features from ``frames`` when it gets there."""
        return self.infer(model, self.lazy_batch(frames, {name: frames for name in self.needs(self.cfg)}))


@dataclass
class FastForwardConfig(TrainConfig):
    hidden: int = 512
    # frames moved by each action, back or forward: the paper's -2 s to +16 s at LiteEval's 1 frame per second
    jumps: tuple[int, ...] = (-2, -1, 1, 2, 4, 8, 16)
    entropy: float = 0.01  # weight of the policies' entropy bonus
    read_penalty: float = 0.05  # subtracted from the reward per share of the video's frames read


class FastForwardNet(Steps):
    def __init__(self, dim: int, num_classes: int, hidden: int, actions: int):
        super().__init__()
        self.lstm = nn.LSTMCell(dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.policy = nn.Linear(hidden, actions)  # where to go next
        self.stop = nn.Linear(hidden, 1)  # the separate stop network
        self.value = nn.Linear(hidden, 1)


@register_method
class FastForward(_Agent):
    """FastForward: from the first frame, an LSTM reads the current frame's expensive features; a
    stop network decides whether to stop (Bernoulli) and, if not, a policy picks a move from
    ``jumps``, back or forward (Categorical; a move before the first frame lands on it, one past the
    video's end stops); the prediction is the classifier on the LSTM state where it stopped."""

    name = "fastforward"
    display = "FastForward"
    Config = FastForwardConfig
    stops = True

    def build(self) -> nn.Module:
        return FastForwardNet(self.dims[self.cfg.fine], self.num_classes, self.cfg.hidden, len(self.cfg.jumps))

    @cached_property
    def module_costs(self) -> float:
        m, hidden = self.model, self.cfg.hidden
        return (price(m.lstm, 1, self.dims[self.cfg.fine])
                + sum(price(head, 1, hidden) for head in (m.classifier, m.policy, m.stop)))

    def rollout(self, model: nn.Module, batch: Batch, mode: str, forced: dict | None = None) -> dict:
        """``forced``: {"stop": (N, S) 0/1, "actions": (N, S) index into ``jumps``}."""
        fine, length = batch.features[self.cfg.fine], batch.length
        jumps = torch.tensor(self.cfg.jumps, device=length.device)
        pos = torch.zeros_like(length)
        alive, (h, c), out = agent_start(length, self.cfg.hidden)
        for s in range(steps_of(batch)):
            h2, c2 = model.lstm(read(fine, self.cfg.fine, alive, pos), (h, c))
            h, c = keep_where(alive, (h2, c2), (h, c))
            halt = Bernoulli(logits=model.stop(h).squeeze(1), validate_args=False)
            dist = Categorical(logits=model.policy(h), validate_args=False)
            stop = _choose(halt, mode, None if forced is None else forced["stop"][:, s].float())
            action = _choose(dist, mode, None if forced is None else forced["actions"][:, s])
            out["logits"].append(model.classifier(h))
            out["frames"].append(torch.where(alive, pos, -1))
            out["log_prob"].append(halt.log_prob(stop) + dist.log_prob(action) * (1 - stop))
            out["entropy"].append(halt.entropy() + dist.entropy())
            out["value"].append(model.value(h.detach()).squeeze(1))
            ahead = (pos + jumps[action]).clamp(min=0)
            go_on = alive & (stop < 0.5) & (ahead < length)
            pos = torch.where(go_on, ahead, pos)
            alive = go_on
        return {k: torch.stack(v, 1) for k, v in out.items()}


@dataclass
class FrameGlimpseConfig(TrainConfig):
    CONVENTIONS: ClassVar[tuple[str, ...]] = ("select_on", "output")

    hidden: int = 1024
    glimpses: int = 6  # frames read (at most, with output=stop)
    sigma: float = 0.08  # std of the Gaussian location policy (locations: 0 the first frame, 1 the last)
    # the binary output: emit (the original: whether this glimpse's prediction joins the video's) | stop (ours:
    # stop glimpsing, the prediction the state's where it stopped)
    output: str = "emit"
    entropy: float = 0.0
    read_penalty: float = 0.05  # subtracted from the reward per share of the video's frames read (output=stop)


class FrameGlimpseNet(Steps):
    def __init__(self, dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTMCell(dim + 1, hidden)  # the frame's features and where it is
        self.classifier = nn.Linear(hidden, num_classes)
        self.location = nn.Linear(hidden, 1)  # the next location's mean, unbounded
        self.output = nn.Linear(hidden, 1)  # the binary output (emit, or stop)
        self.value = nn.Linear(hidden, 1)


@register_method
class FrameGlimpse(_Agent):
    """FrameGlimpse: an LSTM observes one frame per glimpse (its expensive features and its
    location), from the first frame, and emits where to look next (a Gaussian of ``sigma`` around
    an unbounded mean: the sample is kept, only the frame read is clamped to the video) and a
    binary output, both by REINFORCE, for ``glimpses`` glimpses. The original's binary output says
    whether the glimpse emits its detection; here it emits the glimpse's class prediction, and the
    video's prediction is the mean of those emitted so far (of every glimpse so far before the
    first emission). ``output=stop``: the output stops glimpsing instead, the prediction being the
    classifier on the state where it stopped."""

    name = "frameglimpse"
    display = "FrameGlimpse"
    Config = FrameGlimpseConfig

    def build(self) -> nn.Module:
        if self.cfg.output not in ("emit", "stop"):
            raise ConfigError(f"output must be emit or stop, not {self.cfg.output!r}")
        return FrameGlimpseNet(self.dims[self.cfg.fine], self.num_classes, self.cfg.hidden)

    @cached_property
    def module_costs(self) -> float:
        m, hidden = self.model, self.cfg.hidden
        return (price(m.lstm, 1, self.dims[self.cfg.fine] + 1)
                + sum(price(head, 1, hidden) for head in (m.classifier, m.location, m.output)))

    def rollout(self, model: nn.Module, batch: Batch, mode: str, forced: dict | None = None) -> dict:
        """``forced``: {"locations": (N, S) of each glimpse after the first, "output": (N, S) 0/1}.
        With ``output=emit`` also ``probs`` (N, S, C), the prediction after each glimpse."""
        fine, length = batch.features[self.cfg.fine], batch.length
        emit = self.cfg.output == "emit"
        alive, (h, c), out = agent_start(length, self.cfg.hidden)
        span, where = (length - 1).clamp(min=0).float(), torch.zeros(len(length), device=length.device)
        emitted = seen = 0.0
        probs = []
        for s in range(self.cfg.glimpses):
            place = where.clamp(0, 1)  # only the frame read is clamped; the location sampled is kept
            pos = torch.round(place * span).long()
            h2, c2 = model.lstm(torch.cat([read(fine, self.cfg.fine, alive, pos), place.unsqueeze(1)], 1), (h, c))
            h, c = keep_where(alive, (h2, c2), (h, c))
            # the heads read the state detached: REINFORCE trains them, not the LSTM (at sigma 0.08 its noisy
            # gradient would swamp the classifier's and the LSTM learns nothing)
            binary = Bernoulli(logits=model.output(h.detach()).squeeze(1), validate_args=False)
            move = Normal(model.location(h.detach()).squeeze(1), self.cfg.sigma, validate_args=False)
            said = _choose(binary, mode, None if forced is None else forced["output"][:, s].float())
            sampled = _choose(move, mode, None if forced is None else forced["locations"][:, s])
            last = s == self.cfg.glimpses - 1
            logits = model.classifier(h)
            out["logits"].append(logits)
            out["frames"].append(torch.where(alive, pos, -1))
            out["entropy"].append(binary.entropy())
            out["value"].append(model.value(h.detach()).squeeze(1))
            if emit:
                here = alive.unsqueeze(1) * logits.softmax(-1)
                emitted, seen = emitted + said.unsqueeze(1) * here, seen + here
                probs.append(torch.where(emitted.sum(1, keepdim=True) > 0, emitted, seen))
                out["log_prob"].append(binary.log_prob(said) + move.log_prob(sampled) * (not last))
            else:
                out["log_prob"].append((binary.log_prob(said) + move.log_prob(sampled) * (1 - said)) * (not last))
                alive = alive & (said < 0.5)
            alive = alive & (not last)
            where = torch.where(alive, sampled.detach(), where)
        out = {k: torch.stack(v, 1) for k, v in out.items()}
        if emit:
            stacked = torch.stack(probs, 1)
            out["probs"] = stacked / stacked.sum(2, keepdim=True).clamp(min=1e-12)
        return out


@dataclass
class AdaFrameConfig(TrainConfig):
    hidden: int = 512
    steps: int = 10  # the most frames read (AdaFrame-10)
    memory: int = 16  # frames of the cheap global memory, spread over the video
    sigma: float = 0.1  # std of the Gaussian location policy
    discount: float = 0.9  # of future rewards
    # adaptive lookahead (inference): stop once the predicted utility has fallen more than `margin` below its
    # best so far more than `lookahead` times (the paper's mu and p; its values are ours, the paper's not found)
    margin: float = 0.01
    lookahead: int = 1
    entropy: float = 0.0


class AdaFrameNet(Steps):
    def __init__(self, fine_dim: int, coarse_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.memory = nn.Linear(coarse_dim, hidden)
        self.query = nn.Linear(hidden, hidden)
        self.lstm = nn.LSTMCell(fine_dim + hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.utility = nn.Linear(hidden, 1)
        self.location = nn.Linear(hidden, 1)


@register_method
class AdaFrame(_Agent):
    """AdaFrame: a global memory of the cheap features of ``memory`` frames spread over the video;
    an LSTM reads one frame's expensive features per step with the memory attended by its state,
    starting in the middle, predicts where to look next (Gaussian, REINFORCE) and a utility, the
    expected future reward, trained by regression and used to stop at inference by the paper's
    adaptive lookahead: once the utility has fallen more than ``margin`` below its best so far
    more than ``lookahead`` times, it stops. The reward of a step is how much it raises the best
    margin so far (probability on the labels minus the best other class). Training always takes
    ``steps`` reads, as AdaFrame's."""

    name = "adaframe"
    display = "AdaFrame"
    Config = AdaFrameConfig

    @property
    def codes(self) -> ActionCodes:
        return read_codes(preview="memory (cheap features)")

    @staticmethod
    def needs(cfg: TrainConfig) -> list[str]:
        return [cfg.coarse, cfg.fine]

    def build(self) -> nn.Module:
        return AdaFrameNet(self.dims[self.cfg.fine], self.dims[self.cfg.coarse], self.num_classes, self.cfg.hidden)

    @cached_property
    def memory_frame_cost(self) -> float:
        """GMACs of one frame of the global memory: the cheap backbone and its projection."""
        return self.flops[self.cfg.coarse] + price(self.model.memory, 1, self.dims[self.cfg.coarse])

    @cached_property
    def module_costs(self) -> float:
        m, hidden = self.model, self.cfg.hidden
        attention = 2 * self.cfg.memory * hidden / 1e9  # scores and the weighted sum
        return (price(m.lstm, 1, self.dims[self.cfg.fine] + hidden) + attention
                + sum(price(head, 1, hidden) for head in (m.query, m.classifier, m.utility, m.location)))

    def rollout(self, model: nn.Module, batch: Batch, mode: str, forced: dict | None = None) -> dict:
        """``forced``: {"locations": (N, S) in [0, 1] of each read after the first, "stop": (N, S) 0/1}."""
        fine, length = batch.features[self.cfg.fine], batch.length
        memory_frames = spread_index(length, self.cfg.memory)
        distinct = first_reads(memory_frames)  # a short video's memory: its distinct frames (at most `memory`)
        memory = model.memory(read_many(batch.features[self.cfg.coarse], self.cfg.coarse, memory_frames))
        alive, (h, c), out = agent_start(length, self.cfg.hidden)
        span, where = (length - 1).clamp(min=0).float(), torch.full((len(length),), 0.5, device=length.device)
        best, drops = torch.full_like(where, float("-inf")), torch.zeros_like(length)  # the adaptive lookahead's
        for s in range(self.cfg.steps):
            pos = torch.round(where * span).long()
            attention = (memory @ model.query(h).unsqueeze(2)).squeeze(2) / self.cfg.hidden ** 0.5
            attention = attention.masked_fill(~distinct, float("-inf"))
            context = (attention.softmax(1).unsqueeze(2) * memory).sum(1)
            h2, c2 = model.lstm(torch.cat([read(fine, self.cfg.fine, alive, pos), context], 1), (h, c))
            h, c = keep_where(alive, (h2, c2), (h, c))
            utility = model.utility(h).squeeze(1)
            move = Normal(torch.sigmoid(model.location(h).squeeze(1)), self.cfg.sigma, validate_args=False)
            sampled = _choose(move, mode, None if forced is None else forced["locations"][:, s])
            nxt = sampled.clamp(0, 1)  # only the frame is clamped; the log-probability is the sample's
            out["logits"].append(model.classifier(h))
            out["frames"].append(torch.where(alive, pos, -1))
            out["log_prob"].append(move.log_prob(sampled) * (s < self.cfg.steps - 1))  # the last location: unused
            out["entropy"].append(move.entropy())
            out["value"].append(utility)
            best = torch.maximum(best, utility)
            drops = drops + (alive & (best - utility > self.cfg.margin)).long()
            if forced is not None:
                stop = forced["stop"][:, s] > 0
            elif mode == "sample":  # training reads every step
                stop = torch.zeros_like(alive)
            else:
                stop = drops > self.cfg.lookahead
            alive = alive & ~stop
            where = torch.where(alive, nxt.detach(), where)
        return {k: torch.stack(v, 1) for k, v in out.items()} | {"memory_frames": memory_frames, "distinct": distinct}

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(self.rollout, batch, "sample")
        logits = out["logits"]
        taken = (out["frames"] >= 0).to(logits)
        ce = step_loss(logits, batch.labels, taken)
        probs = logits.softmax(-1).detach()
        on_label = label_mass(probs, batch.labels.unsqueeze(1))
        other = probs.masked_fill(batch.labels.unsqueeze(1) > 0, 0).amax(-1)
        margin = on_label - other  # (N, S)
        best = torch.cummax(margin, 1).values
        reward = torch.cat([torch.zeros_like(margin[:, :1]), (margin[:, 1:] - best[:, :-1]).clamp(min=0)], 1)
        future = torch.zeros_like(reward)  # return of the location chosen at step s: rewards from step s + 1 on
        running = torch.zeros_like(reward[:, 0])
        for s in range(reward.shape[1] - 1, 0, -1):
            running = reward[:, s] + self.cfg.discount * running
            future[:, s - 1] = running
        utility = ((out["value"] - future) ** 2 * taken).sum() / taken.sum().clamp(min=1)
        loss = ce + reinforce(out["log_prob"], future - out["value"], taken) + utility
        return loss, {"ce": ce.detach(), "reward": reward.sum(1).mean().detach()}

    def infer(self, model: nn.Module, batch: Batch, forced: dict | None = None) -> Inference:
        out = model(self.rollout, batch, "argmax", forced)
        cost = self.costs(out["frames"])
        cost[:, 0] += out["distinct"].sum(1) * self.memory_frame_cost
        steps = steps_of(batch)
        return step_inference(out["logits"].softmax(-1), out["frames"], cost, batch.length, steps,
                              preview=frame_mask(out["memory_frames"], steps))


@dataclass
class MultiAgentConfig(TrainConfig):
    hidden: int = 512
    agents: int = 4  # agents, starting at the centres of equal segments
    steps: int = 3  # moves per agent; each agent reads a frame before its first move and after each
    move: float = 0.05  # a move's length as a fraction of the video (at least one frame)
    entropy: float = 0.01


class MultiAgentNet(Steps):
    def __init__(self, dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.observe = nn.Linear(dim, hidden)
        self.gru = nn.GRUCell(2 * hidden, hidden)  # its own observation and its neighbours' mean (context)
        self.policy = nn.Linear(hidden, 3)  # back, stay, forward
        self.value = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(dim, num_classes)  # on a frame's features


def nearby(agents: int, device: torch.device) -> torch.Tensor:
    """(A, A) row i averages agent i's nearby agents, i - 1 and i + 1 (one at either end; none alone)."""
    near = torch.ones(agents, agents, device=device).triu(1).tril(1)
    near = near + near.T
    return near / near.sum(1, keepdim=True).clamp(min=1)


@register_method
class MultiAgent(_Agent):
    """MultiAgent: ``agents`` agents share a context-aware GRU (its own observation and the mean of
    its nearby agents', the one before and the one after it, as they start, in the video); each
    reads the frame under its pointer, then moves it back, keeps it or moves it forward, ``steps``
    times. The prediction averages the frame classifier over the frames the agents end on; one
    shared reward (REINFORCE, value baseline). The original's 3D clips are single frames here. Its
    modules are charged at every agent's step; the backbone once per distinct frame (an agent that
    stays, or two on one frame, re-observe features computed once)."""

    name = "multiagent"
    display = "MultiAgent"
    Config = MultiAgentConfig
    stops_early = False  # its agents read in parallel: no prediction after each step

    def build(self) -> nn.Module:
        return MultiAgentNet(self.dims[self.cfg.fine], self.num_classes, self.cfg.hidden)

    @cached_property
    def module_costs(self) -> float:
        m, hidden, dim = self.model, self.cfg.hidden, self.dims[self.cfg.fine]
        return (price(m.observe, 1, dim) + price(m.gru, 1, 2 * hidden) + price(m.policy, 1, hidden)
                + price(m.classifier, 1, dim))

    def rollout(self, model: nn.Module, batch: Batch, mode: str, forced: dict | None = None) -> dict:
        """``forced``: {"moves": (N, steps, agents) in 0 back, 1 stay, 2 forward}. Steps are reads,
        agent by agent within each round."""
        fine, length = batch.features[self.cfg.fine], batch.length
        n, agents = len(length), self.cfg.agents
        pos = spread_index(length, agents)  # (N, A)
        neighbours = nearby(agents, length.device)
        stride = (self.cfg.move * length.float()).round().long().clamp(min=1).unsqueeze(1)
        h = torch.zeros(n * agents, self.cfg.hidden, device=length.device)
        real = (length > 0).unsqueeze(1).expand(n, agents)
        out: dict[str, list] = {k: [] for k in ("logits", "frames", "log_prob", "entropy", "value")}
        for s in range(self.cfg.steps + 1):
            feats = read_many(fine, self.cfg.fine, pos)  # (N, A, D)
            seen = model.observe(feats)
            context = neighbours.to(seen) @ seen
            h = model.gru(torch.cat([seen, context], 2).reshape(n * agents, -1), h)
            logits = model.classifier(feats).mean(1, keepdim=True).expand(n, agents, -1)  # the agents' prediction
            dist = Categorical(logits=model.policy(h).view(n, agents, 3), validate_args=False)
            last = s == self.cfg.steps
            move = _choose(dist, mode, None if forced is None or last else forced["moves"][:, s])
            out["logits"].append(logits)
            out["frames"].append(torch.where(real, pos, -1))
            out["log_prob"].append(dist.log_prob(move) * (not last))
            out["entropy"].append(dist.entropy() * (not last))
            out["value"].append(model.value(h.detach()).view(n, agents))
            if not last:
                pos = (pos + (move - 1) * stride).clamp(min=0)
                pos = torch.minimum(pos, (length - 1).clamp(min=0).unsqueeze(1))
        return {k: torch.cat(v, 1) for k, v in out.items()}
