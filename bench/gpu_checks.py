"""The checks only a GPU can answer, as one short script (about 10 minutes on one GPU): run it
whenever a GPU is at hand and put what it prints, with the GPU's name, in the README.

On a small generated demo (10 classes x ``--per-class`` videos of 48 frames, EfficientNet-Lite0 at
224/112/84 px, 16 frames per video) it prints one line per check:

1. features on the device against the CPU's (per-frame cosine, non-finite values);
2. extraction frames/s on the device at 2 and ``--many-workers`` decoding workers, batch 32 and 128;
3. every method training on the device (seconds, test mAP), and the LSTM baseline's GFLOPs/video
   on the device against the CPU's (the FLOP counter prices on a CPU copy: they must be equal);
4. same-seed determinism on the device, plain and with ``--set deterministic=true``, and a
   resumed run against the uninterrupted one;
5. ``torchrun`` over one GPU (NCCL);
6. ``recognize`` on the device: agreement with ``predictions.h5`` (actions, top-1) and its
   compute-time ratio to UNIFORM against the GFLOPs ratio (``bench/recognize.py``);
7. ``finetune-backbone``'s model: peak memory per frame in bf16 and fp16 autocast;
8. ``bench/train.py`` sequences/s with and without TF32.

Usage: python bench/gpu_checks.py [--device cuda] [--work DIR] [--per-class 8] [--many-workers 14]
Runs on the CPU too (``--device cpu``: a dry run of the script itself). Writes ``checks.json`` in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as `python bench/gpu_checks.py`: keep the repository root importable
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from extract.backbones import create_backbone
from extract.cache import Cache
from extract.demo import generate_demo
from extract.finetune import TSN
from extract.training import soft_cross_entropy
from policy.methods import METHODS
from policy.methods.arnet import ARNetConfig
from policy.run_folder import RunFolder
from policy.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = ("efficientnet_lite0@224", "efficientnet_lite0@112", "efficientnet_lite0@84")
SMALL = {"hidden": 64, "hidden_coarse": 64, "hidden_fine": 128, "warmup_epochs": 1, "joint_epochs": 2,
         "finetune_epochs": 1}
results: dict[str, object] = {}


def say(key: str, line: str, value: object = None) -> None:
    print(f"{key}: {line}", flush=True)
    results[key] = line if value is None else value


def cli(*args: str, env: dict | None = None) -> tuple[float, str]:
    """``python -m ARGS`` from the repository root; returns (seconds, stdout + stderr); fails loudly."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:4])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def extract(demo: str, out: str, device: str, workers: int = 2, batch: int = 32) -> float:
    """extract-features on the demo into a fresh ``out``; returns the frames/s it prints."""
    _, text = cli("extract.cli", "--dataset", "demo", "--video-root", demo, "--num-frames", "16", "--out", out,
                  "--device", device, "--workers", str(workers), "--batch-size", str(batch), "--no-progress",
                  *[a for b in BACKBONES for a in ("--backbone", b)])
    return float(re.search(r"\(([\d.]+) frames/s\)", text).group(1))


def config(method: str, cache: str, out: str, device: str, **extra):
    fields = METHODS[method].Config.__dataclass_fields__
    small = {k: v for k, v in SMALL.items() if k in fields}
    if not issubclass(METHODS[method].Config, ARNetConfig):  # AR-Net's family trains for its stages' epochs
        small["epochs"] = 3
    return METHODS[method].Config(method=method, features=cache, out=out, device=device, batch_size=16, lr=1e-3,
                                  **{**small, **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", help="folder for the demo, caches and runs (default: a temporary one)")
    parser.add_argument("--per-class", type=int, default=8, help="demo videos per class")
    parser.add_argument("--many-workers", type=int, default=min(14, len(os.sched_getaffinity(0)) - 1))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="gpu_checks_")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say("machine", f"{name}, torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, work in {work}")
    demo = os.path.join(work, "demo")
    generate_demo(demo, videos_per_class=args.per_class, frames=48, progress=False)

    # 1-2. features: device against CPU; throughput at few/many workers and small/large batches
    cpu_cache, dev_cache = os.path.join(work, "cpu.h5"), os.path.join(work, "dev.h5")
    extract(demo, cpu_cache, "cpu")
    extract(demo, dev_cache, args.device)
    with Cache(cpu_cache) as a, Cache(dev_cache) as b:
        for n in BACKBONES:
            x, y = a.features(n)[:].astype(np.float32), b.features(n)[:].astype(np.float32)
            real = np.linalg.norm(x, axis=-1) > 0
            cos = (x * y).sum(-1)[real] / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))[real]
            say(f"features {n}", f"cosine to the CPU's min {cos.min():.5f} mean {cos.mean():.5f}; "
                                 f"{int((~np.isfinite(y)).sum())} non-finite", {"min": float(cos.min())})
    for workers in (2, args.many_workers):
        for batch in (32, 128):
            rate = extract(demo, os.path.join(work, f"x{workers}_{batch}.h5"), args.device, workers, batch)
            say(f"extract workers={workers} batch={batch}", f"{rate:.1f} frames/s", rate)

    # 3. every method on the device; the LSTM baseline priced on both devices
    runs = os.path.join(work, "runs")
    for method in sorted(METHODS):
        extra = {"match_run": os.path.join(runs, "arnet")} if method == "random" else {}
        if method == "random" and not os.path.isdir(extra["match_run"]):
            continue
        start = time.perf_counter()
        metrics = train(config(method, dev_cache, os.path.join(runs, method), args.device, **extra), force=True,
                        progress=False)
        say(f"train {method}", f"{time.perf_counter() - start:.1f} s, mAP {metrics['mAP']:.4f}, "
                               f"{metrics['gflops_per_video']:.4f} GFLOPs/video", metrics)
    on_cpu = train(config("lstm", dev_cache, os.path.join(work, "lstm_cpu"), "cpu"), force=True, progress=False)
    on_dev = RunFolder.load(os.path.join(runs, "lstm")).metrics
    same = on_dev["gflops_per_video"] == on_cpu["gflops_per_video"]
    say("lstm GFLOPs device vs CPU", f"{on_dev['gflops_per_video']:.6f} vs {on_cpu['gflops_per_video']:.6f} "
                                     f"({'equal' if same else 'DIFFER'})", same)

    # 4. determinism and resume on the device
    for mode, extra in (("plain", {}), ("deterministic", {"deterministic": True})):
        for method in ("liteeval", "frameexit", "ocsampler"):
            got = [train(config(method, dev_cache, os.path.join(work, f"det_{mode}_{method}_{i}"), args.device,
                                **extra), force=True, progress=False) for i in range(2)]
            say(f"same seed twice {method} {mode}", "identical" if got[0] == got[1] else f"differ: {got}",
                got[0] == got[1])
    full = train(config("liteeval", dev_cache, os.path.join(work, "full"), args.device, epochs=4,
                        deterministic=True), force=True, progress=False)
    part = os.path.join(work, "part")
    train(config("liteeval", dev_cache, part, args.device, epochs=2, deterministic=True), force=True, progress=False)
    resumed = train(config("liteeval", dev_cache, part, args.device, epochs=4, deterministic=True), resume=True,
                    progress=False)
    say("resume after 2 of 4 epochs (deterministic)", "identical" if full == resumed else f"differ: {full} {resumed}",
        full == resumed)

    # 5. torchrun over one GPU
    seconds, _ = cli("torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "policy.cli",
                     "--method", "liteeval", "--features", dev_cache, "--device", args.device, "--epochs", "2",
                     "--out", os.path.join(work, "torchrun"), "--force", "--no-progress")
    say("torchrun 1 process", f"ok in {seconds:.1f} s")

    # 6. recognize on the device: agreement with predictions.h5, and its time against its GFLOPs
    for method in ("uniform", "liteeval", "arnet", "frameexit"):
        run = RunFolder.load(os.path.join(runs, method))
        with Cache(run.cache) as cache:
            rows = {v: i for i, v in enumerate(cache.ids)}
            videos, classes = [cache.video_path(rows[v]) for v in run.video_id], cache.classes
        _, text = cli("policy.recognize", *videos, "--run", run.path, "--json", "--no-progress", "--device",
                      args.device)
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        actions = np.mean([r["actions"] == run.actions[i][: len(r["actions"])].tolist() for i, r in enumerate(lines)])
        top1 = np.mean([r["top5"][0][0] == classes[int(run.scores[i].argmax())] for i, r in enumerate(lines)])
        say(f"recognize {method}", f"{actions:.1%} of videos with the same actions, {top1:.1%} the same top-1",
            {"actions": float(actions), "top1": float(top1)})
    _, text = cli("bench.recognize", "--uniform", os.path.join(runs, "uniform"), "--liteeval",
                  os.path.join(runs, "liteeval"), "--arnet", os.path.join(runs, "arnet"), "--device", args.device,
                  "--repeats", "2")
    say("bench/recognize.py", "\n  " + "\n  ".join(text.strip().splitlines()[-6:]))

    # 7. finetuning memory per frame (ResNet-50@224, 16 segments), bf16 and fp16 autocast
    if device.type == "cuda":
        backbone = create_backbone("resnet50@224", weights="none")
        model = TSN(backbone.module, backbone.dim, 10).to(device, memory_format=torch.channels_last)
        model.features.requires_grad_(True)
        clips = torch.randn(4, 16, 3, 224, 224, device=device)
        labels = torch.eye(10, device=device)[:4]
        for amp in (torch.bfloat16, torch.float16):
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with torch.autocast("cuda", dtype=amp):
                loss = soft_cross_entropy(model(clips).float(), labels).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            per_frame = (torch.cuda.max_memory_allocated(device) - base) / clips.shape[0] / clips.shape[1] / 2**20
            say(f"finetune memory {amp}", f"{per_frame:.1f} MiB per training frame (ResNet-50@224)", per_frame)

    # 8. bench/train.py with and without TF32
    for tf32 in ((), ("--tf32",)):
        _, text = cli("bench.train", "--videos", "4000", "--device", args.device, *tf32)
        rate = re.search(r"training: ([\d.]+) sequences/s", text).group(1)
        say(f"bench/train.py{' --tf32' if tf32 else ''}", f"{rate} sequences/s", float(rate))
    with open(os.path.join(work, "checks.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
