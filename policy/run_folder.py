"""The run folder ``train-policy`` writes, and its one reader (``evaluate`` and ``match_run`` use it).

Layout::

    config.json      the resolved training config (plus where the cache came from and ``run_id``)
    metrics.json     :func:`summarise` of the evaluation split, plus ``best_epoch`` and ``run_id``
    predictions.h5   one row per evaluated video (below)
    model.pt, last.pt, train_log.csv   checkpoints and the per-epoch log (policy/train.py)
    .lock            held by the run writing the folder (:mod:`extract.locks`)

A run is finished when ``predictions.h5`` and ``metrics.json`` exist and carry the ``run_id`` of
``config.json``. A run starts by removing them (the folder is then visibly unfinished) and writes
them last, so a killed, failed or concurrent run never leaves a folder that reads as finished with
another run's numbers; readers refuse anything else in one line (:class:`RunError`).

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
    attrs: cache, dataset, actions (JSON of :class:`ActionCodes`), run_id
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
import uuid
from dataclasses import dataclass, field
from functools import cached_property

import h5py
import numpy as np

from extract.atomic import replacing, write_text
from extract.errors import UserError
from extract.metrics import hit_at_k, mean_average_precision

CONFIG, METRICS, PREDICTIONS = "config.json", "metrics.json", "predictions.h5"
MODEL, LAST, LOG, LOCK = "model.pt", "last.pt", "train_log.csv", ".lock"
RESULTS = (PREDICTIONS, METRICS)  # written last, removed first
RUN_ID = "run_id"
PER_VIDEO = ("video_id", "labels", "scores", "actions", "gflops")
STEP_SCORES, STEP_GFLOPS, STEP_FRAME, FRAME_SCORES = "step_scores", "step_gflops", "step_frame", "frame_scores"
PER_STEP_TYPES = {STEP_GFLOPS: np.float64, STEP_FRAME: np.int32}  # other per-step arrays: float16


class RunError(UserError, ValueError):
    """A run folder that cannot be read or does not belong with the others."""


class NonFinite(UserError, ValueError):
    """Scores or GFLOPs that are NaN or infinite: no metric is computed from them."""


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


def check_finite(scores: np.ndarray, gflops: np.ndarray) -> None:
    """Raise :class:`NonFinite` when any video's scores (N, C) or GFLOPs (N,) are NaN or infinite."""
    bad = ~np.isfinite(scores).all(axis=1) | ~np.isfinite(gflops)
    if bad.any():
        raise NonFinite(f"{int(bad.sum())} of {len(bad)} videos have non-finite scores or GFLOPs (NaN or inf): "
                        "the model diverged; no metric is computed from them")


def summarise(scores: np.ndarray, labels: np.ndarray, actions: np.ndarray, gflops: np.ndarray, codes: ActionCodes,
              ap: str = "sklearn") -> dict:
    """The metrics of one split, the one place they are computed. mAP (AP kind ``ap``), top-1 and
    hit@5 as fractions; GFLOPs (GMACs) per video and per sampled frame (skipped ones included);
    ``frames_per_video`` sampled frames; ``fine_usage`` the share of sampled frames given the
    expensive features; ``action_usage`` the share of each named code."""
    check_finite(scores, gflops)
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

    @classmethod
    def of(cls, video_id: list[str], labels: np.ndarray, inf, codes: ActionCodes) -> "Predictions":
        """The predictions of a method's :class:`~policy.methods.Inference` ``inf`` on ``video_id``."""
        per_step = {STEP_SCORES: inf.step_scores, STEP_GFLOPS: inf.step_gflops, **inf.extra}
        if inf.step_frame is not None:
            per_step[STEP_FRAME] = inf.step_frame
        return cls(video_id=video_id, labels=labels, scores=inf.scores, actions=inf.actions, gflops=inf.gflops,
                   codes=codes, per_step=per_step)


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
        """The finished run in ``path``; :class:`RunError` in one line for anything else (unfinished,
        mixed, damaged, non-finite)."""
        config = read_config(path)
        missing = [name for name in RESULTS if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise RunError(f"{path} is an unfinished run (no {' or '.join(missing)}: still training, killed or "
                           "failed); train-policy --resume finishes it")
        metrics = _read_json(os.path.join(path, METRICS))
        try:
            with h5py.File(os.path.join(path, PREDICTIONS), "r") as f:
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                _check_shapes(f)
        except (OSError, KeyError) as err:
            raise RunError(f"{os.path.join(path, PREDICTIONS)} is damaged ({str(err).splitlines()[0][:100]}): "
                           "train the run again") from None
        except ValueError as err:
            raise RunError(f"{os.path.join(path, PREDICTIONS)} {err}: train the run again") from None
        if "actions" not in attrs:
            raise RunError(f"{path} was written by an older train-policy (no action roles in {PREDICTIONS}): "
                           "train it again")
        ids = {CONFIG: config.get(RUN_ID), METRICS: metrics.get(RUN_ID), PREDICTIONS: attrs.get(RUN_ID)}
        if None in ids.values() or len(set(ids.values())) > 1:
            raise RunError(f"{path} mixes files of different runs (run ids {ids}): train it again, or "
                           "--resume it")
        metrics.pop(RUN_ID)  # checked: the metrics themselves are what readers want
        run = cls(path=path, config=config, metrics=metrics, attrs=attrs)
        try:
            check_finite(run.scores, run.gflops)
        except NonFinite as err:
            raise RunError(f"{path}: {err}") from None
        except OSError as err:
            raise RunError(f"{os.path.join(path, PREDICTIONS)} is damaged ({str(err).splitlines()[0][:100]}): "
                           "train the run again") from None
        return run

    @staticmethod
    def start(folder: str, config: dict, *, fresh: bool) -> dict:
        """Begin writing a run in ``folder`` (hold its lock): remove the results first (the folder
        is then visibly unfinished), with ``fresh`` also the checkpoints and the log, then write
        ``config`` with a run id (a new one when ``fresh``, else the folder's). Returns it as written."""
        run_id = uuid.uuid4().hex
        if not fresh and os.path.isfile(os.path.join(folder, CONFIG)):
            run_id = read_config(folder).get(RUN_ID) or run_id
        for name in RESULTS + ((MODEL, LAST, LOG) if fresh else ()):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        config = {**config, RUN_ID: run_id}
        _write_json(os.path.join(folder, CONFIG), config)
        return config

    @staticmethod
    def save_config(folder: str, config: dict) -> None:
        """Write ``config`` as a fresh run's (:meth:`start`)."""
        os.makedirs(folder, exist_ok=True)
        RunFolder.start(folder, config, fresh=True)

    @staticmethod
    def save_results(folder: str, metrics: dict, predictions: Predictions, *, cache: str, dataset: str) -> None:
        """Write ``predictions.h5`` then ``metrics.json``, each crash-safe, stamped with the run id of
        the folder's ``config.json``: the run is finished once both are there."""
        run_id = read_config(folder)[RUN_ID]
        with replacing(os.path.join(folder, PREDICTIONS)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["cache"] = os.path.abspath(cache)
            f.attrs["dataset"] = dataset
            f.attrs["actions"] = predictions.codes.to_json()
            f.attrs[RUN_ID] = run_id
            f["video_id"] = np.array(predictions.video_id, dtype=h5py.string_dtype())
            f["labels"] = predictions.labels.astype(np.uint8)
            f["scores"] = predictions.scores.astype(np.float32)
            f["actions"] = predictions.actions.astype(np.int8)
            f["gflops"] = predictions.gflops.astype(np.float64)
            for key, value in predictions.per_step.items():
                f[key] = value.astype(PER_STEP_TYPES.get(key, np.float16), copy=False)
        _write_json(os.path.join(folder, METRICS), {**metrics, RUN_ID: run_id})

    @property
    def method(self) -> str:
        return self.config["method"]

    def typed_config(self, config_cls: type):
        """``config.json`` as the method's config dataclass ``config_cls``: its fields only, each
        required (a default may not be what the run used), JSON lists back to the tuples the fields
        declare (the values' types and ranges are :func:`~policy.methods.check_config`'s business)."""
        hints = typing.get_type_hints(config_cls)
        missing = [f.name for f in dataclasses.fields(config_cls) if f.name not in self.config]
        if missing:
            raise RunError(f"{os.path.join(self.path, CONFIG)} lacks {', '.join(missing)} (damaged, or written by an "
                           "older train-policy): train the run again")
        values = {}
        for f in dataclasses.fields(config_cls):
            value = self.config[f.name]
            if typing.get_origin(hints[f.name]) is tuple:
                if not isinstance(value, list):
                    raise RunError(f"{os.path.join(self.path, CONFIG)}: {f.name}={value!r} is not a list")
                value = tuple(value)
            values[f.name] = value
        return config_cls(**values)

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
            return STEP_FRAME not in f

    def step_actions(self) -> np.ndarray:
        """(N, S) the action code of the frame read at each step (``padding`` once stopped): the
        ``actions`` themselves when steps are the frames in order."""
        order = self.array(STEP_FRAME)
        if order is None:
            return self.actions
        taken = np.take_along_axis(self.actions, np.maximum(order, 0), axis=1)
        return np.where(order >= 0, taken, self.codes.padding)

    def summary(self, ap: str = "sklearn") -> dict:
        """:func:`summarise` of the saved predictions with AP kind ``ap`` (computed once per kind)."""
        if ap not in self._summaries:
            self._summaries[ap] = summarise(self.scores, self.labels, self.actions, self.gflops, self.codes, ap)
        return self._summaries[ap]


def read_config(folder: str) -> dict:
    """``folder``'s ``config.json``: a JSON object naming its method, or :class:`RunError` in one line."""
    config = _read_json(os.path.join(folder, CONFIG))
    if not isinstance(config.get("method"), str):
        raise RunError(f"{os.path.join(folder, CONFIG)} names no method: it is not a run's config")
    return config


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not JSON ({str(err)[:80]}): damaged; train the run again") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} holds a JSON {type(data).__name__}, not an object: damaged; train the run again")
    return data


def _check_shapes(f: h5py.File) -> None:
    """Raise ValueError naming the first array of ``predictions.h5`` whose shape disagrees with the layout."""
    for key in PER_VIDEO:
        if key not in f:
            raise ValueError(f"lacks /{key}")
    n, shape = len(f["video_id"]), f["labels"].shape
    want = {"video_id": (n,), "labels": (n, shape[-1]), "scores": (n, shape[-1]), "gflops": (n,)}
    if len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"has /labels of shape {shape}, not (videos, classes)")
    for key in f:
        got = f[key].shape
        bad = got != want[key] if key in want else (len(got) < 2 or got[0] != n)
        if key == "step_scores":
            bad = bad or len(got) != 3 or got[2] != shape[1]
        if bad:
            raise ValueError(f"has /{key} of shape {got}, not fitting {n} videos of {shape[1]} classes")


def _write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))
