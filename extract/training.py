"""What every training loop of the project shares (``finetune-backbone`` here, ``train-policy`` in
phase 2): the loss against multi-hot labels and crash-safe writes of checkpoints and logs."""
from __future__ import annotations

import csv
import os

import torch


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-video cross-entropy (N,) against the multi-hot labels normalised to a distribution
    (one-hot: plain CE)."""
    target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path``: a kill leaves the old file or the new."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_log(path: str, rows: list[dict]) -> None:
    """The per-epoch ``rows`` as a CSV file (columns: every key, in first-seen order), written atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
