"""Method registry: one config dataclass, one model, one loss and one inference per method.

A method declares what it needs (``needs``: feature names), what its actions mean (``codes``:
an :class:`~policy.run_folder.ActionCodes`, saved with every run), how its row is labelled
(``display``, ``label``), what it can do (``stops_early``, ``spends_per_frame``, ``baseline``…:
reports select runs by these), and its paper's ablation tables (``ablations``: each becomes an
``evaluate`` report).

Actions (``predictions.h5/actions``) per frame for LiteEval, UNIFORM and LSTM (``COARSE_FINE``):
-1 no frame (padding), 0 sampled after the stop (``recognize --budget``), 1 coarse features only,
2 fine features (for LiteEval coarse and fine; for UNIFORM/LSTM fine only). Methods that read
frames out of order use :func:`read_codes`; AR-Net's family its own (:mod:`policy.methods.arnet`).
GFLOPs (GMACs) per video = backbone costs from the cache's FLOPs table for what was computed,
plus the policy's own modules priced with :func:`extract.flops.count_gflops`.

Where the papers and their official code differ, the paper's reading is the default and the
code's is a named option; each config lists those fields in ``CONVENTIONS`` (shown in every row
whose run departs from the default).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from extract.errors import ConfigError

from ..data import Batch
from ..ops import numpy, real_mask
from ..run_folder import ActionCodes

COARSE_FINE = ActionCodes(legend={-1: "no frame", 0: "after the stop", 1: "coarse only", 2: "fine"},
                          marks={0: "x", 1: "c", 2: "F"}, visited=(1, 2), expensive=(2,), stopped=(0,))


@dataclass(frozen=True)
class Ablation:
    """A paper's ablation table for one method, shown by ``evaluate --report NAME``: its runs (and,
    with ``references``, those of the fixed-frame baselines), with a column per config field."""

    report: str  # the report's name
    title: str
    columns: dict[str, str]  # column -> config field (a run without the field shows "-")
    variants: tuple[str, ...]  # train-policy arguments after --method NAME that give its rows
    sort: bool = False  # rows sorted by the columns
    references: bool = False  # the fixed-frame baselines' runs are rows too (Method.fixed_frames)


def sampled_by_fps(sampling: dict) -> bool:
    """Whether a cache's sampling (its ``sampling`` attribute) is LiteEval's (frames per second)
    rather than AR-Net's / TSN's (a fixed number of segments)."""
    return sampling.get("fps") is not None


def resolve_auto(cfg: TrainConfig, sampling: dict) -> TrainConfig:
    """A copy of ``cfg`` with the ``auto`` choices a cache decides made (see :class:`TrainConfig`,
    :class:`UniformConfig`)."""
    changes = {}
    if cfg.normalise == "auto":
        changes["normalise"] = "l2" if sampled_by_fps(sampling) else "none"
    if getattr(cfg, "frames", 0) == -1:
        changes["frames"] = 25 if sampled_by_fps(sampling) else 0
    return dataclasses.replace(cfg, **changes)


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
    deterministic: bool = False  # CUDA: deterministic kernels (slower); the CPU always is
    tf32: bool = False  # CUDA: TF32 matmuls (faster on Ampere and later, ~1e-3 relative error)
    memory_budget_gb: float = 0.0  # features held in RAM, per node (its ranks share it); 0: half the memory available
    fine: str = ""  # feature name; "": the cache's most expensive feature
    coarse: str = ""  # feature name; "": the cache's cheapest feature


@dataclass
class Inference:
    """What :meth:`Method.infer` returns for a batch. Steps are decisions in the order they were
    taken: for methods that walk the frames in order (LiteEval, AR-Net, UNIFORM) step ``t`` is frame
    ``t`` and ``step_frame`` is ``None``; methods that read frames in another order (glimpses,
    jumps, a coarse-to-fine order) give ``step_frame``, the frame read at each step."""

    scores: np.ndarray  # (N, C) video-level prediction (probabilities)
    step_scores: np.ndarray  # (N, S, C) prediction if stopped after each step
    actions: np.ndarray  # (N, T) int per sampled frame, see the method's codes
    step_gflops: np.ndarray  # (N, S) GMACs spent up to and including each step (a prediction included)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # (N, S, ...) per-step arrays saved as float16
    step_frame: np.ndarray | None = None  # (N, S) int frame read at each step, -1 once the method stopped

    @property
    def gflops(self) -> np.ndarray:
        """(N,) GMACs per video: what was spent by the last step."""
        return self.step_gflops[:, -1]


class Steps(nn.Module):
    """A network whose computation lives in its method (a rollout of decisions): ``model(fn, *args)``
    runs ``fn(network, *args)`` through ``forward``, so DistributedDataParallel sees every training
    pass (a method calls the model once per loss)."""

    def forward(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)


class Frames(Protocol):
    """The sampled frames of a batch of videos as ``recognize`` serves them to :meth:`Method.lazy`:
    nothing is decoded or run through a backbone until a method asks for it. ``length`` and every
    feature are on the model's device; a lazy path makes its own tensors there (``length.device``)."""

    length: torch.Tensor  # (N,) sampled frames per video, on the model's device
    steps: int  # T: the cache's steps (padding past each video's length)

    def features(self, name: str, rows: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        """(N, D) features ``name`` of frame ``step`` (or ``step[i]``) of each video where ``rows``
        (N,) is True, zeros elsewhere, exactly as the cache holds them and training read them."""

    def all_features(self, name: str, steps: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T, D) features ``name`` of every sampled frame (``steps`` (N, T) bool: of those only),
        zeros elsewhere: for a method that reads them regardless of its decisions."""


def truncate(inf: Inference, codes: ActionCodes, budget: int) -> Inference:
    """``inf`` (steps = frames in order) stopped after each video's ``budget``-th expensive read,
    LiteEval's online setting: the prediction and the GFLOPs of that step; the sampled frames after
    it get the codes' ``stopped`` code. ``budget`` 0: unchanged."""
    if budget <= 0:
        return inf
    reads = np.cumsum(codes.is_expensive(inf.actions), 1)
    hit = reads >= budget
    stop = np.where(hit.any(1), hit.argmax(1), codes.sampled(inf.actions).sum(1) - 1).clip(min=0)
    steps = np.arange(inf.actions.shape[1])[None]
    held = np.minimum(steps, stop[:, None])
    step_scores = np.take_along_axis(inf.step_scores, held[:, :, None], 1)
    actions = np.where((steps > stop[:, None]) & codes.sampled(inf.actions), codes.stopped[0], inf.actions)
    return Inference(scores=step_scores[np.arange(len(stop)), stop], step_scores=step_scores, actions=actions,
                     step_gflops=np.take_along_axis(inf.step_gflops, held, 1))


class Method:
    """Base class; subclasses set ``name`` and ``Config`` and implement ``build``, ``loss`` and
    ``infer`` (and ``lazy`` for ``recognize``); the other hooks have defaults."""

    name: ClassVar[str]
    display: ClassVar[str] = ""  # the method's name in tables ("": the registry name)
    Config: ClassVar[type] = TrainConfig
    ablations: ClassVar[tuple[Ablation, ...]] = ()
    # What the method can do; reports select runs by these, so a new report edits no method file.
    baseline: ClassVar[bool] = False  # the method savings are measured against (UNIFORM: claims, online)
    fixed_frames: ClassVar[bool] = False  # reads a fixed set of frames, no policy (UNIFORM, LSTM): reference rows
    stops_early: ClassVar[bool] = False  # its step_scores are its prediction if stopped after each step (online)
    spends_per_frame: ClassVar[bool] = False  # decides per sampled frame what to compute (usage, frames)
    claims_savings: ClassVar[bool] = False  # claims: near the baseline's mAP at a fraction of its GFLOPs
    claims_beats_random: ClassVar[bool] = False  # claims: above random frames at its own budget
    budget_knob: ClassVar[str] = ""  # the config field that sets the target cost (claims: a sweep moves GFLOPs)
    stops_at_budget: ClassVar[bool] = False  # its lazy path honours recognize --budget (reads frames in order)

    def __init__(self, cfg: TrainConfig, dims: dict[str, int], num_classes: int, flops: dict[str, float]):
        self.cfg, self.dims, self.num_classes, self.flops = cfg, dims, num_classes, flops
        self.model = self.build()

    @classmethod
    def resolve(cls, cfg: TrainConfig, flops: dict[str, float], sampling: dict) -> TrainConfig:
        """A copy of ``cfg`` with what was left to the cache filled in (``cfg`` is not changed):
        feature names from its FLOPs table (GMACs per frame by name; fine = the most expensive
        feature, coarse = the cheapest) and ``auto`` choices from its ``sampling``."""
        by_cost = sorted(flops, key=flops.get)
        if by_cost:
            cfg = dataclasses.replace(cfg, fine=cfg.fine or by_cost[-1], coarse=cfg.coarse or by_cost[0])
        return resolve_auto(cfg, sampling)

    @staticmethod
    def needs(cfg) -> list[str]:
        return [cfg.fine]

    @classmethod
    def lazy_needs(cls, cfg) -> list[str]:
        """The features :meth:`lazy` may compute (the backbones ``recognize`` loads): ``needs``."""
        return cls.needs(cfg)

    @classmethod
    def label(cls, config: dict) -> str:
        """A table row's name for a run of this method with the saved ``config`` (``config.json``):
        the display name and, in parentheses, what sets the run apart."""
        return cls.display or cls.name

    @property
    def codes(self) -> ActionCodes:
        """What the action codes of :meth:`infer` mean (saved in ``predictions.h5``)."""
        return COARSE_FINE

    def on_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before each training epoch (stages, learning rates, freezing)."""

    def selectable(self, epoch: int) -> bool:
        """Whether this epoch's model may become the kept checkpoint."""
        return True

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(mean loss, statistics)``: the statistics are detached 0-d tensors (the training loop
        averages them per epoch; a ``.item()`` per batch would wait for the device every step)."""
        raise NotImplementedError

    def infer(self, model: nn.Module, batch: Batch) -> Inference:
        raise NotImplementedError

    def lazy_batch(self, frames: Frames, features: dict[str, torch.Tensor | Frames | None]) -> Batch:
        """A batch for :meth:`infer` over ``recognize``'s videos: each feature as computed, as
        ``frames`` itself (read when a rollout gets there), or ``None`` (never read: zeros)."""
        n, device = len(frames.length), frames.length.device
        feats = {name: torch.zeros(n, frames.steps, self.dims[name], device=device) if value is None else value
                 for name, value in features.items()}
        return Batch(np.arange(n), feats, torch.zeros(n, self.num_classes, device=device), frames.length)

    def lazy(self, model: nn.Module, frames: Frames, budget: int = 0) -> Inference:
        """What :meth:`infer` returns, computing features only where the decisions use them
        (``recognize``); with ``budget`` K > 0 (methods with ``stops_at_budget``) it stops after the
        K-th expensive read. A method without a lazy path refuses."""
        raise NotImplementedError(f"{self.name} has no lazy path for recognize")

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


METHODS: dict[str, type[Method]] = {}
CHOICES = {"normalise": ("l2", "none"), "select_on": ("val", "eval"), "budget": ("video", "batch"),
           "consensus": ("softmax", "logits"), "readout": ("last", "mean"), "rank": ("softmax", "logit"),
           "actions": ("both", "resolution", "skip"), "optim": ("sgd", "adam"), "pooling": ("max", "mean"),
           "order": ("official", "coarse-to-fine"), "output": ("emit", "stop")}
# The range of each numeric config field (of each item, for a tuple), written as in mathematics. Sizes are
# bounded so that a typo fails in one line rather than allocating: an LSTM of h units holds 16 h^2 bytes of
# recurrent weights (4 GiB at the bound 16384, 8x the papers' largest); counts of frames at 65536.
RANGES = {"seed": "[0, 4294967295]", "epochs": "[1, 100000]", "batch_size": "[1, 1048576]",
          **dict.fromkeys(("warmup_epochs", "joint_epochs", "finetune_epochs"), "[0, 100000]"),
          **dict.fromkeys(("hidden", "hidden_coarse", "hidden_fine", "scorer"), "[1, 16384]"),
          **dict.fromkeys(("steps", "memory", "agents", "glimpses", "max_frames", "topk", "skips"), "[1, 65536]"),
          "jumps": "[-65536, 65536]",  # FastForward's moves, back or forward
          "frames": "[0, 65536]", "checkpoint_steps": "[0, 65536]",  # 0: every frame / no checkpointing
          **dict.fromkeys(("lr", "warmup_lr", "joint_lr", "finetune_lr", "weight_decay", "memory_budget_gb", "lam",
                           "beta", "tau_decay", "entropy", "read_penalty", "epsilon", "gate_weight", "margin"),
                          "[0, inf)"),
          **dict.fromkeys(("tau", "tau_start", "tau_end", "sigma"), "(0, inf)"),
          **dict.fromkeys(("gamma", "alpha", "momentum", "discount", "move", "first_threshold"), "[0, 1]"),  # fractions
          "val_fraction": "[0, 0.9]"}  # at least a tenth of train is trained on
RANGE_OF = {int: "[0, 65536]", float: "(-inf, inf)"}  # a numeric field not in RANGES (any float: finite)


def within(interval: str, value: float) -> bool:
    """Whether ``value`` lies in ``interval`` (``[0, 1]``, ``(0, inf)``: brackets include the bound)."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    return (low < value if interval[0] == "(" else low <= value) and \
        (value < high if interval[-1] == ")" else value <= high)


def fits(key: str, kind: type, value: object) -> bool:
    """Whether ``value`` is what config field ``key`` of type ``kind`` holds: a bool a real bool, an
    int a real int (not a bool), a float an int or a finite float, a tuple one of such items, a str
    one of its ``CHOICES`` where it has some; numbers within their ``RANGES``."""
    if typing.get_origin(kind) is tuple:
        return isinstance(value, tuple) and all(fits(key, typing.get_args(kind)[0], v) for v in value)
    if kind in (int, float):
        number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        return number and not (isinstance(value, float) and not math.isfinite(value)) and \
            within(RANGES.get(key, RANGE_OF[kind]), value)
    return isinstance(value, typing.get_origin(kind) or kind) and (key not in CHOICES or value in CHOICES[key])


def wanted(key: str, kind: type) -> str:
    """What config field ``key`` of type ``kind`` allows, in words (the end of :func:`check_config`'s line)."""
    if typing.get_origin(kind) is tuple:
        return f"a tuple, each item {wanted(key, typing.get_args(kind)[0])}"
    if kind is bool:
        return "true or false"
    if kind is int:
        return f"an int in {RANGES.get(key, RANGE_OF[int])}"
    if kind is float:
        interval = RANGES.get(key, RANGE_OF[float])
        return "a finite number" + ("" if interval == RANGE_OF[float] else f" in {interval}")
    return f"one of {', '.join(CHOICES[key])}" if key in CHOICES else f"a {getattr(kind, '__name__', kind)}"


def check_config(cfg) -> None:
    """Refuse, in one line naming the key, the value and what is allowed (:func:`wanted`), a field of
    the config dataclass ``cfg`` that does not :func:`fit <fits>` its type hint, ``RANGES`` and
    ``CHOICES``. Called after ``resolve`` (train-policy) and on a run folder's ``config.json``
    (recognize), so nothing is built from a value of the wrong type or size."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not fits(f.name, hints[f.name], value):
            raise ConfigError(f"{f.name}={value!r}: {f.name} must be {wanted(f.name, hints[f.name])}")


def register_method(cls: type[Method]) -> type[Method]:
    """Add ``cls`` to ``METHODS`` under ``cls.name``; a name already taken is refused."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice "
                         f"({METHODS[cls.name].__module__} and {cls.__module__})")
    METHODS[cls.name] = cls
    return cls


READ, PREVIEW, NOT_READ, AFTER_STOP = 0, 1, -2, -3  # the codes of methods that read frames out of order


def read_codes(preview: str = "", stops: bool = False) -> ActionCodes:
    """The action codes of a method that reads chosen frames' expensive features (``READ``): with
    ``preview``, frames given only the cheap features are ``PREVIEW`` (named so); with ``stops``,
    frames past the last one read are ``AFTER_STOP`` (a forward-only method that stopped)."""
    legend = {-1: "no frame", READ: "expensive features read", NOT_READ: "not read"}
    marks = {READ: "F", NOT_READ: "."}
    visited = [READ]
    if preview:
        legend[PREVIEW], marks[PREVIEW] = preview, "c"
        visited.append(PREVIEW)
    if stops:
        legend[AFTER_STOP], marks[AFTER_STOP] = "after the stop", "x"
    return ActionCodes(legend=legend, marks=marks, visited=tuple(visited), expensive=(READ,),
                       stopped=(AFTER_STOP,) if stops else ())


def step_inference(probs: torch.Tensor, frames: torch.Tensor, cost: torch.Tensor, length: torch.Tensor, steps: int,
                   *, preview: torch.Tensor | None = None, stops: bool = False) -> Inference:
    """:class:`Inference` of a method that reads one frame per step in an order of its own.

    ``probs`` (N, S, C) its prediction after each step; ``frames`` (N, S) the frame read at each
    step, -1 once it stopped; ``cost`` (N, S) GMACs spent at each step (what it spends before the
    first read, such as a preview, at step 0); ``steps`` the cache's T; ``preview`` (N, T) frames
    given the cheap features. After the stop a video's prediction and spending stay as they were.
    With ``stops``, frames past the last one read are marked ``AFTER_STOP``.
    """
    n, s, c = probs.shape
    taken = frames >= 0
    last = (taken.sum(1) - 1).clamp(min=0)
    held = torch.minimum(torch.arange(s, device=probs.device).unsqueeze(0), last.unsqueeze(1))
    step_probs = probs.gather(1, held.unsqueeze(-1).expand(n, s, c))
    real = real_mask(length, steps)
    actions = torch.full((n, steps), NOT_READ, dtype=torch.long, device=probs.device)
    if preview is not None:
        actions[preview] = PREVIEW
    rows = torch.arange(n, device=probs.device).unsqueeze(1).expand(n, s)
    actions[rows[taken], frames[taken]] = READ
    if stops:
        furthest = frames.max(1).values.unsqueeze(1)
        actions[(torch.arange(steps, device=probs.device).unsqueeze(0) > furthest) & (actions == NOT_READ)] = AFTER_STOP
    actions[~real] = -1
    return Inference(scores=numpy(step_probs[:, -1]), step_scores=numpy(step_probs), actions=numpy(actions),
                     step_gflops=numpy(cost.cumsum(1)).astype(np.float64), step_frame=numpy(frames))

