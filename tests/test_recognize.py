"""recognize: a trained policy on raw videos reproduces the offline path, spends only what it chose,
and refuses what it cannot do in one line."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import TOY_DIMS, hang_decoding, run_cli, toy_method
from extract.cache import Cache, write_cache
from extract.flops import FlopsEntry
from policy.data import Batch
from policy.methods import METHODS, Method
from policy.ops import at_frames, real_mask
from policy.recognize import decode_videos, load, main, recognise, video_list
from policy.run_folder import Predictions, RunError, RunFolder
from policy.train import train

CONFIGS = {
    "liteeval": dict(epochs=3, hidden_coarse=16, hidden_fine=32, gamma=0.3, lam=8.0),
    "liteeval-rl": dict(epochs=2, hidden_coarse=16, hidden_fine=32, gamma=0.3),
    "arnet": dict(hidden=16, warmup_epochs=1, joint_epochs=2, finetune_epochs=1, optim="adam", warmup_lr=3e-3,
                  joint_lr=3e-3, finetune_lr=1e-3, alpha=0.3),
    "multiscale": dict(hidden=16, warmup_epochs=1),
    "scsampler": dict(hidden=16, warmup_epochs=1, topk=3),
    "frameexit": dict(epochs=3, hidden=16, max_frames=6),
    "ocsampler": dict(epochs=3, hidden=16, frames=3, warmup_epochs=2),
    "listentolook": dict(epochs=2, hidden=16),
    "fastforward": dict(epochs=3, hidden=16),
    "frameglimpse": dict(epochs=2, hidden=16),
    "adaframe": dict(epochs=2, hidden=16),
    "multiagent": dict(epochs=2, hidden=16),
    "uniform": dict(epochs=2),
    "lstm": dict(epochs=2, hidden=16),
}
LAZY = sorted(name for name, cls in METHODS.items() if cls.lazy is not Method.lazy)
BATCH = 4  # training's and evaluation's batch size; recognize takes the videos in batches of as many


def train_run(method: str, cache: str, out) -> RunFolder:
    fields = METHODS[method].Config.__dataclass_fields__
    extra = {k: v for k, v in CONFIGS[method].items() if k in fields}
    train(METHODS[method].Config(method=method, features=cache, out=str(out), batch_size=BATCH, lr=3e-3, **extra),
          progress=False)
    return RunFolder.load(str(out))


@pytest.fixture(scope="module")
def runs(demo_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("recognize")
    for method in ("liteeval", "arnet", "ocsampler"):
        train_run(method, demo_cache, root / method)
    return root


def evaluated_videos(run: RunFolder) -> list[str]:
    with Cache(run.cache) as cache:
        row = {v: i for i, v in enumerate(cache.ids)}
        return [cache.video_path(row[v]) for v in run.video_id]


def recognize(run_dir, *args, check=True):
    """The CLI, at a fixed batch size (the start-up calibration times each backbone: seconds)."""
    return run_cli("policy.recognize", *args, "--run", str(run_dir), "--no-progress", "--frames-per-pass", "8",
                   check=check)


def test_every_method_that_recognizes_is_listed_here():
    assert sorted(CONFIGS) == LAZY


@pytest.mark.parametrize("method", LAZY)
def test_recognize_reproduces_what_train_policy_wrote_exactly(method, demo_cache, tmp_path):
    """Raw videos -> decoding -> backbones where the decisions ask -> the method's rollout gives the
    actions, top-1 and GFLOPs of ``predictions.h5``, video for video, when the videos come in the
    evaluation's batches (other batches change matmuls in the last bits; see the README)."""
    run = train_run(method, demo_cache, tmp_path / method)
    videos = evaluated_videos(run)
    loaded = load(str(tmp_path / method), torch.device("cpu"), frames_per_pass=8)
    decoded = list(decode_videos(videos, loaded.sampling, loaded.decoder, workers=0))
    results = [r for start in range(0, len(videos), BATCH) for r in recognise(loaded, decoded[start:start + BATCH])]
    assert [r["video"] for r in results] == videos
    for i, r in enumerate(results):
        n = r["frames"]
        assert r["actions"] == run.actions[i][:n].tolist() and (run.actions[i][n:] == -1).all()
        assert r["top5"][0][0] == loaded.classes[int(run.scores[i].argmax())]
        assert r["gflops"] == float(run.gflops[i])
        np.testing.assert_allclose([s for _, s in r["top5"]], np.sort(run.scores[i])[::-1][:5], rtol=1e-5, atol=1e-6)


def test_the_command_line_prints_one_json_line_per_video(runs):
    """Here with another decoder than the cache's, which it says in one line (the decoders' frames are equal)."""
    run = RunFolder.load(str(runs / "arnet"))
    videos = evaluated_videos(run)[:BATCH]  # the evaluation's first batch
    with Cache(run.cache) as cache:
        other = "pyav" if cache.decoder == "decord" else "decord"
    proc = recognize(runs / "arnet", *videos, "--json", "--decoder", other, "--batch-videos", str(BATCH))
    assert f"decoding with {other}; the cache was extracted with " in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["video"] for r in lines] == videos
    for i, r in enumerate(lines):
        assert set(r) == {"video", "top5", "actions", "gflops", "seconds"} and len(r["top5"]) == 5
        assert set(r["seconds"]) == {"decode", "compute"}
        assert r["actions"] == run.actions[i][: len(r["actions"])].tolist()


def test_a_budget_stops_after_the_kth_expensive_read(runs):
    run = RunFolder.load(str(runs / "liteeval"))
    videos = evaluated_videos(run)
    full = [json.loads(line) for line in recognize(runs / "liteeval", *videos, "--json").stdout.splitlines()]
    one = [json.loads(line) for line in recognize(runs / "liteeval", *videos, "--json", "--budget", "1")
           .stdout.splitlines()]
    codes = run.codes
    for a, b in zip(full, one, strict=True):
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


TOY_BACKBONES = {"efficientnet_lite0@112": 0.1, "efficientnet_lite0@224": 0.4}


def toy_cache(path, sampling=None):
    """12 videos x 4 frames of random 5-d features named as real backbones, recorded as made with
    ``--weights none`` (so recognize builds its backbones in a moment, with no download)."""
    n, steps = 12, 4
    entries = [FlopsEntry(name, 8, gflops, 1, 5) for name, gflops in TOY_BACKBONES.items()]
    rng = np.random.default_rng(0)
    write_cache(str(path), dataset="toy", sampling=sampling or {"num_frames": steps}, classes=["a", "b", "c"],
                ids=[str(i) for i in range(n)], splits=["train"] * 8 + ["test"] * 4,
                labels=np.eye(3, dtype=np.uint8)[np.arange(n) % 3], length=np.full(n, steps),
                frame_index=np.tile(np.arange(steps), (n, 1)), flops=entries,
                features={e.name: rng.standard_normal((n, steps, e.dim)).astype(np.float16) for e in entries})
    with h5py.File(path, "a") as f:
        f.attrs["weights"] = json.dumps({name: "none (random init, torch seed 0)" for name in TOY_BACKBONES})
    return str(path)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A LiteEval run (LSTMs 4/8, one epoch) on :func:`toy_cache`: a run folder in a second."""
    root = tmp_path_factory.mktemp("toy")
    cfg = METHODS["liteeval"].Config(method="liteeval", features=toy_cache(root / "toy.h5"), out=str(root / "run"),
                                     epochs=1, batch_size=4, hidden_coarse=4, hidden_fine=8, device="cpu")
    train(cfg, progress=False)
    return root / "run"


@pytest.fixture
def damaged(toy_run, tmp_path):
    """A copy of the toy run to damage."""
    folder = tmp_path / "run"
    shutil.copytree(toy_run, folder)
    return folder


def cli(folder, *args):
    """``recognize`` in this process (a video that does not exist: refusals come before any video)."""
    return CliRunner().invoke(main, ["missing.mp4", "--run", str(folder), "--frames-per-pass", "8", "--device", "cpu",
                                     "--no-progress", *args])


def test_load_gives_the_model_train_policy_saved(toy_run):
    loaded = load(str(toy_run), torch.device("cpu"), frames_per_pass=8)
    saved = torch.load(toy_run / "model.pt", weights_only=True)["model"]
    state = loaded.method.model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert not loaded.method.model.training and set(loaded.backbones) == set(TOY_BACKBONES)


@pytest.mark.parametrize("key,value,line", [
    ("hidden_fine", 1e9, "hidden_fine=1000000000.0: hidden_fine must be an int in [1, 16384]"),
    ("hidden_fine", 10 ** 9, "hidden_fine=1000000000: hidden_fine must be an int in [1, 16384]"),
    ("sync", "no", "sync='no': sync must be true or false"),
    ("gamma", None, "gamma=None: gamma must be a finite number in [0, 1]"),
])
def test_a_damaged_config_json_is_refused_in_one_line_before_a_model_is_built(damaged, monkeypatch, key, value,
                                                                             line):
    """Today ``hidden_fine=1e9`` grew recognize to 16 GiB before failing and ``sync: "no"`` read as true."""
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**config, key: value}))
    monkeypatch.setattr(METHODS["liteeval"], "build", lambda self: pytest.fail("a model was built"))
    result = cli(damaged)
    assert result.exit_code == 1 and result.output == f"Error: {damaged / 'config.json'}: {line}\n"


def test_a_damaged_model_pt_is_refused_in_one_line(damaged, tmp_path):
    """Today a zero-byte model.pt ended in a traceback ("Aborted!" on the command line)."""
    model = damaged / "model.pt"
    whole = model.read_bytes()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"optimizer": {}}, tmp_path / "other.pt")
    for content, said in ((b"", "is empty (0 bytes)"), (whole[: len(whole) // 2], "truncated or foreign"),
                          ((tmp_path / "tensor.pt").read_bytes(), "holds a Tensor, not a checkpoint"),
                          ((tmp_path / "other.pt").read_bytes(), "is not a checkpoint of this kind (it lacks model)")):
        model.write_bytes(content)
        result = cli(damaged)
        assert result.exit_code == 1 and result.output.startswith(f"Error: {model} ") and said in result.output
        assert result.output.count("\n") == 1
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, model)  # a checkpoint of another model
    with pytest.raises(RunError, match=r"model.pt does not fit the liteeval model its config.json describes \("):
        load(str(damaged), torch.device("cpu"), frames_per_pass=8)
    config = json.loads((damaged / "config.json").read_text())
    model.write_bytes(whole)
    (damaged / "config.json").write_text(json.dumps({**config, "hidden_fine": 16}))  # it was trained with 8
    with pytest.raises(RunError, match="does not fit .* size mismatch for") as err:
        load(str(damaged), torch.device("cpu"), frames_per_pass=8)
    assert "\n" not in str(err.value)


def test_a_list_file_takes_whole_lines(tmp_path):
    """Today each line was cut at its first space."""
    (tmp_path / "videos.txt").write_text("# clips of the test\nmy clip 1.mp4\n\n  /abs/other clip.mp4  \n"
                                         "   \n#/abs/not this.mp4\nsub/a.mp4\n")
    assert video_list((str(tmp_path / "videos.txt"), "b c.mp4")) == [
        os.path.join(tmp_path, "my clip 1.mp4"), "/abs/other clip.mp4", os.path.join(tmp_path, "sub/a.mp4"), "b c.mp4"]


def test_a_moved_cache_is_named_and_taken_from_cache(damaged, tmp_path):
    """Today a run whose cache moved could not be recognised at all."""
    recorded = RunFolder.load(str(damaged)).cache
    moved = shutil.copy(recorded, tmp_path / "moved.h5")
    with h5py.File(damaged / "predictions.h5", "a") as f:  # as if the cache had been moved away
        f.attrs["cache"] = str(tmp_path / "gone.h5")
    result = cli(damaged)
    assert result.exit_code == 1 and result.output == (
        f"Error: {damaged}: its cache {tmp_path / 'gone.h5'} is gone; recognize reads the class names, sampling, "
        "FLOPs table and backbone weights from it: pass --cache PATH if it moved\n")
    assert "missing.mp4: skipped" in cli(damaged, "--cache", moved).output  # loaded: on to the videos
    loaded = load(str(damaged), torch.device("cpu"), frames_per_pass=8, cache=moved)
    assert loaded.classes == ["a", "b", "c"] and loaded.steps == 4
    other = toy_cache(tmp_path / "other.h5", sampling={"num_frames": 8})
    with pytest.raises(RunError, match=r"other.h5 holds sampling \{'num_frames': 8\}, the run was trained on "
                                       r"\{'num_frames': 4\}: recognize needs the cache the run was trained on"):
        load(str(damaged), torch.device("cpu"), frames_per_pass=8, cache=other)
    assert cli(damaged, "--cache", str(tmp_path / "nowhere.h5")).output == \
        f"Error: --cache {tmp_path / 'nowhere.h5'}: no such file\n"


def test_out_appends_one_line_per_video_resumes_and_refuses_another_runs_file(runs, tmp_path):
    """``--out FILE.jsonl``: a re-run skips the videos already there (a killed run loses only those in
    flight, and a line a kill cut short is dropped); another run's file is refused in one line."""
    run = RunFolder.load(str(runs / "liteeval"))
    videos = evaluated_videos(run)[:6]
    out = tmp_path / "r.jsonl"
    recognize(runs / "liteeval", *videos[:4], "--out", str(out), "--batch-videos", "2", "--workers", "1")
    first = out.read_text().splitlines()
    assert len(first) == 4 and out.read_text().endswith("\n")
    with open(out, "a") as f:
        f.write(first[-1][: len(first[-1]) // 2])  # torn by a kill
    proc = recognize(runs / "liteeval", *videos, "--out", str(out), "--batch-videos", "2", "--workers", "1")
    assert proc.stdout == "" and f"{out}: 4 of 6 videos done before; recognising the rest" in proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["video"] for r in lines] == videos and out.read_text().splitlines()[:4] == first
    assert {r["run_id"] for r in lines} == {run.config["run_id"]} and {r["budget"] for r in lines} == {0}
    whole = [json.loads(line) for line in recognize(runs / "liteeval", *videos, "--json").stdout.splitlines()]
    assert [(r["actions"], r["gflops"]) for r in lines] == [(r["actions"], r["gflops"]) for r in whole]
    other = recognize(runs / "arnet", *videos, "--out", str(out), check=False)
    assert other.returncode == 1 and other.stderr.count("\n") == 1
    assert f"{out} holds results of another run or setting (run_id=" in other.stderr
    budget = recognize(runs / "liteeval", *videos, "--out", str(out), "--budget", "1", check=False)
    assert budget.returncode == 1 and "budget=0 there, 1 here" in budget.stderr


def test_a_decoder_that_hangs_is_stopped_and_the_other_videos_recognised(runs, monkeypatch, tmp_path):
    """Decoding runs in worker processes under the decoding time limit: a video whose decoder hangs
    (deaf to SIGTERM, as native code is) is skipped with the reason; the rest are recognised."""
    from click.testing import CliRunner

    from policy import recognize as module

    run = RunFolder.load(str(runs / "arnet"))
    videos = evaluated_videos(run)[:3]
    hang = videos[1]
    hang_decoding(monkeypatch, module, "read_distinct", hang)  # the workers are forked from this process
    result = CliRunner().invoke(main, [*videos, "--run", str(runs / "arnet"), "--json", "--no-progress",
                                       "--frames-per-pass", "8", "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 1
    assert [json.loads(line)["video"] for line in result.stdout.splitlines()] == [videos[0], videos[2]]
    assert f"{hang}: skipped (decoding took longer than 3 s (60 s + 1 s per MB of file)" in result.stderr


def test_torchrun_shards_the_videos_and_the_ranks_share_one_out_file(runs, tmp_path):
    run = RunFolder.load(str(runs / "arnet"))
    videos = evaluated_videos(run)[:5]
    out = tmp_path / "r.jsonl"
    # --run-dir: torchrun's own parser would take --run for an abbreviation of its --run-path
    run_cli("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "policy.recognize", *videos,
            "--run-dir", str(runs / "arnet"), "--out", str(out), "--no-progress", "--frames-per-pass", "8",
            "--workers", "1", env={"OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["video"] for r in lines) == sorted(videos)  # each once: rank r took every 2nd video
    alone = {r["video"]: r for r in map(json.loads, recognize(runs / "arnet", *videos, "--json").stdout.splitlines())}
    for r in lines:
        assert (r["actions"], r["top5"][0][0]) == (alone[r["video"]]["actions"], alone[r["video"]]["top5"][0][0])
