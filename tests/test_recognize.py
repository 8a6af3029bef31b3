"""recognize: a trained policy on raw videos reproduces the offline path, spends only what it chose,
and refuses what it cannot do in one line."""
import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import TOY_DIMS, run_cli, toy_method
from extract.cache import Cache, write_cache
from policy.data import Batch
from policy.methods import METHODS, Method
from policy.methods.base import at_frames
from policy.models import real_mask
from policy.recognize import load
from policy.run_folder import Predictions, RunFolder
from policy.train import train

CONFIGS = {
    "liteeval": dict(epochs=3, hidden_coarse=16, hidden_fine=32, gamma=0.3, lam=8.0),
    "arnet": dict(hidden=16, warmup_epochs=1, joint_epochs=2, finetune_epochs=1, optim="adam", warmup_lr=3e-3,
                  joint_lr=3e-3, finetune_lr=1e-3, alpha=0.3),
    "frameexit": dict(epochs=3, hidden=16, max_frames=6),
    "ocsampler": dict(epochs=3, hidden=16, frames=3, warmup_epochs=2),
    "fastforward": dict(epochs=3, hidden=16),
}


@pytest.fixture(scope="module")
def runs(demo_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("recognize")
    for method, extra in CONFIGS.items():
        cfg = METHODS[method].Config(method=method, features=demo_cache, out=str(root / method), batch_size=4,
                                     lr=3e-3, **extra)
        train(cfg, progress=False)
    return root


def evaluated_videos(run: RunFolder) -> list[str]:
    with Cache(run.cache) as cache:
        row = {v: i for i, v in enumerate(cache.ids)}
        return [cache.video_path(row[v]) for v in run.video_id]


def recognize(run_dir, *args, check=True):
    """The CLI, at a fixed batch size (the start-up calibration times each backbone: seconds)."""
    return run_cli("policy.recognize", *args, "--run", str(run_dir), "--no-progress", "--frames-per-pass", "8",
                   check=check)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_recognize_reproduces_what_train_policy_wrote(method, runs):
    run = RunFolder.load(str(runs / method))
    videos = evaluated_videos(run)
    lines = [json.loads(line) for line in recognize(runs / method, *videos, "--json").stdout.splitlines()]
    assert [r["video"] for r in lines] == videos
    same_actions = same_top1 = frames = 0
    with Cache(run.cache) as cache:
        classes = cache.classes
    for i, r in enumerate(lines):
        offline = run.actions[i][: len(r["actions"])]
        same_actions += int((np.array(r["actions"]) == offline).sum())
        frames += len(r["actions"])
        same_top1 += r["top5"][0][0] == classes[int(run.scores[i].argmax())]
        if r["actions"] == offline.tolist():  # the same decisions cost the same GFLOPs
            assert r["gflops"] == pytest.approx(float(run.gflops[i]), rel=1e-9)
        assert set(r) == {"video", "top5", "actions", "gflops", "seconds"} and len(r["top5"]) == 5
        assert set(r["seconds"]) == {"decode", "compute"}
    assert same_actions >= 0.98 * frames and same_top1 >= 0.98 * len(lines)


def test_a_budget_stops_after_the_kth_expensive_read(runs):
    run = RunFolder.load(str(runs / "liteeval"))
    videos = evaluated_videos(run)
    full = [json.loads(line) for line in recognize(runs / "liteeval", *videos, "--json").stdout.splitlines()]
    one = [json.loads(line) for line in recognize(runs / "liteeval", *videos, "--json", "--budget", "1")
           .stdout.splitlines()]
    codes = run.codes
    for a, b in zip(full, one):
        reads = np.flatnonzero(np.isin(a["actions"], codes.expensive))
        assert sum(np.isin(b["actions"], codes.expensive)) == min(1, len(reads))
        if len(reads):  # the frames up to the first read are the same; after it, nothing is processed
            stop = reads[0]
            assert b["actions"][: stop + 1] == a["actions"][: stop + 1]
            assert set(b["actions"][stop + 1:]) <= set(codes.stopped)
            assert b["gflops"] <= a["gflops"] + 1e-9


def test_an_unreadable_video_gets_one_line_and_the_rest_go_on(runs, tmp_path):
    run = RunFolder.load(str(runs / "arnet"))
    good = evaluated_videos(run)[0]
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    proc = recognize(runs / "arnet", str(bad), good, "--threads", "1", check=False)
    assert proc.returncode == 1
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"{good}: ") and "GFLOPs" in proc.stdout
    assert f"{bad}: skipped (cannot open video stream" in proc.stderr


def test_weights_other_than_the_caches_are_refused_in_one_line(runs, tmp_path):
    source = RunFolder.load(str(runs / "liteeval"))
    other = tmp_path / "other.h5"
    with Cache(source.cache) as c:  # the same features, recorded as made with other weights
        write_cache(str(other), dataset=c.dataset, sampling=c.sampling, classes=c.classes, ids=c.ids,
                    splits=c.split.tolist(), labels=c.labels, length=c.length,
                    frame_index=np.stack([c.frame_index(i) for i in range(len(c.ids))]),
                    flops=list(c.flops.values()), features={n: c.features(n)[:] for n in c.backbones})
    folder = tmp_path / "run"
    shutil.copytree(runs / "liteeval", folder)
    predictions = Predictions(video_id=source.video_id, labels=source.labels, scores=source.scores,
                              actions=source.actions, gflops=source.gflops, codes=source.codes)
    RunFolder.save_results(str(folder), source.metrics, predictions, cache=str(other), dataset=source.dataset)
    proc = recognize(folder, evaluated_videos(source)[0], check=False)
    assert proc.returncode == 1 and "differ from those the cache was extracted with (synthetic)" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_a_method_without_a_lazy_path_is_refused_in_one_line(demo_cache, tmp_path):
    cfg = METHODS["random"].Config(method="random", features=demo_cache, out=str(tmp_path / "r"), batch_size=4,
                                   hidden=8, warmup_epochs=1)
    train(cfg, progress=False)
    proc = recognize(tmp_path / "r", "any.mp4", check=False)
    assert proc.returncode == 1 and "no lazy path for random" in proc.stderr and "liteeval" in proc.stderr


def test_a_budget_for_a_method_that_does_not_read_in_order_is_refused(runs):
    proc = recognize(runs / "ocsampler", "any.mp4", "--budget", "2", check=False)
    assert proc.returncode == 1 and "--budget needs a method that reads frames in order" in proc.stderr


def test_load_puts_the_policy_and_the_backbones_on_the_device(runs):
    loaded = load(str(runs / "liteeval"), torch.device("meta"), frames_per_pass=8)  # meta: any device but the CPU
    assert {p.device.type for p in loaded.method.model.parameters()} == {"meta"}
    assert {p.device.type for b in loaded.backbones.values() for p in b.module.parameters()} == {"meta"}


class InMemoryFrames:
    """:class:`~policy.methods.base.Frames` over features already computed, on their device."""

    def __init__(self, features: dict[str, torch.Tensor], length: torch.Tensor):
        self.feats, self.length, self.steps = features, length, next(iter(features.values())).shape[1]

    def features(self, name: str, rows: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        steps = step if isinstance(step, torch.Tensor) else torch.full_like(self.length, step)
        return at_frames(self.feats[name], steps) * rows.unsqueeze(1)

    def all_features(self, name: str, steps: torch.Tensor | None = None) -> torch.Tensor:
        mask = real_mask(self.length, self.steps) & (True if steps is None else steps)
        return self.feats[name] * mask.unsqueeze(2)


class OnlyOn(TorchDispatchMode):
    """Fails at the first operation whose result is a tensor off ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise AssertionError(f"{func} made a tensor on {t.device}, the model is on {self.device}")
        return out


LAZY = sorted(name for name, cls in METHODS.items() if cls.lazy is not Method.lazy)


@pytest.mark.parametrize("name", LAZY)
def test_every_lazy_path_makes_its_tensors_on_the_models_device(name):
    """The default device is set elsewhere (meta), as the CPU is when the model is on CUDA: a tensor
    a lazy path makes without naming the model's device lands off it and fails here. The lazy path
    takes the offline path's decisions."""
    cls, method = METHODS[name], toy_method(name, {"num_frames": 16})
    method.model.eval()
    length = torch.tensor([16, 10, 1])
    features = {n: torch.randn(len(length), 16, d) * real_mask(length, 16).unsqueeze(2) for n, d in TOY_DIMS.items()}
    with torch.no_grad():
        # offline first: it also prices the modules (cached), which is no part of a lazy path
        offline = method.infer(method.model, Batch(np.arange(len(length)), features, torch.zeros(3, 3), length))
        for budget in (0, 2) if cls.stops_at_budget else (0,):
            with torch.device("meta"), OnlyOn(torch.device("cpu")):
                inf = method.lazy(method.model, InMemoryFrames(features, length), budget)
            if not budget:
                np.testing.assert_array_equal(inf.actions, offline.actions)
                np.testing.assert_allclose(inf.scores, offline.scores, rtol=1e-5, atol=1e-6)
