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

import numpy as np
import torch

from extract import distributed
from extract.atomic import sweep
from extract.distributed import Dist
from extract.locks import exclusive_job
from extract.training import Loop, ResumeError, fit, load_checkpoint, resume_point

from .data import CachedFeatures, CacheError, default_memory_budget
from .methods import METHODS, Inference, Method, check_config
from .run_folder import (
    CONFIG,
    LAST,
    LOCK,
    LOG,
    MODEL,
    PREDICTIONS,
    Predictions,
    RunError,
    RunFolder,
    read_config,
    summarise,
)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
RESUMABLE = ("epochs", "device", "features", "out", "memory_budget_gb")  # may change on --resume


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
        for batch in store.loader(rows, batch_size, device):
            inf = method.infer(model, batch)
            inf.step_scores = inf.step_scores.astype(np.float16)
            inf.extra = {k: v.astype(np.float16) for k, v in inf.extra.items()}
            parts.append(inf)
    extra_keys = parts[0].extra.keys() if parts else []
    ordered = bool(parts) and parts[0].step_frame is not None
    return Inference(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("scores", "step_scores", "actions",
                                                                                 "step_gflops")),
                     extra={k: np.concatenate([p.extra[k] for p in parts]) for k in extra_keys},
                     step_frame=np.concatenate([p.step_frame for p in parts]) if ordered else None)


def memory_budget(gb: float, info: Dist, device: torch.device) -> int:
    """This rank's share of the node's feature budget, in bytes: ``gb`` GiB per node, or half the
    memory available, divided among the node's ranks (each holds its own copy when the features fit
    its share). Every rank gets the job's smallest share, measured before any rank loads: ranks that
    held the features differently would draw different batch orders."""
    node = int(gb * (1 << 30)) if gb else default_memory_budget()
    return distributed.smallest(node // info.local_world, device)


def evaluate_split(method: Method, inf: Inference, labels: np.ndarray) -> dict:
    """:func:`~policy.run_folder.summarise` of one split's inference."""
    return summarise(inf.scores, labels, inf.actions, inf.gflops, method.codes)


def predictions(method: Method, store: CachedFeatures, rows: np.ndarray, inf: Inference) -> Predictions:
    return Predictions.of([store.ids[i] for i in rows], store.labels[rows], inf, method.codes)


def train(cfg, *, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, float]:
    """Train ``cfg.method`` on ``cfg.features``, write the run folder ``cfg.out``, return its metrics.
    One run writes a folder at a time (rank 0 holds ``<out>/.lock``); see :func:`check_start` for
    what ``resume`` and ``force`` allow."""
    return_freed_memory()
    distributed.deterministic(cfg.deterministic)
    distributed.allow_tf32(cfg.tf32)
    info, device = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    method_cls = METHODS[cfg.method]
    probe = CachedFeatures(cfg.features, [], memory_budget=0)
    cfg = method_cls.resolve(cfg, probe.flops, probe.sampling)
    probe.cache.close()
    check_config(cfg)
    store = CachedFeatures(cfg.features, method_cls.needs(cfg), memory_budget(cfg.memory_budget_gb, info, device),
                           l2_normalise=cfg.normalise == "l2")
    train_rows, val_rows, eval_rows, val_note = store.splits(cfg.seed, cfg.val_fraction)
    if cfg.select_on == "eval":  # both official codes' protocol: the kept epoch is the best on the evaluation split
        train_rows = np.sort(np.concatenate([train_rows, val_rows[store.split[val_rows] == "train"]]))
        val_rows, val_note = eval_rows, "the evaluation split itself (select_on=eval, as the official codes)"
    method = method_cls(cfg, store.dims, len(store.classes), store.flops)
    raw_model = method.model.to(device)  # saved and used for inference; hooks that train get the DDP-wrapped model
    optimizer = method.optimizer()
    os.makedirs(cfg.out, exist_ok=True)
    resolved = {**dataclasses.asdict(cfg), "validation": val_note, "cache_dataset": store.dataset,
                "cache_sampling": store.sampling, "features_in_memory": store.in_memory,
                "train_videos": len(train_rows), "val_videos": len(val_rows), "eval_videos": len(eval_rows)}
    best_path = os.path.join(cfg.out, MODEL)
    loop = Loop(epochs=cfg.epochs, seed=cfg.seed, best=best_path, last=os.path.join(cfg.out, LAST),
                log=os.path.join(cfg.out, LOG), desc=f"train {cfg.method}", find_unused_parameters=True,
                meta={"features": {n: int(d) for n, d in store.dims.items()}, "classes": len(store.classes)},
                progress=progress)
    with exclusive_job(os.path.join(cfg.out, LOCK), cfg.out, main=info.main, device=device,
                       advice="wait for it to finish, or pass another --out", then=lambda: sweep(cfg.out)):
        check_start(cfg, resolved, resume=resume, force=force)  # before anything of the run is written
        try:
            state = resume_point(loop) if resume else None
        except ResumeError as err:
            raise CacheError(f"{err} (or resume with the cache it was trained on)") from None
        distributed.barrier()  # every rank has read the folder before rank 0 starts rewriting it
        if info.main:
            RunFolder.start(cfg.out, resolved, fresh=state is None)
        metrics = _fit_and_evaluate(cfg, method, raw_model, optimizer, store, loop, state, info, device,
                                    (train_rows, val_rows, eval_rows))
    distributed.teardown(info)
    return metrics


def check_start(cfg, resolved: dict, *, resume: bool, force: bool) -> None:
    """Refuse, in one line, to start the run ``resolved`` in ``cfg.out`` when that would lose or mix
    work: replacing a finished run or its checkpoints without ``force``; resuming a run trained with
    other settings (listed) or on a cache of another dataset or sampling."""
    if not resume:
        held = [name for name in (PREDICTIONS, MODEL, LAST) if os.path.exists(os.path.join(cfg.out, name))]
        if held and not force:
            what = "a finished run" if PREDICTIONS in held else f"an unfinished run's {' and '.join(held)}"
            raise RunError(f"{cfg.out} holds {what}: --force replaces it, --out writes another folder"
                           + ("" if PREDICTIONS in held else ", --resume continues it"))
        return
    if not os.path.isfile(os.path.join(cfg.out, CONFIG)):
        return
    saved = read_config(cfg.out)
    if (saved.get("cache_dataset"), saved.get("cache_sampling")) != (resolved["cache_dataset"],
                                                                    resolved["cache_sampling"]):
        raise CacheError(f"{cfg.out} was trained on a {saved.get('cache_dataset')} cache ({saved.get('features')}); "
                         f"{cfg.features} is {resolved['cache_dataset']}: resume with that cache or start another "
                         "--out")
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as the lists config.json holds
    differs = [f"{k}={saved[k]} there, {v} here" for k, v in now.items()
               if k in saved and k not in RESUMABLE and saved[k] != v]
    if differs:
        raise RunError(f"{cfg.out} was trained with other settings ({'; '.join(differs)}): resume with the same "
                       "settings (only --epochs, --device, --features and memory_budget_gb may change), or pass "
                       "another --out")


def _fit_and_evaluate(cfg, method: Method, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      store: CachedFeatures, loop: Loop, state: dict | None, info: Dist, device: torch.device,
                      rows: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float]:
    """Train (resuming from ``state``), then evaluate the kept checkpoint on rank 0 and write the
    run's results; every rank returns its metrics."""
    train_rows, val_rows, eval_rows = rows

    def batches(epoch: int):
        order = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        return store.loader(train_rows, cfg.batch_size, device, order, share=(info.rank, info.world))

    def validate(epoch: int, row: dict) -> dict[str, float]:
        val = evaluate_split(method, run_inference(method, raw_model, store, val_rows, cfg.batch_size),
                             store.labels[val_rows])
        return {"val_mAP": val["mAP"], "val_top1": val["top1"], "val_gflops_per_video": val["gflops_per_video"]}

    fit(loop, raw_model, optimizer, info=info, device=device, batches=batches, step=method.loss, validate=validate,
        keep=lambda epoch, score: {"model": raw_model.state_dict(), "epoch": epoch, "val_mAP": score},
        on_epoch=lambda epoch: method.on_epoch(epoch, optimizer), selectable=method.selectable, state=state)
    if info.main:
        kept = load_checkpoint(loop.best, ("model", "epoch"))
        raw_model.load_state_dict(kept["model"])
        inf = run_inference(method, raw_model, store, eval_rows, cfg.batch_size)
        metrics = {**evaluate_split(method, inf, store.labels[eval_rows]), "best_epoch": int(kept["epoch"])}
        RunFolder.save_results(cfg.out, metrics, predictions(method, store, eval_rows, inf), cache=store.path,
                               dataset=store.dataset)
    distributed.barrier()
    return metrics if info.main else RunFolder.load(cfg.out).metrics
