"""Video-level metrics, numpy only, vectorised over classes.

``average_precision``: sklearn's ``average_precision_score`` convention (non-interpolated; tied
scores form one threshold). ``interpolated_average_precision``: the official ActivityNet
classification evaluator's convention (VOC-2011 all-point interpolation over the ranked list,
ties broken by a stable sort). ``arnet_average_precision``: AR-Net's ``cal_map`` (precision at
each positive of the ranked list, no interpolation, ties broken by a stable sort; a class with no
positive counts as AP 0 in the mean). ``hit_at_k``: a video is a hit when any of its labels is in
its top k. Scores are the softmax probabilities ``predictions.h5`` holds (``cal_map`` softmaxes logits).
"""
from __future__ import annotations

import numpy as np


def _ranked(scores: np.ndarray, labels: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per class (rows), scores and labels sorted by descending score: two (C, N) arrays."""
    s = np.ascontiguousarray(scores.T)
    order = np.argsort(-s, axis=1, kind=kind)
    return np.take_along_axis(s, order, 1), np.take_along_axis(np.ascontiguousarray(labels.T), order, 1)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP (C,) as sklearn: sum over thresholds of (R_n - R_{n-1}) P_n. NaN where no positive.

    A positive contributes 1/P times the precision at the end of its group of tied scores.
    """
    s, y = _ranked(scores, labels, "quicksort")  # ties are grouped: the order inside a group is irrelevant
    n = s.shape[1]
    tp = np.cumsum(y, axis=1, dtype=np.float64)
    boundary = np.ones(s.shape, dtype=bool)
    boundary[:, :-1] = s[:, :-1] != s[:, 1:]
    ends = np.where(boundary, np.arange(n), n)
    group_end = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]  # last index of each tie group
    precision_at_end = np.take_along_axis(tp, group_end, 1) / (group_end + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(y > 0, precision_at_end, 0.0).sum(axis=1) / y.sum(axis=1)


def _precision_at_ranks(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class (rows), the labels ranked by descending score (ties broken by a stable sort) and the
    precision of the top i + 1 at each rank i: two (C, N) arrays."""
    _, y = _ranked(scores, labels, "stable")
    return y, np.cumsum(y, axis=1, dtype=np.float64) / np.arange(1, y.shape[1] + 1)


def interpolated_average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP (C,) as ActivityNet's classification evaluator: precision made monotone from the
    right (``max_{j >= i} P_j``), summed over the recall steps. NaN where no positive."""
    y, precision = _precision_at_ranks(scores, labels)
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(y > 0, envelope, 0.0).sum(axis=1) / y.sum(axis=1)


def arnet_average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP (C,) as AR-Net's ``cal_map``: the mean precision at the ranks of the positives,
    0 where a class has no positive."""
    y, precision = _precision_at_ranks(scores, labels)
    return np.where(y > 0, precision, 0.0).sum(axis=1) / np.maximum(y.sum(axis=1), 1)


AP_KINDS = {"sklearn": average_precision, "interpolated": interpolated_average_precision,
            "arnet": arnet_average_precision}


def mean_average_precision(scores: np.ndarray, labels: np.ndarray, *, kind: str = "sklearn") -> tuple[float, int]:
    """mAP over classes, ``(mAP in [0, 1], classes without a positive)``. ``kind`` is a key of
    ``AP_KINDS``; ``sklearn`` and ``interpolated`` leave classes with no positive among the N videos
    out of the mean, ``arnet`` counts them as 0. ``scores`` (N, C), ``labels`` (N, C) multi-hot."""
    ap = AP_KINDS[kind](scores, labels)
    present = labels.sum(axis=0) > 0
    if kind == "arnet":
        return float(ap.mean()), int((~present).sum())
    return (float(ap[present].mean()) if present.any() else float("nan")), int((~present).sum())


def hit_at_k(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of videos with any true label among their top-``k`` scores (top-1 when k = 1)."""
    top = np.argpartition(-scores, kth=min(k, scores.shape[1]) - 1, axis=1)[:, :k]
    return float(np.take_along_axis(labels, top, axis=1).any(axis=1).mean())
