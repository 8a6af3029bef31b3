"""The run folder ``train-policy`` writes, and its one reader (``evaluate`` and ``match_run`` use it).

Layout::

    config.json      the resolved training config (plus where the cache came from)
    metrics.json     :func:`summarise` of the evaluation split, plus ``best_epoch``
    predictions.h5   one row per evaluated video (below)
    model.pt, last.pt, train_log.csv   checkpoints and the per-epoch log (policy/train.py)

``predictions.h5``::

    /video_id     (N,) str
    /labels       (N, C) uint8 multi-hot
    /scores       (N, C) float32 video-level prediction
    /actions      (N, T) int8 the method's action code per sampled frame
    /gflops       (N,) float64 GMACs spent per video
    /step_scores  (N, S, C) float16 prediction if stopped after each step (steps: decisions in order)
    /step_gflops  (N, S) float64 GMACs spent up to and including each step
    /step_frame   (N, S) int32 the frame read at each step, -1 once stopped; only for methods whose
                  steps are not the frames in order (absent: step t is frame t, S = T)
    /<extra>      (N, S, ...) float16 per-step arrays a method adds (``frame_scores``)
    attrs: cache, dataset, actions (JSON of :class:`ActionCodes`)
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from functools import cached_property

import h5py
import numpy as np

from extract.metrics import hit_at_k, mean_average_precision

CONFIG, METRICS, PREDICTIONS = "config.json", "metrics.json", "predictions.h5"
PER_VIDEO = ("video_id", "labels", "scores", "actions", "gflops")
PER_STEP_TYPES = {"step_gflops": np.float64, "step_frame": np.int32}  # other per-step arrays: float16


class RunError(ValueError):
    """A run folder that cannot be read or does not belong with the others."""


@dataclass(frozen=True)
class ActionCodes:
    """What a run's per-frame action codes mean: ``legend`` names each code, ``marks`` gives its
    one-or-few-letter mark (the frames report), and the roles say which codes are a frame some
    backbone read (``visited``), a frame given the expensive features (``expensive``) and a
    sampled frame after the method stopped (``stopped``). ``padding`` marks steps past a video's
    length; every other code is a sampled frame."""

    legend: dict[int, str]
    marks: dict[int, str]
    visited: tuple[int, ...]
    expensive: tuple[int, ...]
    stopped: tuple[int, ...] = ()
    padding: int = -1

    def sampled(self, actions: np.ndarray) -> np.ndarray:
        return actions != self.padding

    def is_visited(self, actions: np.ndarray) -> np.ndarray:
        return np.isin(actions, self.visited)

    def is_expensive(self, actions: np.ndarray) -> np.ndarray:
        return np.isin(actions, self.expensive)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ActionCodes":
        raw = json.loads(text)
        return cls(legend={int(k): v for k, v in raw["legend"].items()},
                   marks={int(k): v for k, v in raw["marks"].items()}, visited=tuple(raw["visited"]),
                   expensive=tuple(raw["expensive"]), stopped=tuple(raw["stopped"]), padding=raw["padding"])


def summarise(scores: np.ndarray, labels: np.ndarray, actions: np.ndarray, gflops: np.ndarray, codes: ActionCodes,
              ap: str = "sklearn") -> dict:
    """The metrics of one split, the one place they are computed. mAP (AP kind ``ap``), top-1 and
    hit@5 as fractions; GFLOPs (GMACs) per video and per sampled frame (skipped ones included);
    ``frames_per_video`` sampled frames; ``fine_usage`` the share of sampled frames given the
    expensive features; ``action_usage`` the share of each named code."""
    mean_ap, left_out = mean_average_precision(scores, labels, kind=ap)
    frames = max(int(codes.sampled(actions).sum()), 1)
    usage = {name: float((actions == code).sum() / frames) for code, name in codes.legend.items()
             if code != codes.padding}
    return {"mAP": mean_ap, "frames_per_video": frames / max(len(labels), 1), "classes_without_positives": left_out,
            "top1": hit_at_k(scores, labels, 1), "hit@5": hit_at_k(scores, labels, 5),
            "gflops_per_video": float(gflops.mean()) if len(gflops) else 0.0,
            "gflops_per_frame": float(gflops.sum() / frames),
            "fine_usage": float(codes.is_expensive(actions).sum() / frames), "action_usage": usage,
            "videos": int(len(labels))}


@dataclass
class Predictions:
    """What ``predictions.h5`` holds (see the module's docstring); ``per_step`` by name."""

    video_id: list[str]
    labels: np.ndarray
    scores: np.ndarray
    actions: np.ndarray
    gflops: np.ndarray
    codes: ActionCodes
    per_step: dict[str, np.ndarray] = field(default_factory=dict)  # step_scores, step_gflops, extras


@dataclass
class RunFolder:
    """A run folder: its config, metrics and predictions. Per-video arrays are read on first use,
    per-step arrays (``step_scores``...) each time :meth:`array` asks, so a report reads only what
    it uses."""

    path: str
    config: dict
    metrics: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict, repr=False)
    _summaries: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, path: str) -> "RunFolder":
        config_path, predictions = os.path.join(path, CONFIG), os.path.join(path, PREDICTIONS)
        if not (os.path.isfile(config_path) and os.path.isfile(predictions)):
            raise RunError(f"{path} is not a finished run folder ({CONFIG} and {PREDICTIONS} are needed)")
        with open(config_path) as f:
            config = json.load(f)
        metrics = {}
        if os.path.isfile(os.path.join(path, METRICS)):
            with open(os.path.join(path, METRICS)) as f:
                metrics = json.load(f)
        with h5py.File(predictions, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if "actions" not in attrs:
            raise RunError(f"{path} was written by an older train-policy (no action roles in {PREDICTIONS}): "
                           "train it again")
        return cls(path=path, config=config, metrics=metrics, attrs=attrs)

    @staticmethod
    def is_finished(folder: str) -> bool:
        return all(os.path.isfile(os.path.join(folder, name)) for name in (CONFIG, PREDICTIONS))

    @staticmethod
    def save_config(folder: str, config: dict) -> None:
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, CONFIG), config)

    @staticmethod
    def save_results(folder: str, metrics: dict, predictions: Predictions, *, cache: str, dataset: str) -> None:
        """Write ``predictions.h5`` then ``metrics.json``, each atomically."""
        path = os.path.join(folder, PREDICTIONS)
        tmp = path + ".tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs["cache"] = os.path.abspath(cache)
            f.attrs["dataset"] = dataset
            f.attrs["actions"] = predictions.codes.to_json()
            f["video_id"] = np.array(predictions.video_id, dtype=h5py.string_dtype())
            f["labels"] = predictions.labels.astype(np.uint8)
            f["scores"] = predictions.scores.astype(np.float32)
            f["actions"] = predictions.actions.astype(np.int8)
            f["gflops"] = predictions.gflops.astype(np.float64)
            for key, value in predictions.per_step.items():
                f[key] = value.astype(PER_STEP_TYPES.get(key, np.float16), copy=False)
        os.replace(tmp, path)
        _write_json(os.path.join(folder, METRICS), metrics)

    @property
    def method(self) -> str:
        return self.config["method"]

    def typed_config(self, config_cls: type):
        """``config.json`` as the method's config dataclass ``config_cls``: its fields only, JSON
        lists back to the tuples the fields declare."""
        hints = typing.get_type_hints(config_cls)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        return config_cls(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple else v
                             for k, v in self.config.items() if k in fields})

    @property
    def dataset(self) -> str:
        return self.attrs.get("dataset", self.config.get("cache_dataset", "?"))

    @property
    def cache(self) -> str:
        return self.attrs.get("cache", self.config.get("features", ""))

    @cached_property
    def codes(self) -> ActionCodes:
        return ActionCodes.from_json(self.attrs["actions"])

    @property
    def legend(self) -> dict[int, str]:
        return self.codes.legend

    @cached_property
    def _per_video(self) -> dict[str, np.ndarray]:
        """The small per-video arrays of predictions.h5, read in one pass."""
        with h5py.File(os.path.join(self.path, PREDICTIONS), "r") as f:
            return {k: f[k][:] for k in PER_VIDEO}

    @cached_property
    def video_id(self) -> list[str]:
        return [v.decode() for v in self._per_video["video_id"]]

    @property
    def labels(self) -> np.ndarray:
        return self._per_video["labels"]

    @property
    def scores(self) -> np.ndarray:
        return self._per_video["scores"]

    @property
    def actions(self) -> np.ndarray:
        return self._per_video["actions"]

    @property
    def gflops(self) -> np.ndarray:
        return self._per_video["gflops"]

    def array(self, key: str) -> np.ndarray | None:
        """A large per-step array (``step_scores``, ``step_gflops``, ``frame_scores``), read on demand."""
        with h5py.File(os.path.join(self.path, PREDICTIONS), "r") as f:
            return f[key][:] if key in f and key not in PER_VIDEO else None

    @cached_property
    def reads_in_order(self) -> bool:
        """Whether step t is frame t (no ``step_frame`` saved)."""
        with h5py.File(os.path.join(self.path, PREDICTIONS), "r") as f:
            return "step_frame" not in f

    def step_actions(self) -> np.ndarray:
        """(N, S) the action code of the frame read at each step (``padding`` once stopped): the
        ``actions`` themselves when steps are the frames in order."""
        order = self.array("step_frame")
        if order is None:
            return self.actions
        taken = np.take_along_axis(self.actions, np.maximum(order, 0), axis=1)
        return np.where(order >= 0, taken, self.codes.padding)

    def summary(self, ap: str = "sklearn") -> dict:
        """:func:`summarise` of the saved predictions with AP kind ``ap`` (computed once per kind)."""
        if ap not in self._summaries:
            self._summaries[ap] = summarise(self.scores, self.labels, self.actions, self.gflops, self.codes, ap)
        return self._summaries[ap]


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
