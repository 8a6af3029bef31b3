"""Run folders as ``evaluate`` sees them: config, predictions, and metrics recomputed from them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property

import h5py
import numpy as np

from extract.metrics import hit_at_k, mean_average_precision
from policy.methods import METHODS

class RunError(ValueError):
    """A run folder that cannot be read or does not belong with the others."""


@dataclass
class Run:
    path: str
    config: dict
    attrs: dict = field(default_factory=dict)
    _metrics: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def dataset(self) -> str:
        return self.attrs.get("dataset", self.config.get("cache_dataset", "?"))

    @property
    def cache(self) -> str:
        return self.attrs.get("cache", self.config.get("features", ""))

    @property
    def conventions(self) -> list[str]:
        """The method's ``CONVENTIONS`` fields this run set away from the paper's reading (the
        official code's options), as ``key=value``; empty: the paper's reading throughout."""
        cls = METHODS.get(self.method)
        if cls is None:
            return []
        defaults = cls.Config()
        return [f"{k}={self.config[k]}" for k in cls.Config.CONVENTIONS
                if k in self.config and self.config[k] != getattr(defaults, k)]

    @property
    def features(self) -> str:
        """How the run read the features: ``l2`` (per-frame L2 normalised) or ``none`` (raw)."""
        if "normalise" in self.config:
            return self.config["normalise"]
        return "l2" if self.config.get("l2_normalise") else "none"  # runs written before the normalise option

    @property
    def label(self) -> str:
        """Display name with what distinguishes this run from the method's defaults, the official
        code's conventions it used included."""
        convention = "; ".join(self.conventions)
        base = self._base_label
        if not convention:
            return base
        return f"{base[:-1]}; {convention})" if base.endswith(")") else f"{base} ({convention})"

    @property
    def _base_label(self) -> str:
        """The method's own label for this config (a run of a method no longer registered: its name)."""
        cls = METHODS.get(self.method)
        return cls.label(self.config) if cls else self.method

    @cached_property
    def _per_video(self) -> dict[str, np.ndarray]:
        """The small per-video arrays of predictions.h5, read in one pass."""
        with h5py.File(os.path.join(self.path, "predictions.h5"), "r") as f:
            return {k: f[k][:] for k in ("video_id", "labels", "scores", "actions", "gflops")}

    @cached_property
    def video_id(self) -> list[str]:
        return [v.decode() for v in self._per_video["video_id"]]

    labels = property(lambda self: self._per_video["labels"])
    scores = property(lambda self: self._per_video["scores"])
    actions = property(lambda self: self._per_video["actions"])
    gflops = property(lambda self: self._per_video["gflops"])

    def array(self, key: str) -> np.ndarray | None:
        """A large per-step array (``step_scores``, ``step_gflops``, ``frame_scores``), read on demand."""
        with h5py.File(os.path.join(self.path, "predictions.h5"), "r") as f:
            return f[key][:] if key in f else None

    @property
    def legend(self) -> dict[int, str]:
        return {int(k): v for k, v in json.loads(self.attrs.get("actions_legend", "{}")).items()}

    def metrics(self, ap: str = "sklearn") -> dict[str, float]:
        """mAP (%) of AP kind ``ap``, classes without a positive, top-1 (%), frames per video, GFLOPs per
        frame and per video; computed once per AP kind."""
        if ap not in self._metrics:
            mean_ap, left_out = mean_average_precision(self.scores, self.labels, kind=ap)
            frames = max(int((self.actions != -1).sum()), 1)
            self._metrics[ap] = {
                "mAP": 100 * mean_ap, "left_out": left_out, "top1": 100 * hit_at_k(self.scores, self.labels, 1),
                "frames_v": frames / max(len(self.labels), 1),
                "gflops_f": float(self.gflops.sum() / frames), "gflops_v": float(self.gflops.mean())}
        return self._metrics[ap]


def load_run(path: str) -> Run:
    config_path, predictions = os.path.join(path, "config.json"), os.path.join(path, "predictions.h5")
    if not (os.path.isfile(config_path) and os.path.isfile(predictions)):
        raise RunError(f"{path} is not a finished run folder (config.json and predictions.h5 are needed)")
    with open(config_path) as f:
        config = json.load(f)
    with h5py.File(predictions, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return Run(path=path, config=config, attrs=attrs)


def find_runs(paths: list[str]) -> list[Run]:
    """Every finished run folder at or below ``paths``, in path order."""
    found = []
    for top in paths:
        if not os.path.exists(top):
            raise RunError(f"{top} does not exist")
        for folder, _, files in sorted(os.walk(top)):
            if "predictions.h5" in files and "config.json" in files:
                found.append(load_run(folder))
    return found
