"""The training loop: cached features in, a run folder out.

Run folder (:mod:`policy.run_folder` owns its layout): ``config.json`` (resolved), ``model.pt``
(best by validation mAP), ``last.pt`` (resume point), ``train_log.csv``, ``metrics.json`` and
``predictions.h5`` on the evaluation split. Checkpoints are written atomically and loaded with
``weights_only=True``. Under ``torchrun`` each rank trains on its share of every batch order and
gradients are averaged (DDP); rank 0 saves.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from extract import distributed
from extract.training import save_atomic, write_log

from .data import CachedFeatures, CacheError
from .methods import METHODS, Inference, Method, check_config
from .run_folder import CONFIG, Predictions, RunFolder, summarise

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def return_freed_memory() -> None:
    """Make glibc hand freed blocks of 256 KiB and more back to the system at once. By default its
    threshold rises with each large block freed, and the activations freed after every step then
    stay resident: at FCVID's shape the peak fell from 4.6 to 3.3 GiB with it (bench/train.py). A no-op
    where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 10)


def run_inference(method: Method, model: torch.nn.Module, store: CachedFeatures, rows: np.ndarray,
                  batch_size: int) -> Inference:
    """``method.infer`` over ``rows`` with ``model`` (the raw module: no gradients, nothing to synchronise).
    Per-step arrays are kept as float16, the precision ``predictions.h5`` stores them in."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for batch in store.batches(rows, batch_size):
            inf = method.infer(model, batch.part(slice(None), device))
            inf.step_scores = inf.step_scores.astype(np.float16)
            inf.extra = {k: v.astype(np.float16) for k, v in inf.extra.items()}
            parts.append(inf)
    extra_keys = parts[0].extra.keys() if parts else []
    ordered = bool(parts) and parts[0].step_frame is not None
    return Inference(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("scores", "step_scores", "actions",
                                                                                 "step_gflops")),
                     extra={k: np.concatenate([p.extra[k] for p in parts]) for k in extra_keys},
                     step_frame=np.concatenate([p.step_frame for p in parts]) if ordered else None)


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


def evaluate_split(method: Method, inf: Inference, labels: np.ndarray) -> dict:
    """:func:`~policy.run_folder.summarise` of one split's inference."""
    return summarise(inf.scores, labels, inf.actions, inf.gflops, method.codes)


def predictions(method: Method, store: CachedFeatures, rows: np.ndarray, inf: Inference) -> Predictions:
    return Predictions(video_id=[store.ids[i] for i in rows], labels=store.labels[rows], scores=inf.scores,
                       actions=inf.actions, gflops=inf.gflops, codes=method.codes,
                       per_step={"step_scores": inf.step_scores, "step_gflops": inf.step_gflops, **inf.extra,
                                 **({"step_frame": inf.step_frame} if inf.step_frame is not None else {})})


def train(cfg, *, resume: bool = False, progress: bool = True) -> dict[str, float]:
    """Train ``cfg.method`` on ``cfg.features``, write the run folder ``cfg.out``, return its metrics."""
    return_freed_memory()
    info = distributed.setup()
    torch.manual_seed(cfg.seed)
    device = distributed.device_for(cfg.device, info)
    method_cls = METHODS[cfg.method]
    probe = CachedFeatures(cfg.features, [], memory_budget=0)
    cfg = method_cls.resolve(cfg, probe.flops, probe.sampling)
    probe.cache.close()
    check_config(cfg)
    budget = int(cfg.memory_budget_gb * (1 << 30)) if cfg.memory_budget_gb else None
    store = CachedFeatures(cfg.features, method_cls.needs(cfg), memory_budget=budget,
                           l2_normalise=cfg.normalise == "l2")
    train_rows, val_rows, eval_rows, val_note = store.splits(cfg.seed, cfg.val_fraction)
    if cfg.select_on == "eval":  # both official codes' protocol: the kept epoch is the best on the evaluation split
        train_rows = np.sort(np.concatenate([train_rows, val_rows[store.split[val_rows] == "train"]]))
        val_rows, val_note = eval_rows, "the evaluation split itself (select_on=eval, as the official codes)"
    method = method_cls(cfg, store.dims, len(store.classes), store.flops)
    raw_model = method.model.to(device)  # saved and used for inference; hooks that train get `model`
    optimizer = method.optimizer()
    model = DistributedDataParallel(raw_model, find_unused_parameters=True) if info.world > 1 else raw_model
    os.makedirs(cfg.out, exist_ok=True)
    resolved = {**dataclasses.asdict(cfg), "validation": val_note, "cache_dataset": store.dataset,
                "cache_sampling": store.sampling, "features_in_memory": store.in_memory,
                "train_videos": len(train_rows), "val_videos": len(val_rows), "eval_videos": len(eval_rows)}
    start_epoch, best, log_rows = 0, -1.0, []
    last_path, best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "model.pt")
    if resume and os.path.exists(os.path.join(cfg.out, CONFIG)):
        with open(os.path.join(cfg.out, CONFIG)) as f:
            before = json.load(f)
        if (before["cache_dataset"], before["cache_sampling"]) != (store.dataset, store.sampling):
            raise CacheError(f"{cfg.out} was trained on a {before['cache_dataset']} cache ({before['features']}); "
                             f"{cfg.features} is {store.dataset}: resume with that cache or start another --out")
    if resume and os.path.exists(last_path):
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        try:
            raw_model.load_state_dict(state["model"])
        except RuntimeError:
            raise CacheError(f"{cfg.out} was trained on features of other dimensions than {cfg.features} holds "
                             f"({', '.join(f'{n}: {d}-d' for n, d in store.dims.items())}): "
                             "start another --out") from None
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)], device)
        start_epoch, best, log_rows = state["epoch"] + 1, state["best"], state["log"]
    if info.main:
        RunFolder.save_config(cfg.out, resolved)
    bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=f"train {cfg.method}", unit="epoch",
               disable=not (progress and info.main))
    for epoch in range(start_epoch, cfg.epochs):
        method.on_epoch(epoch, optimizer)
        model.train()
        order = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        started, losses = time.monotonic(), []
        stats: dict[str, list[float]] = {}
        for batch in store.batches(train_rows, cfg.batch_size, generator=order):
            if len(batch.index) < info.world:  # a last batch too small to give every rank a video
                continue
            batch = batch.part(slice(info.rank, None, info.world), device)
            loss, extra = method.loss(model, batch, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            for k, v in extra.items():
                stats.setdefault(k, []).append(v)
        val = evaluate_split(method, run_inference(method, raw_model, store, val_rows, cfg.batch_size),
                             store.labels[val_rows])
        row = {"epoch": epoch, "loss": float(np.mean(losses)), **{k: float(np.mean(v)) for k, v in stats.items()},
               "val_mAP": val["mAP"], "val_top1": val["top1"], "val_gflops_per_video": val["gflops_per_video"],
               "seconds": time.monotonic() - started}
        log_rows.append(row)
        rng = all_rng_states(device, info.world)
        if info.main:
            if val["mAP"] >= best and method.selectable(epoch):  # a tie goes to the later, longer-trained epoch
                best = val["mAP"]
                save_atomic({"model": raw_model.state_dict(), "epoch": epoch, "val_mAP": best}, best_path)
            save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "rng": rng, "epoch": epoch, "best": best, "log": log_rows}, last_path)
            write_log(os.path.join(cfg.out, "train_log.csv"), log_rows)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_mAP=f"{val['mAP']:.3f}")
    bar.close()
    distributed.barrier()
    kept = torch.load(best_path, map_location="cpu", weights_only=True)
    raw_model.load_state_dict(kept["model"])
    inf = run_inference(method, raw_model, store, eval_rows, cfg.batch_size)
    metrics = {**evaluate_split(method, inf, store.labels[eval_rows]), "best_epoch": int(kept["epoch"])}
    if info.main:
        RunFolder.save_results(cfg.out, metrics, predictions(method, store, eval_rows, inf), cache=store.path,
                               dataset=store.dataset)
    distributed.teardown()
    return metrics
