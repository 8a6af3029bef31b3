"""``recognize``: a trained policy applied to raw videos, computing only what its decisions use.

It loads a run folder (its config, ``model.pt`` and action codes) and the backbones its cache was
extracted with, checked against the weights identity (and sha256) the cache records. Worker
processes decode each video ahead of the model (:func:`decode_videos`: phase 1's decoding,
preprocessing and sampling, every sampled frame, each distinct one once, under the decoding time
limit of :mod:`extract.workers`), so that decoding overlaps the computing. The method's ``lazy``
path then asks for features frame by frame (:class:`FrameSource`): frames no decision reaches are
never run through a CNN, and each backbone runs once per request on the frames of every video in
flight. The policy runs on the backbones' device; features reach it there. GFLOPs are counted
exactly as ``train-policy`` counts them, from the cache's FLOPs table. Under ``torchrun`` rank r
takes every world-th video; ``--out FILE.jsonl`` is shared by the ranks and resumable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import sys
import time
from typing import Iterator

import click
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from extract import distributed
from extract.backbones import Backbone, WeightsUnavailable, create_backbone
from extract.cache import Cache
from extract.decode import (
    DECODERS,
    DOWNSAMPLE,
    VideoError,
    decoder_problem,
    default_workers,
    read_distinct,
    resolve_decoder,
)
from extract.distributed import synchronize
from extract.errors import ConfigError, UserError
from extract.locks import exclusive_job
from extract.pipeline import compute_features, place_backbone
from extract.sampling import Sampling
from extract.training import CheckpointError, load_checkpoint
from extract.workers import guarded, prefetch

from .methods import METHODS, Method, check_config
from .run_folder import CONFIG, MODEL, RUN_ID, RunError, RunFolder

LIST_EXTENSIONS = (".txt", ".csv", ".lst", ".list")


@dataclasses.dataclass
class Decoded:
    """One video's sampled frames, decoded and preprocessed as phase 1 does: ``crops`` the distinct
    frames ``(U, 3, 224, 224)`` uint8, ``rows`` ``(T,)`` the crop of each sampled step, ``seconds``
    the decoding took (in its worker); or ``error``, the reason it cannot be read."""

    path: str
    crops: torch.Tensor | None = None
    rows: np.ndarray | None = None
    seconds: float = 0.0
    error: str | None = None


class SampledFrames(Dataset):
    """Item ``k`` -> :class:`Decoded` of ``paths[k]``: every sampled frame, each distinct one decoded
    once (``read_distinct``: one pass or exact seeks, whichever decodes less)."""

    def __init__(self, paths: list[str], sampling: Sampling, decoder: str):
        self.paths, self.sampling, self.decoder = paths, sampling, decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> Decoded:
        start = time.perf_counter()
        try:
            crops, _, rows, _ = read_distinct(self.paths[k], self.sampling, "auto", self.decoder)
        except VideoError as err:
            return Decoded(self.paths[k], error=str(err))
        return Decoded(self.paths[k], crops, rows, time.perf_counter() - start)


def decode_videos(paths: list[str], sampling: Sampling, decoder: str, workers: int) -> Iterator[Decoded]:
    """:class:`Decoded` of each of ``paths`` in order, decoded ahead by ``workers`` processes under
    :func:`~extract.workers.guarded`'s time limit while the caller computes (0: by a thread of this
    process, with no time limit)."""
    def failure(k: int, reason: str) -> Decoded:
        return Decoded(paths[k], error=reason)

    return prefetch(guarded(SampledFrames(paths, sampling, decoder), paths, workers, failure), depth=2)


class FrameSource:
    """The sampled frames of a batch of decoded videos, run through a backbone only when a method asks
    (see :class:`~policy.methods.base.Frames`); ``length`` and the features served are on
    ``device``, the features kept on the host. Seconds computing are kept per video (a batched
    forward's time shared by the frames in it)."""

    def __init__(self, videos: list[Decoded], backbones: dict[str, Backbone], device: torch.device,
                 downsample: str, l2: bool, steps: int | None, frames_per_pass: dict[str, int]):
        self.videos = videos
        self.compute_seconds = np.zeros(len(videos))
        length = torch.tensor([len(v.rows) for v in videos])
        self.steps = max(int(steps or 0), int(length.max()))  # the cache's T, as training saw it
        self.length = length.to(device)
        self.backbones, self.device, self.downsample, self.l2 = backbones, device, downsample, l2
        self.frames_per_pass = frames_per_pass
        self.known: dict[tuple[str, int, int], torch.Tensor] = {}  # (name, video, step) -> features

    def compute(self, name: str, wanted: list[tuple[int, int]]) -> None:
        """Run backbone ``name`` once on the frames ``(video, step)`` of ``wanted`` it has not seen
        (at most ``frames_per_pass[name]`` per forward)."""
        missing = list(dict.fromkeys(p for p in wanted if (name, *p) not in self.known))
        per_pass = self.frames_per_pass[name]
        for lo in range(0, len(missing), per_pass):
            part = missing[lo:lo + per_pass]
            start = time.perf_counter()
            crops = torch.stack([self.videos[v].crops[self.videos[v].rows[s]] for v, s in part])
            out = compute_features([self.backbones[name]], crops, self.device, self.downsample)[name]  # float16
            synchronize(self.device)
            share = (time.perf_counter() - start) / len(part)
            for (v, s), feats in zip(part, torch.from_numpy(out).float(), strict=True):
                self.known[(name, v, s)] = torch.nn.functional.normalize(feats, dim=0) if self.l2 else feats
                self.compute_seconds[v] += share

    def features(self, name: str, rows: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        steps = step if isinstance(step, torch.Tensor) else torch.full_like(self.length, step)
        videos = rows.nonzero().flatten()
        wanted = list(zip(videos.tolist(), steps[videos].tolist(), strict=True))
        self.compute(name, wanted)
        result = torch.zeros(len(self.length), self.backbones[name].dim)
        for v, s in wanted:
            result[v] = self.known[(name, v, s)]
        return result.to(self.device)

    def all_features(self, name: str, steps: torch.Tensor | None = None) -> torch.Tensor:
        real = torch.arange(self.steps, device=self.device).unsqueeze(0) < self.length.unsqueeze(1)
        steps = real if steps is None else steps & real
        wanted = [(v, s) for v, s in steps.nonzero().tolist()]
        self.compute(name, wanted)  # one batched pass over every frame asked for
        out = torch.zeros(len(self.length), self.steps, self.backbones[name].dim)
        for v, s in wanted:
            out[v, s] = self.known[(name, v, s)]
        return out.to(self.device)


@dataclasses.dataclass
class Loaded:
    """A run ready to recognise: its method and model, the cache's facts, the backbones."""

    run: RunFolder
    method: Method
    classes: list[str]
    sampling: Sampling
    steps: int  # the cache's T: what training padded every video to
    downsample: str
    backbones: dict[str, Backbone]
    device: torch.device
    frames_per_pass: dict[str, int]  # backbone -> most frames per forward pass
    frame_seconds: dict[str, float]  # backbone -> seconds per frame at that batch size, as calibrated
    decoder: str  # the cache's decoder (a key of extract.decode.DECODERS), or the one --decoder names


def weights_argument(identity: str) -> str:
    """``create_backbone``'s ``weights`` for a weights identity the cache records."""
    if identity.startswith("none"):
        return "none"
    if identity.startswith("file:"):
        return identity[len("file:"):].rsplit(":sha256=", 1)[0]
    return "imagenet"


CALIBRATION = {"cpu": (1, 2, 4, 8, 16, 32), "cuda": (16, 32, 64, 128, 256)}  # batch sizes timed per backbone
CALIBRATION_SECONDS = 0.05  # the least time of one timing
BATCH_VIDEOS = {"cpu": 8, "cuda": 64}  # videos in flight by default: the most frames of one step's forward pass


def calibrate(backbones: dict[str, Backbone], device: torch.device, downsample: str) -> dict[str, tuple[int, float]]:
    """Per backbone, ``(batch size, seconds per frame)`` of the size in ``CALIBRATION[device.type]``
    with the least time per frame, timed here (a few seconds per backbone). On a CPU small batches
    can be several times faster per frame (EfficientNet-Lite0@224 on 2 cores: 7.8 ms per frame in
    batches of 2, 25 ms in batches of 64). On a GPU the time per frame falls as the batch grows
    until the GPU is full, at a size that depends on the GPU and the backbone: sizes up to 256 are
    timed rather than one fixed, and the timing gives the seconds per frame that compute time is
    predicted from. Each size's time is the best of three timings of at least
    ``CALIBRATION_SECONDS`` each: a busy machine only ever adds time."""
    chosen = {}
    for name, backbone in backbones.items():
        best = (float("inf"), 1)
        for size in CALIBRATION[device.type]:
            crops = torch.zeros(size, 3, 224, 224, dtype=torch.uint8)
            compute_features([backbone], crops, device, downsample)  # warm-up at this shape
            for _ in range(3):
                calls, start = 0, time.perf_counter()
                while calls == 0 or time.perf_counter() - start < CALIBRATION_SECONDS:
                    compute_features([backbone], crops, device, downsample)
                    synchronize(device)
                    calls += 1
                best = min(best, ((time.perf_counter() - start) / (calls * size), size))
        chosen[name] = (best[1], best[0])
    return chosen


def load(run_dir: str, device: torch.device, frames_per_pass: int = 0, cache: str = "") -> Loaded:
    """The run in ``run_dir`` and the backbones of its cache, the policy and the backbones on ``device``;
    :class:`RunError` says in one line what is missing or damaged. ``frames_per_pass`` 0: each
    backbone's batch size as :func:`calibrate` times it on ``device``. ``cache``: the run's cache
    where it moved ("": the one the run folder records); its dataset and sampling must be the run's."""
    run = RunFolder.load(run_dir)
    cls = METHODS.get(run.method)
    if cls is None:
        raise RunError(f"{run_dir} is a {run.method} run, a method this version does not have")
    model_path = os.path.join(run_dir, MODEL)
    if not os.path.isfile(model_path):
        raise RunError(f"{run_dir} has no model.pt (a run folder of train-policy is needed)")
    try:  # before anything is built from it
        cfg = run.typed_config(cls.Config)
        check_config(cfg)
    except ConfigError as err:
        raise RunError(f"{os.path.join(run_dir, CONFIG)}: {err}") from None
    if cache and not os.path.isfile(cache):
        raise RunError(f"--cache {cache}: no such file")
    if not cache and not os.path.isfile(run.cache):
        raise RunError(f"{run_dir}: its cache {run.cache} is gone; recognize reads the class names, sampling, "
                       "FLOPs table and backbone weights from it: pass --cache PATH if it moved")
    cache = cache or run.cache
    try:
        with Cache(cache) as held:
            classes, flops, weights, saved = held.classes, held.flops, held.weights, held.sampling
            preprocessing, facts = held.preprocessing, {"dataset": held.dataset, "sampling": saved}
            decoder = held.decoder
            steps = held.features(held.backbones[0]).shape[1] if held.backbones else 0
    except (OSError, KeyError) as err:
        raise RunError(f"{cache} is not a readable cache ({str(err).splitlines()[0][:120]})") from None
    for key, have in facts.items():  # as train-policy saved them (older runs: not saved)
        if run.config.get(f"cache_{key}", have) != have:
            raise RunError(f"{cache} holds {key} {have}, the run was trained on {run.config[f'cache_{key}']}: "
                           "recognize needs the cache the run was trained on")
    missing = sorted(set(cls.needs(cfg) + cls.lazy_needs(cfg)) - set(flops))
    if missing:
        raise RunError(f"{cache} lacks the features {', '.join(missing)} the run was trained on")
    sampling = Sampling(num_frames=saved.get("num_frames"), fps=saved.get("fps"), max_frames=saved.get("max_frames"))
    if saved.get("seek") == "keyframe":
        raise RunError(f"{cache} was sampled at keyframes; recognize decodes the exact sampled frames only")
    if cls.lazy is Method.lazy:
        lazy = ", ".join(name for name, c in METHODS.items() if c.lazy is not Method.lazy)
        raise RunError(f"{run_dir}: recognize has no lazy path for {run.method} yet (it has for {lazy})")
    if getattr(cfg, "stochastic_eval", False):
        raise RunError(f"{run_dir} evaluates with sampled decisions (--stochastic-eval); recognize replays argmax ones")
    try:
        state = load_checkpoint(model_path, ("model",))
    except CheckpointError as err:
        raise RunError(str(err)) from None
    try:
        with torch.device("meta"):  # shapes only: the weights are model.pt's (assigned below), nothing is allocated
            method = cls(cfg, {n: e.dim for n, e in flops.items()}, len(classes),
                         {n: e.gflops for n, e in flops.items()})
    except ConfigError as err:  # settings that do not go together (AR-Net's policy_head and policy)
        raise RunError(f"{os.path.join(run_dir, CONFIG)}: {err}") from None
    try:
        method.model.load_state_dict(state["model"], assign=True)
    except (RuntimeError, TypeError) as err:  # other keys or shapes; not a state dict
        said = " ".join(line.strip() for line in str(err).splitlines()[1:3]) or str(err)
        raise RunError(f"{model_path} does not fit the {run.method} model its {CONFIG} describes "
                       f"({said[:200]})") from None
    method.model.to(device).eval()
    backbones = {}
    for name in cls.lazy_needs(cfg):
        recorded = weights.get(name, "")
        try:
            backbone = create_backbone(name, weights=weights_argument(recorded))
        except WeightsUnavailable as err:
            raise RunError(f"{name}: {err}; recognize needs the weights the cache was extracted with ({recorded})") \
                from None
        if backbone.weights != recorded:
            raise RunError(f"{name}: the weights found ({backbone.weights}) differ from those the cache was "
                           f"extracted with ({recorded}): the policy would read other features")
        place_backbone(backbone, device)
        backbones[name] = backbone
    downsample = next((k for k, v in DOWNSAMPLE.items() if v == preprocessing.get("lower_resolutions")), "antialias")
    timed = calibrate(backbones, device, downsample) if frames_per_pass == 0 else {}
    per_pass = {name: timed[name][0] if timed else frames_per_pass for name in backbones}
    frame_seconds = {name: timed[name][1] for name in timed}
    return Loaded(run, method, classes, sampling, steps, downsample, backbones, device, per_pass, frame_seconds,
                  decoder)


def recognise(loaded: Loaded, videos: list[Decoded], budget: int = 0) -> list[dict]:
    """One result per decoded video of ``videos`` (all readable): top-5, actions, GFLOPs, seconds
    decoding (in the workers) and computing (backbones and the policy's steps), frames computed."""
    l2 = loaded.run.config.get("normalise") == "l2"
    frames = FrameSource(videos, loaded.backbones, loaded.device, loaded.downsample, l2, loaded.steps,
                         loaded.frames_per_pass)
    start = time.perf_counter()
    with torch.no_grad():
        inf = loaded.method.lazy(loaded.method.model, frames, budget)
    rest = time.perf_counter() - start - frames.compute_seconds.sum()
    frames.compute_seconds += max(rest, 0.0) / len(videos)  # the policy's own steps, shared by the videos
    codes, lengths = loaded.method.codes, frames.length.tolist()
    results = []
    for v, video in enumerate(videos):
        n = lengths[v]
        top = np.argsort(-inf.scores[v])[:5]
        actions = inf.actions[v, :n]
        results.append({"video": video.path, "top5": [[loaded.classes[c], float(inf.scores[v, c])] for c in top],
                        "actions": [int(a) for a in actions], "gflops": float(inf.gflops[v]),
                        "seconds": {"decode": video.seconds, "compute": float(frames.compute_seconds[v])},
                        "visited": int(codes.is_visited(actions).sum()),
                        "expensive": int(codes.is_expensive(actions).sum()), "frames": n,
                        "decoded": len(video.crops),
                        "computed": {name: sum(1 for n, u, _ in frames.known if n == name and u == v)
                                     for name in loaded.backbones}})
    return results


def dense_gflops(loaded: Loaded, frames: int) -> float:
    """GFLOPs of running every backbone the method reads on all ``frames`` sampled frames: what a
    method without decisions would spend, the reference of "saved" on the progress bar."""
    return frames * sum(loaded.method.flops[name] for name in loaded.backbones)


def video_list(inputs: tuple[str, ...]) -> list[str]:
    """Video files from ``inputs``: list files (``.txt``, ``.csv``, ``.lst``, ``.list``: one video
    per line, the whole line its path, spaces included, surrounding whitespace not; blank lines and
    lines starting with ``#`` skipped; relative paths from the list's folder), and every other input
    as a video."""
    videos = []
    for item in inputs:
        if not item.lower().endswith(LIST_EXTENSIONS) or not os.path.isfile(item):
            videos.append(item)
            continue
        folder = os.path.dirname(os.path.abspath(item))
        with open(item) as f:
            for line in f:
                path = line.strip()
                if path and not path.startswith("#"):
                    videos.append(path if os.path.isabs(path) else os.path.join(folder, path))
    return videos


class ResultsFile:
    """``--out FILE.jsonl``: one JSON line appended per finished video, each written whole in one
    ``write`` under an ``flock`` of the file (the ranks of ``torchrun`` share it), each naming the
    run, its ``run_id``, the budget and the decoder. A re-run skips the videos already there; a line a
    kill cut short is dropped; lines of another run (``run_id``) or other settings (``budget``,
    ``decoder``) are refused, never mixed."""

    def __init__(self, path: str, stamp: dict):
        self.path, self.stamp = path, stamp

    def repair_and_check(self) -> None:
        """Drop a torn last line; refuse, in one line, a file holding another run's or setting's results
        (rank 0, under the job's lock, before any rank reads or appends)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                f.truncate(keep)
        for number, line in enumerate(data[:keep].splitlines(), 1):
            try:
                record = json.loads(line)
                differs = {k: record.get(k) for k in CHECKED if record.get(k) != self.stamp[k]}
            except (ValueError, AttributeError):
                raise UserError(f"{self.path}: line {number} is not a JSON object of recognize: pass another --out "
                                "or move the file away") from None
            if differs:
                said = ", ".join(f"{k}={v!r} there, {self.stamp[k]!r} here" for k, v in differs.items())
                raise UserError(f"{self.path} holds results of another run or setting ({said}): pass another --out, "
                                "or delete the file to start over")

    def done(self) -> set[str]:
        """The videos the file has a result for."""
        if not os.path.exists(self.path):
            return set()
        with open(self.path) as f:
            return {json.loads(line)["video"] for line in f if line.strip()}

    def append(self, records: list[dict]) -> None:
        data = "".join(json.dumps({**r, **self.stamp}) + "\n" for r in records).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "No space left on device")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, end)  # never a torn line in the middle of the file
                raise
        finally:
            os.close(fd)


JSON_KEYS = ("video", "top5", "actions", "gflops", "seconds")
CHECKED = ("run_id", "budget", "decoder")  # what a resumed --out file must agree on (the run may have moved)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog="""\b
Examples:
  recognize data/demo/videos/red_disc_000.mp4 --run data/runs/demo_t16/liteeval-gamma0.1
  recognize test_list.txt --run data/runs/demo_t16/arnet --json > predictions.jsonl
  recognize clip.mp4 --run data/runs/demo_t16/liteeval-gamma0.1 --budget 2
  recognize all.txt --run RUN --out labels.jsonl      (killed? run it again: it goes on)
  torchrun --standalone --nproc_per_node 8 -m policy.recognize all.txt --run-dir RUN --out labels.jsonl
""")
@click.argument("inputs", nargs=-1, required=True, metavar="VIDEO_OR_LIST...")
@click.option("--run", "--run-dir", "run_dir", required=True, metavar="RUN_DIR",
              help="A run folder of train-policy (under torchrun: --run-dir, which torchrun's parser leaves alone).")
@click.option("--cache", default="", metavar="CACHE.h5",
              help="The run's feature cache, where it moved (default: the cache its run folder records).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per video and line.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--budget", type=click.IntRange(0), default=0,
              help="Stop after the K-th expensive read and answer with the prediction there (0: no budget).")
@click.option("--batch-videos", type=click.IntRange(0), default=0, show_default=True,
              help="Videos in flight: each backbone runs once per step on their frames; 0: 8 on the CPU, 64 on CUDA.")
@click.option("--decoder", type=click.Choice(["", "auto", *sorted(DECODERS)]), default="",
              help="Decode with this decoder instead of the cache's (frames may then differ in the last bits).")
@click.option("--frames-per-pass", type=click.IntRange(0), default=0, show_default=True,
              help="Most frames per backbone forward pass; 0: each backbone's fastest per frame, timed at start.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch's CPU threads for the backbones; 0: torch's default (one per core). On a small CPU, "
                   "fewer threads leave the decoding processes cores (see the README).")
@click.option("--out", default="", metavar="FILE.jsonl",
              help="Append one JSON line per finished video to FILE; a re-run skips the videos already there.")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Decoding processes, working ahead of the model; 0: decode in this process. "
                   "Default: the cores per rank less one.")
@click.option("--no-progress", is_flag=True)
def main(inputs, run_dir, cache, as_json, device, budget, batch_videos, decoder, frames_per_pass, threads, out,
         workers, no_progress) -> None:
    """Run a trained policy on raw videos, computing only the features its decisions use; print the
    top-5 classes, the frames visited, the expensive reads, GFLOPs and seconds per video. Under
    torchrun, rank r takes every world-th video."""
    if threads:
        torch.set_num_threads(threads)
    try:
        info, chosen = distributed.setup(device)
        recognize_all(info, chosen, video_list(inputs), run_dir=run_dir, cache=cache, as_json=as_json, budget=budget,
                      batch_videos=batch_videos or BATCH_VIDEOS[chosen.type], decoder=decoder,
                      frames_per_pass=frames_per_pass, out=out,
                      workers=default_workers() if workers is None else workers, progress=not no_progress)
    except UserError as err:  # one line; anything else is a bug and keeps its traceback
        raise click.ClickException(str(err)) from None


def recognize_all(info: distributed.Dist, device: torch.device, videos: list[str], *, run_dir: str, cache: str,
                  as_json: bool, budget: int, batch_videos: int, decoder: str, frames_per_pass: int, out: str,
                  workers: int, progress: bool) -> None:
    """``recognize``'s work on this rank: its share of ``videos`` decoded ahead by ``workers``
    processes, recognised ``batch_videos`` at a time, each result printed or appended to ``out``."""
    loaded = load(run_dir, device, frames_per_pass, cache)
    problem = "" if decoder else decoder_problem(loaded.decoder)
    chosen = resolve_decoder(decoder or ("auto" if problem else loaded.decoder))
    if chosen != loaded.decoder:
        if info.main:
            why = f" ({loaded.decoder} cannot run here: {problem})" if problem else ""
            click.echo(f"decoding with {chosen}; the cache was extracted with {loaded.decoder}{why}: frames may "
                       "differ in the last bits", err=True)
        loaded = dataclasses.replace(loaded, decoder=chosen)
    if budget and not loaded.method.stops_at_budget:
        supported = ", ".join(name for name, c in METHODS.items() if c.stops_at_budget)
        raise UserError(f"--budget needs a method that reads frames in order ({supported}); "
                        f"{loaded.run.method} does not")
    with contextlib.ExitStack() as held:
        results = None
        if out:
            stamp = {"run": os.path.abspath(run_dir), "run_id": loaded.run.config.get(RUN_ID), "budget": budget,
                     "decoder": loaded.decoder}
            results = ResultsFile(out, stamp)
            os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
            held.enter_context(exclusive_job(out + ".lock", out, main=info.main, device=device,
                                             advice="wait for that run to finish, or pass another --out",
                                             then=results.repair_and_check))
            distributed.barrier()
            skip = results.done()
            if info.main and skip:
                click.echo(f"{out}: {len(skip & set(videos))} of {len(videos)} videos done before; recognising the "
                           "rest", err=True)
            videos = [v for v in videos if v not in skip]
        mine = videos[info.rank::info.world]
        failed = _recognize_share(loaded, mine, results, as_json=as_json, budget=budget, batch_videos=batch_videos,
                                  workers=workers, progress=progress and info.main)
        distributed.barrier()  # every rank, unreadable videos or not
    distributed.teardown(info)
    if failed:
        raise SystemExit(1)


def recognize_stream(loaded: Loaded, videos: list[str], *, budget: int = 0, batch_videos: int = 8,
                     workers: int = 0) -> Iterator[tuple[list[dict], list[Decoded]]]:
    """``(results, unreadable)`` per batch of ``videos``: decoded ahead by ``workers`` processes, each
    batch of ``batch_videos`` readable videos recognised (:func:`recognise`) while the next decode."""
    group, failed = [], []
    for video in decode_videos(videos, loaded.sampling, loaded.decoder, workers):
        if video.error is not None:
            failed.append(video)
        else:
            group.append(video)
        if len(group) == batch_videos:
            yield recognise(loaded, group, budget), failed
            group, failed = [], []
    if group or failed:
        yield (recognise(loaded, group, budget) if group else []), failed


def _recognize_share(loaded: Loaded, videos: list[str], results: ResultsFile | None, *, as_json: bool, budget: int,
                     batch_videos: int, workers: int, progress: bool) -> int:
    """Recognise ``videos``, printing or appending each result; returns how many could not be read."""
    failed, spent, dense = 0, 0.0, 0.0
    bar = tqdm(total=len(videos), desc="recognize", unit="video", disable=not progress, file=sys.stderr)
    for done, unreadable in recognize_stream(loaded, videos, budget=budget, batch_videos=batch_videos,
                                             workers=workers):
        for video in unreadable:
            click.echo(f"{video.path}: skipped ({video.error})", err=True)
        failed += len(unreadable)
        if results is not None:
            results.append([{k: r[k] for k in JSON_KEYS} for r in done])
        for r in done:
            spent, dense = spent + r["gflops"], dense + dense_gflops(loaded, r["frames"])
            if results is not None:
                continue
            if as_json:
                click.echo(json.dumps({k: r[k] for k in JSON_KEYS}))
            else:
                top = ", ".join(f"{c} {s:.3f}" for c, s in r["top5"])
                click.echo(f"{r['video']}: {top} | {r['visited']}/{r['frames']} frames visited, {r['expensive']} "
                           f"expensive reads, {r['gflops']:.3f} GFLOPs, {r['seconds']['decode']:.3f} s decoding + "
                           f"{r['seconds']['compute']:.3f} s computing")
        bar.update(len(done) + len(unreadable))
        bar.set_postfix(GFLOPs_per_video=f"{spent / max(bar.n - failed, 1):.2f}",
                        saved=f"{1 - spent / dense:.0%}" if dense else "-", refresh=False)
    bar.close()
    if failed:
        click.echo(f"{failed} of {len(videos)} videos could not be read", err=True)
    return failed


if __name__ == "__main__":
    main()
