"""Video-level metrics, numpy/sklearn only."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """mAP over classes of non-interpolated AP (sklearn's ``average_precision_score``).

    ``scores`` (N, C) float, ``labels`` (N, C) multi-hot. Classes with no positive among the N
    videos are left out of the mean; returns ``(mAP in [0, 1], number of classes left out)``.
    """
    present = labels.sum(axis=0) > 0
    if not present.any():
        return float("nan"), int(labels.shape[1])
    ap = average_precision_score(labels[:, present], scores[:, present], average=None)
    return float(np.mean(ap)), int((~present).sum())


def hit_at_k(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of videos with any true label among their top-``k`` scores (top-1 when k = 1)."""
    top = np.argpartition(-scores, kth=min(k, scores.shape[1]) - 1, axis=1)[:, :k]
    return float(np.take_along_axis(labels, top, axis=1).any(axis=1).mean())
