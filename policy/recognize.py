"""``recognize``: a trained policy applied to raw videos, computing only what its decisions use.

It loads a run folder (its config, ``model.pt`` and action codes) and the backbones its cache was
extracted with, checked against the weights identity (and sha256) the cache records. Each video
is decoded with phase 1's decoding and preprocessing, at phase 1's sampling; the method's
``lazy`` path then asks for features frame by frame (:class:`FrameSource`): a frame is decoded
the first time a backbone needs it (seeking to it; frames no decision reaches are neither decoded
nor run through a CNN), and each backbone runs once per request on the frames of every video in
flight. The policy runs on the backbones' device; features reach it there. GFLOPs are counted
exactly as ``train-policy`` counts them, from the cache's FLOPs table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import click
import numpy as np
import torch
from tqdm import tqdm

from extract.backbones import Backbone, WeightsUnavailable, create_backbone
from extract.cache import Cache
from extract.decode import DECODERS, DOWNSAMPLE, VideoError, decoding_failed, frames_at, open_video, sample_indices
from extract.distributed import synchronize
from extract.errors import ConfigError, UserError
from extract.pipeline import compute_features, place_backbone
from extract.sampling import Sampling
from extract.training import CheckpointError, load_checkpoint

from .methods import METHODS, Method, check_config
from .run_folder import CONFIG, MODEL, RunError, RunFolder

LIST_EXTENSIONS = (".txt", ".csv", ".lst", ".list")


class FrameSource:
    """The sampled frames of a batch of videos, decoded and run through a backbone only when a
    method asks (see :class:`~policy.methods.base.Frames`); ``length`` and the features served are
    on ``device``, the features kept on the host. Seconds spent decoding and computing are kept per
    video (a batched forward's time shared by the frames in it)."""

    def __init__(self, paths: list[str], sampling: Sampling, backbones: dict[str, Backbone], device: torch.device,
                 downsample: str, l2: bool, steps: int | None, frames_per_pass: dict[str, int],
                 decoder: str = "decord"):
        self.readers, self.indices = [], []
        self.decode_seconds, self.compute_seconds = np.zeros(len(paths)), np.zeros(len(paths))
        for v, path in enumerate(paths):
            start = time.perf_counter()
            reader = open_video(path, decoder)
            try:
                self.indices.append(sample_indices(reader, sampling))  # as phase 1 sampled it
            except VideoError:
                raise
            except Exception as err:  # no frame rate, broken metadata: one line, as phase 1 says it
                raise decoding_failed(err) from None
            self.readers.append(reader)
            self.decode_seconds[v] += time.perf_counter() - start
        length = torch.tensor([len(i) for i in self.indices])
        self.steps = max(int(steps or 0), int(length.max()))  # the cache's T, as training saw it
        self.length = length.to(device)
        self.backbones, self.device, self.downsample, self.l2 = backbones, device, downsample, l2
        self.frames_per_pass = frames_per_pass
        self.crops: list[dict[int, torch.Tensor]] = [{} for _ in paths]  # step -> (3, 224, 224) uint8
        self.known: dict[tuple[str, int, int], torch.Tensor] = {}  # (name, video, step) -> features

    def decode(self, video: int, steps: list[int]) -> None:
        """Decode the frames of ``steps`` of ``video`` not decoded yet (a repeated frame once)."""
        wanted = sorted({s for s in steps if s not in self.crops[video]})
        if not wanted:
            return
        start = time.perf_counter()
        crops = frames_at(self.readers[video], self.indices[video][wanted])
        for s, crop in zip(wanted, crops, strict=True):
            self.crops[video][s] = crop
        self.decode_seconds[video] += time.perf_counter() - start

    def compute(self, name: str, wanted: list[tuple[int, int]]) -> None:
        """Run backbone ``name`` once on the frames ``(video, step)`` of ``wanted`` it has not seen
        (at most ``frames_per_pass[name]`` per forward), decoding those not decoded yet."""
        missing = list(dict.fromkeys(p for p in wanted if (name, *p) not in self.known))
        for v in sorted({v for v, _ in missing}):
            self.decode(v, [s for u, s in missing if u == v])
        per_pass = self.frames_per_pass[name]
        for lo in range(0, len(missing), per_pass):
            part = missing[lo:lo + per_pass]
            start = time.perf_counter()
            crops = torch.stack([self.crops[v][s] for v, s in part])
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


def recognise(loaded: Loaded, paths: list[str], budget: int = 0) -> list[dict]:
    """One result per video of ``paths`` (all readable): top-5, actions, GFLOPs and seconds."""
    l2 = loaded.run.config.get("normalise") == "l2"
    frames = FrameSource(paths, loaded.sampling, loaded.backbones, loaded.device, loaded.downsample, l2,
                         loaded.steps, loaded.frames_per_pass, loaded.decoder)
    start, opened = time.perf_counter(), frames.decode_seconds.sum()
    with torch.no_grad():
        inf = loaded.method.lazy(loaded.method.model, frames, budget)
    rest = time.perf_counter() - start - (frames.decode_seconds.sum() - opened) - frames.compute_seconds.sum()
    frames.compute_seconds += max(rest, 0.0) / len(paths)  # the policy's own steps, shared by the videos
    codes, lengths = loaded.method.codes, frames.length.tolist()
    results = []
    for v, path in enumerate(paths):
        n = lengths[v]
        top = np.argsort(-inf.scores[v])[:5]
        actions = inf.actions[v, :n]
        results.append({"video": path, "top5": [[loaded.classes[c], float(inf.scores[v, c])] for c in top],
                        "actions": [int(a) for a in actions], "gflops": float(inf.gflops[v]),
                        "seconds": {"decode": float(frames.decode_seconds[v]),
                                    "compute": float(frames.compute_seconds[v])},
                        "visited": int(codes.is_visited(actions).sum()),
                        "expensive": int(codes.is_expensive(actions).sum()), "frames": n,
                        "decoded": len(frames.crops[v]),
                        "computed": {name: sum(1 for n, u, _ in frames.known if n == name and u == v)
                                     for name in loaded.backbones}})
    return results


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog="""\b
Examples:
  recognize data/demo/videos/red_disc_000.mp4 --run data/runs/demo_t16/liteeval-gamma0.1
  recognize test_list.txt --run data/runs/demo_t16/arnet --json > predictions.jsonl
  recognize clip.mp4 --run data/runs/demo_t16/liteeval-gamma0.1 --budget 2
""")
@click.argument("inputs", nargs=-1, required=True, metavar="VIDEO_OR_LIST...")
@click.option("--run", "run_dir", required=True, metavar="RUN_DIR", help="A run folder of train-policy.")
@click.option("--cache", default="", metavar="CACHE.h5",
              help="The run's feature cache, where it moved (default: the cache its run folder records).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per video and line.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--budget", type=click.IntRange(0), default=0,
              help="Stop after the K-th expensive read and answer with the prediction there (0: no budget).")
@click.option("--batch-videos", type=click.IntRange(0), default=0, show_default=True,
              help="Videos in flight: each backbone runs once per step on their frames; 0: 8 on the CPU, 64 on CUDA.")
@click.option("--decoder", type=click.Choice(["", *sorted(DECODERS)]), default="",
              help="Decode with this decoder instead of the cache's (frames may then differ in the last bits).")
@click.option("--frames-per-pass", type=click.IntRange(0), default=0, show_default=True,
              help="Most frames per backbone forward pass; 0: each backbone's fastest per frame, timed at start.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch's CPU threads for the backbones; 0: torch's default (one per core). On a small CPU, "
                   "one fewer than the cores leaves decord's decoder thread a core (see the README).")
@click.option("--no-progress", is_flag=True)
def main(inputs, run_dir, cache, as_json, device, budget, batch_videos, decoder, frames_per_pass, threads,
         no_progress) -> None:
    """Run a trained policy on raw videos, computing only the features its decisions use; print the
    top-5 classes, the frames visited, the expensive reads, GFLOPs and seconds per video."""
    if threads:
        torch.set_num_threads(threads)
    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    batch_videos = batch_videos or BATCH_VIDEOS[chosen.type]
    try:
        loaded = load(run_dir, chosen, frames_per_pass, cache)
    except UserError as err:  # one line; anything else is a bug and keeps its traceback
        raise click.ClickException(str(err)) from None
    if decoder and decoder != loaded.decoder:
        click.echo(f"decoding with {decoder}; the cache was extracted with {loaded.decoder}: frames may differ in the "
                   "last bits", err=True)
        loaded = dataclasses.replace(loaded, decoder=decoder)
    if budget and not loaded.method.stops_at_budget:
        supported = ", ".join(name for name, c in METHODS.items() if c.stops_at_budget)
        raise click.ClickException(f"--budget needs a method that reads frames in order ({supported}); "
                                   f"{loaded.run.method} does not")
    videos = video_list(inputs)
    failed = 0
    bar = tqdm(total=len(videos), desc="recognize", unit="video", disable=no_progress, file=sys.stderr)
    for start in range(0, len(videos), batch_videos):
        group = videos[start:start + batch_videos]
        try:
            results = recognise(loaded, group, budget)
        except VideoError:
            results = []
            for path in group:  # find the unreadable ones; the rest go on
                try:
                    results += recognise(loaded, [path], budget)
                except VideoError as err:
                    click.echo(f"{path}: skipped ({err})", err=True)
                    failed += 1
        for r in results:
            if as_json:
                click.echo(json.dumps({k: r[k] for k in ("video", "top5", "actions", "gflops", "seconds")}))
            else:
                top = ", ".join(f"{c} {s:.3f}" for c, s in r["top5"])
                click.echo(f"{r['video']}: {top} | {r['visited']}/{r['frames']} frames visited, {r['expensive']} "
                           f"expensive reads, {r['gflops']:.3f} GFLOPs, {r['seconds']['decode']:.3f} s decoding + "
                           f"{r['seconds']['compute']:.3f} s computing")
        bar.update(len(group))
    bar.close()
    if failed:
        click.echo(f"{failed} of {len(videos)} videos could not be read", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
