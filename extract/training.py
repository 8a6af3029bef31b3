"""The one training loop of the project (``finetune-backbone`` here, ``train-policy`` in phase 2),
and what both share: the loss against multi-hot labels and crash-safe writes of checkpoints and logs.

:func:`fit` is the loop, read top to bottom: per epoch ``on_epoch`` (learning rates, stages), the
training steps, validation on rank 0, the kept checkpoint (best validation mAP, a tie to the later
epoch), the resume point and the CSV log. Under ``torchrun`` the model is wrapped in
DistributedDataParallel (the raw module is what is saved) and every rank takes part in every
collective: a step is taken only when every rank has a batch for it (with ``agree_each_step``, a
rank whose share did not decode makes every rank skip it together). The resume point holds every
rank's generator states, so a resumed run draws what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import csv
import io
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .atomic import replacing, write_text
from .distributed import Dist
from .errors import UserError


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-video cross-entropy (N,) against the multi-hot labels normalised to a distribution
    (one-hot: plain CE)."""
    target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` crash-safe (:func:`extract.atomic.replacing`): a kill leaves the old file or the new.
    Serialised in memory first and written with plain file I/O: torch's writer reports a full disk
    as an unrelated RuntimeError ("unexpected pos"), a plain write as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def write_log(path: str, rows: list[dict]) -> None:
    """The per-epoch ``rows`` as a CSV file (columns: every key, in first-seen order), crash-safe."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


class ResumeError(UserError, ValueError):
    """A resume point written by a run of another model or data."""


class Diverged(UserError, ValueError):
    """The training loss turned NaN or infinite."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read: missing, empty, truncated, foreign or unsafe."""


def load_checkpoint(path: str, keys: tuple[str, ...] = ()) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, as a dict holding ``keys``; anything else
    (no file, zero bytes, truncated, not a torch file, a pickle that is more than tensors and
    containers) is :class:`CheckpointError` in one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted write; train again or delete it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and containers; refused "
                              "(it is loaded with weights_only=True: never unpickled)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        said = str(err).splitlines()[0][:120] if isinstance(err, (RuntimeError, OSError)) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint, truncated or foreign ({said})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    if not set(keys) <= set(state):
        lacks = ", ".join(sorted(set(keys) - set(state)))
        raise CheckpointError(f"{path} is not a checkpoint of this kind (it lacks {lacks})")
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The state of every generator training draws from: the CPU's, and the CUDA device's when
    training on one (Gumbel noise, dropout and random policies draw there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(device: torch.device, world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's :func:`rng_state`, indexed by rank (ranks draw different amounts: uneven shares)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
    return states


@dataclass
class Loop:
    """How :func:`fit` trains and where it writes. Paths: ``best`` (what ``keep`` returns, for the
    best validation mAP), ``last`` (the resume point), ``log`` (one CSV row per epoch)."""

    epochs: int
    seed: int
    best: str
    last: str
    log: str
    desc: str = "train"
    clip_grad: float = 0.0  # max gradient norm; 0: no clipping
    amp: str = "none"  # CUDA autocast: bf16 | fp16 | none (fp16 with a gradient scaler)
    accumulate: int = 1  # batches per optimizer step (gradient accumulation)
    find_unused_parameters: bool = False  # DDP: modules a step may leave unused (policies' skipped branches)
    agree_each_step: bool = False  # batches may be None on one rank alone (videos that fail to decode): ranks agree
    meta: dict[str, Any] = field(default_factory=dict)  # what a resume point must match (model, data)
    progress: bool = True


@dataclass
class Fitted:
    best_epoch: int  # -1: no epoch was kept
    best_mAP: float  # the kept epoch's validation mAP (NaN when nothing validated)
    log: list[dict]


def _rank_score(value: float) -> float:
    """A validation mAP as ranked for the kept checkpoint: NaN (nothing validated) below any real score."""
    return -0.5 if math.isnan(value) else value


def resume_point(loop: Loop) -> dict | None:
    """The resume point ``loop.last`` (``None`` if there is none), checked against ``loop.meta``:
    :class:`ResumeError` says in one line what differs. Call it before writing anything of a resumed run."""
    if not os.path.exists(loop.last):
        return None
    try:
        state = load_checkpoint(loop.last)
    except CheckpointError as err:
        raise ResumeError(f"{err}; start again without --resume, or pass another --out") from None
    saved = state.get("meta", state)  # resume points before the meta field kept some of it at the top
    differs = {k: (saved[k], v) for k, v in loop.meta.items() if k in saved and saved[k] != v}
    if differs:
        said = "; ".join(f"{k}: {old} there, {new} here" for k, (old, new) in differs.items())
        raise ResumeError(f"{loop.last} belongs to another run ({said}): pass another --out")
    missing = {"model", "optimizer", "epoch", "best", "log"} - set(state)
    if missing:
        raise ResumeError(f"{loop.last} lacks {', '.join(sorted(missing))}: it is no resume point; pass another --out")
    return state


def fit(loop: Loop, raw_model: nn.Module, optimizer: torch.optim.Optimizer, *, info: Dist, device: torch.device,
        batches: Callable[[int], Iterable[Any]], step: Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict]],
        validate: Callable[[int, dict], dict[str, float]], keep: Callable[[int, float], Any],
        on_epoch: Callable[[int], None] = lambda epoch: None, selectable: Callable[[int], bool] = lambda epoch: True,
        state: dict | None = None) -> Fitted:
    """Train ``raw_model`` for ``loop.epochs`` epochs; returns the kept epoch and the log.

    ``batches(epoch)`` yields this rank's batches (``None``: nothing this time; every rank skips the
    step, also when only one rank's share failed to decode, with ``loop.agree_each_step``);
    ``step(model, batch, epoch)`` returns the mean loss and per-batch statistics (0-d tensors,
    averaged per epoch); ``validate(epoch, row)`` (rank 0 only; ``row``: the epoch's log so far)
    returns more log columns, ``val_mAP`` among them; ``keep(epoch, val_mAP)`` is what ``loop.best``
    holds; ``state`` is the :func:`resume_point` to continue from. The caller seeds the generators
    before building the model (every rank alike); with more than one rank each then draws its own
    stream, seeded by ``(loop.seed, rank)``.
    """
    model = raw_model
    if info.world > 1:
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=loop.find_unused_parameters)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(loop.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    start, best, best_mAP, best_epoch, log = 0, -1.0, math.nan, -1, []
    if state is None and info.world > 1:
        torch.manual_seed(loop.seed * 100003 + info.rank)  # ranks draw different noise and dropout
    if state is not None:
        try:
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:
            raise ResumeError(f"{loop.last} does not fit this model ({str(err).splitlines()[0]}): "
                              "pass another --out") from None
        if state.get("scaler"):  # a run with fp16's gradient scaler resumed as such
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)], device)
        start, best, log = state["epoch"] + 1, state["best"], state["log"]
        best_mAP, best_epoch = state.get("best_mAP", best), state.get("best_epoch", -1)
    shown = loop.progress and info.main
    bar = tqdm(total=loop.epochs, initial=start, desc=loop.desc, unit="epoch", disable=not shown)
    for epoch in range(start, loop.epochs):
        on_epoch(epoch)
        model.train()
        started, wait, taken = time.monotonic(), 0.0, 0
        sums: dict[str, torch.Tensor] = {}
        optimizer.zero_grad(set_to_none=True)
        source = iter(tqdm(batches(epoch), desc=f"epoch {epoch}", unit="batch", leave=False,
                           disable=not shown))
        while True:
            tick = time.monotonic()
            batch = next(source, StopIteration)
            wait += time.monotonic() - tick
            if batch is StopIteration:
                break
            have = batch is not None
            if loop.agree_each_step:  # one collective a step: a rank with nothing makes every rank skip it
                have = distributed.smallest(int(have), device) == 1
            if not have:
                continue
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, stats = step(model, batch, epoch)
            scaler.scale(loss / loop.accumulate if loop.accumulate > 1 else loss).backward()
            taken += 1
            for k, v in {"loss": loss, **stats}.items():
                v = torch.as_tensor(v).detach().float()
                sums[k] = sums[k] + v if k in sums else v
            if taken % loop.accumulate == 0:
                _optimizer_step(loop, raw_model, optimizer, scaler, loop.accumulate)
        if taken % loop.accumulate:  # the epoch's last, shorter accumulation
            _optimizer_step(loop, raw_model, optimizer, scaler, taken % loop.accumulate)
        finite = all(bool(torch.isfinite(v)) for v in sums.values())  # one read-back per statistic per epoch
        if distributed.smallest(int(finite), device) == 0:  # every rank stops together
            kept = f"{loop.last} holds epoch {epoch - 1}" if epoch > 0 else "no epoch was saved"
            raise Diverged(f"{loop.desc}: the loss turned non-finite (NaN or inf) in epoch {epoch}; nothing of that "
                           f"epoch was saved ({kept}): lower the learning rate, or check the features and labels")
        seconds = time.monotonic() - started
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               **{k: (v / max(taken, 1)).item() for k, v in sums.items()}}
        timing = {"steps": taken, "train_seconds": seconds, "data_wait_share": wait / max(seconds, 1e-9)}
        if info.main:
            row |= validate(epoch, {**row, **timing})
            row |= timing | {"seconds": time.monotonic() - started}
            log.append(row)
        rng = all_rng_states(device, info.world)  # after validation: it may draw (stochastic evaluation)
        if info.main:
            score = _rank_score(row["val_mAP"])
            if score >= best and selectable(epoch):  # a tie goes to the later, longer-trained epoch
                best, best_mAP, best_epoch = score, row["val_mAP"], epoch
                save_atomic(keep(epoch, row["val_mAP"]), loop.best)
            save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng, "epoch": epoch, "best": best,
                         "best_mAP": best_mAP, "best_epoch": best_epoch, "log": log, "meta": loop.meta}, loop.last)
            write_log(loop.log, log)
            bar.set_postfix(loss=f"{row.get('loss', math.nan):.3f}", val_mAP=f"{row['val_mAP']:.3f}")
        bar.update(1)
    bar.close()
    distributed.barrier()
    return Fitted(best_epoch, best_mAP, log)


def _optimizer_step(loop: Loop, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, passes: int) -> None:
    """One step on the gradients of ``passes`` accumulated passes (each loss divided by
    ``loop.accumulate``: a shorter last group is scaled up to the mean of its passes)."""
    if loop.clip_grad or passes < loop.accumulate:
        scaler.unscale_(optimizer)
    if passes < loop.accumulate:
        for p in raw_model.parameters():
            if p.grad is not None:
                p.grad.mul_(loop.accumulate / passes)
    if loop.clip_grad:
        nn.utils.clip_grad_norm_(raw_model.parameters(), loop.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
