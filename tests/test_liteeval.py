"""LiteEval's equations on hand-made tensors, and the training framework on the demo cache."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import killed_after_first_epoch, run_cli
from extract.cache import Cache, write_cache
from policy.data import CachedFeatures, CacheError
from policy.methods import METHODS
from policy.methods.liteeval import LiteEval
from policy.run_folder import RunFolder
from policy.train import train

DC, DF, HC, HF, C = 6, 5, 3, 7, 4


def hand_made(seed=0, steps=4, n=2):
    torch.manual_seed(seed)
    model = LiteEval(DC, DF, C, hidden_coarse=HC, hidden_fine=HF)
    coarse, fine = torch.randn(n, steps, DC), torch.randn(n, steps, DF)
    return model, coarse, fine, torch.full((n,), steps)


def reference_states(model, coarse, fine, gate, sync=True):
    """Eqs. 1, 3, 4 and the copy, written out step by step with the model's own cells."""
    n = coarse.shape[0]
    hc, cc, hf, cf = torch.zeros(n, HC), torch.zeros(n, HC), torch.zeros(n, HF), torch.zeros(n, HF)
    logits = []
    for t in range(coarse.shape[1]):
        hc, cc = model.clstm(coarse[:, t], (hc, cc))
        h_new, c_new = model.flstm(torch.cat([coarse[:, t], fine[:, t]], 1), (hf, cf))
        for i in range(n):
            if gate[i, t] == 1:
                hf[i], cf[i] = h_new[i], c_new[i]
            elif sync:
                hf[i] = torch.cat([hc[i], hf[i, HC:]])
                cf[i] = torch.cat([cc[i], cf[i, HC:]])
        hf, cf = hf.clone(), cf.clone()
        logits.append(model.classifier(hf))
    return torch.stack(logits, 1)


@pytest.mark.parametrize("pattern", [[[1, 1, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]],
                                     [[1, 0, 0, 1], [0, 1, 1, 0]]])
@pytest.mark.parametrize("sync", [True, False])
def test_equations_and_synchronisation_with_forced_gates(pattern, sync):
    model, coarse, fine, length = hand_made()
    model.sync = sync
    gate = torch.tensor(pattern, dtype=torch.float32)
    with torch.no_grad():
        out = model(coarse, fine, length, gate=gate)
        expected = reference_states(model, coarse, fine, gate, sync=sync)
    torch.testing.assert_close(out["logits"], expected)
    assert torch.equal(out["gate"], gate)


def test_no_sync_differs_only_when_the_gate_is_closed():
    model, coarse, fine, length = hand_made()
    with torch.no_grad():
        outputs = {}
        for sync in (True, False):
            model.sync = sync
            outputs[sync] = (model(coarse, fine, length, gate=torch.ones(2, 4))["logits"],
                             model(coarse, fine, length, gate=torch.tensor([[1., 0, 1, 1], [1, 1, 1, 1]]))["logits"])
    assert torch.equal(outputs[True][0], outputs[False][0])
    closed = outputs[True][1], outputs[False][1]
    assert torch.equal(closed[0][:, 0], closed[1][:, 0])  # before the closed step: same
    assert not torch.allclose(closed[0][0, 1], closed[1][0, 1])  # at it: different
    assert torch.equal(closed[0][1], closed[1][1])  # the other video never closed its gate


def test_padding_steps_change_nothing():
    model, coarse, fine, _ = hand_made()
    with torch.no_grad():
        short = model(coarse[:, :2], fine[:, :2], torch.tensor([2, 2]))
        padded = model(coarse, fine, torch.tensor([2, 2]))
    assert torch.equal(padded["logits"][:, 1], short["logits"][:, 1])
    assert torch.equal(padded["logits"][:, 3], short["logits"][:, 1]) and padded["gate"][:, 2:].sum() == 0


def test_gradients_reach_the_gate():
    model, coarse, fine, length = hand_made()
    out = model(coarse, fine, length, mode="gumbel", tau=1.0)
    loss = out["logits"][:, -1].logsumexp(1).sum() + ((out["gate"].mean(1) - 0.05) ** 2).sum()
    loss.backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["gumbel", "bernoulli"])
def test_checkpointed_steps_give_the_same_numbers_noise_and_gradients(mode):
    model, coarse, fine, _ = hand_made(steps=9, n=3)
    length = torch.tensor([9, 5, 7])
    results = []
    for blocks in (0, 2, 4):  # 0: every step's activations kept
        model.checkpoint_steps = blocks
        model.zero_grad()
        torch.manual_seed(1)
        out = model(coarse, fine, length, mode=mode, tau=1.0)
        (out["logits"][:, -1].logsumexp(1).sum() + out["gate"].sum() + out["log_prob"].sum()).backward()
        results.append((out["logits"].detach(), out["gate"].detach(), [p.grad.clone() for p in model.parameters()]))
    for logits, gate, grads in results[1:]:
        assert torch.equal(gate, results[0][1])  # the same Gumbel / Bernoulli draws
        torch.testing.assert_close(logits, results[0][0])
        for a, b in zip(grads, results[0][2], strict=True):
            torch.testing.assert_close(a, b)


def config(method, cache, out, **kw):
    base = dict(method=method, features=cache, out=str(out), epochs=6, batch_size=4, lr=1e-3, hidden_coarse=16,
                hidden_fine=32, hidden=32)
    fields = METHODS[method].Config.__dataclass_fields__
    return METHODS[method].Config(**{k: v for k, v in {**base, **kw}.items() if k in fields})


def test_fine_usage_follows_gamma(demo_cache, tmp_path):
    low = train(config("liteeval", demo_cache, tmp_path / "g005", gamma=0.05, epochs=12), progress=False)
    high = train(config("liteeval", demo_cache, tmp_path / "g05", gamma=0.5, epochs=12), progress=False)
    assert low["fine_usage"] < 0.25 and high["fine_usage"] > low["fine_usage"] + 0.2
    assert high["gflops_per_video"] > low["gflops_per_video"]


def test_run_folder_and_gflops_accounting(demo_cache, tmp_path):
    run = tmp_path / "le"
    metrics = train(config("liteeval", demo_cache, run, gamma=0.5), progress=False)
    assert sorted(os.listdir(run)) == [".lock", "config.json", "last.pt", "metrics.json", "model.pt", "predictions.h5",
                                       "train_log.csv"]
    cfg = json.load(open(run / "config.json"))
    assert cfg["coarse"] == "efficientnet_lite0@112" and cfg["fine"] == "efficientnet_lite0@224"
    assert "carved" in cfg["validation"]
    store = CachedFeatures(demo_cache, [])
    saved = RunFolder.load(str(run))
    actions, gflops = saved.actions, saved.gflops
    assert saved.scores.shape == (10, 10) and saved.array("step_scores").shape == (10, 8, 10)
    assert set(np.unique(actions)) <= {1, 2}
    pair = {"coarse": "efficientnet_lite0@112", "fine": "efficientnet_lite0@224"}
    method = METHODS["liteeval"](config("liteeval", demo_cache, run, **pair), {n: 1280 for n in pair.values()}, 10,
                                 store.flops)
    per_frame, per_read, head = method.policy_costs
    frames, reads = (actions >= 1).sum(1), (actions == 2).sum(1)
    expected = (frames * store.flops["efficientnet_lite0@112"] + reads * store.flops["efficientnet_lite0@224"]
                + frames * per_frame + reads * per_read + head)
    np.testing.assert_allclose(gflops, expected, rtol=1e-9)
    assert metrics["gflops_per_video"] == pytest.approx(expected.mean())


@pytest.mark.parametrize("method", ["uniform", "lstm", "liteeval-rl"])
def test_baselines_train_and_price(method, demo_cache, tmp_path):
    metrics = train(config(method, demo_cache, tmp_path / method, epochs=3), progress=False)
    assert 0 <= metrics["mAP"] <= 1 and metrics["gflops_per_video"] > 0
    if method != "liteeval-rl":
        assert metrics["fine_usage"] == 1.0 and metrics["gflops_per_video"] > 8 * 0.38
    assert (RunFolder.load(str(tmp_path / method)).array("frame_scores") is not None) == (method == "uniform")


def test_same_seed_same_numbers(demo_cache, tmp_path):
    a = train(config("liteeval", demo_cache, tmp_path / "a", epochs=3), progress=False)
    b = train(config("liteeval", demo_cache, tmp_path / "b", epochs=3), progress=False)
    assert a == b
    assert np.array_equal(RunFolder.load(str(tmp_path / "a")).scores, RunFolder.load(str(tmp_path / "b")).scores)


def test_incompatible_cache_is_refused_with_the_command_that_fixes_it(demo_cache, tmp_path):
    proc = run_cli("policy.cli", "--method", "liteeval", "--features", demo_cache, "--out", str(tmp_path / "x"),
                   "--set", "coarse=mobilenetv2@112", check=False)
    assert proc.returncode == 1
    assert "lacks features mobilenetv2@112" in proc.stderr and "extract-features --dataset demo" in proc.stderr
    with pytest.raises(CacheError, match="no feature cache"):
        CachedFeatures(str(tmp_path / "nope.h5"), [])


def test_resume_after_kill_mid_run_equals_uninterrupted(demo_cache, tmp_path):
    args = ["--method", "liteeval", "--features", demo_cache, "--epochs", "8", "--batch-size", "2",
            "--set", "hidden_coarse=64", "--set", "hidden_fine=256", "--no-progress"]
    run_cli("policy.cli", *args, "--out", str(tmp_path / "full"))
    run = tmp_path / "killed"
    killed_after_first_epoch(["policy.cli", *args], run)
    run_cli("policy.cli", *args, "--out", str(run), "--resume")
    resumed, full = (json.load(open(r / "metrics.json")) for r in (run, tmp_path / "full"))
    assert resumed.pop("run_id") != full.pop("run_id") and resumed == full
    assert open(run / "train_log.csv").read().count("\n") == 9


def test_cache_larger_than_the_memory_budget_is_streamed(demo_cache, tmp_path):
    names = ["efficientnet_lite0@112", "efficientnet_lite0@224"]
    memory = CachedFeatures(demo_cache, names)
    streamed = CachedFeatures(demo_cache, names, memory_budget=491_520)  # blocks of 6 videos
    assert memory.in_memory and not streamed.in_memory and streamed.block_rows < len(streamed)
    rows = np.arange(len(memory))
    for a, b in zip(memory.batches(rows, 3), streamed.batches(rows, 3), strict=True):
        assert np.array_equal(a.index, b.index) and torch.equal(a.features[names[1]], b.features[names[1]])
    shuffled = np.concatenate([b.index for b in streamed.batches(rows, 3, torch.Generator().manual_seed(1))])
    assert sorted(shuffled.tolist()) == rows.tolist() and shuffled.tolist() != rows.tolist()
    train(config("liteeval", demo_cache, tmp_path / "s", epochs=1, memory_budget_gb=491_520 / 2**30), progress=False)
    assert json.load(open(tmp_path / "s" / "config.json"))["features_in_memory"] is False


def test_resume_with_a_cache_from_another_dataset_is_refused(demo_cache, tmp_path):
    run = tmp_path / "run"
    run_cli("policy.cli", "--method", "uniform", "--features", demo_cache, "--epochs", "1", "--out", str(run),
            "--no-progress")
    other = tmp_path / "other.h5"
    with Cache(demo_cache) as c:  # the same videos and features, said to be FCVID's
        write_cache(str(other), dataset="fcvid", sampling=c.sampling, classes=c.classes, ids=c.ids,
                    splits=c.split.tolist(), labels=c.labels, length=c.length,
                    frame_index=np.stack([c.frame_index(i) for i in range(len(c.ids))]),
                    flops=list(c.flops.values()), features={n: c.features(n)[:] for n in c.backbones})
    proc = run_cli("policy.cli", "--method", "uniform", "--features", str(other), "--epochs", "2", "--out", str(run),
                   "--resume", check=False)
    assert proc.returncode == 1 and "was trained on a demo cache" in proc.stderr and "is fcvid" in proc.stderr
    assert json.load(open(run / "metrics.json"))["videos"] == 10  # the run is untouched


class RowCounter:
    """Stands in for a cache file and counts the feature rows each read of ``/features`` touches."""

    def __init__(self, file):
        self.file, self.rows = file, 0

    def __getitem__(self, key):
        return _CountedGroup(self, self.file[key]) if key == "features" else self.file[key]


class _CountedGroup:
    def __init__(self, counter, group):
        self.counter, self.group = counter, group

    def __getitem__(self, name):
        return _CountedDataset(self.counter, self.group[name])

    def keys(self):
        return self.group.keys()


class _CountedDataset:
    def __init__(self, counter, dataset):
        self.counter, self.dataset = counter, dataset

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __getitem__(self, selection):
        data = self.dataset[selection]
        self.counter.rows += len(data)
        return data

    def read_direct(self, out, source_sel, dest_sel):
        rows = source_sel[0] if isinstance(source_sel, tuple) else source_sel
        self.counter.rows += rows.stop - rows.start
        self.dataset.read_direct(out, source_sel, dest_sel)


def test_streaming_reads_only_the_rows_asked_for(demo_cache):
    """Validation rows are scattered among the training rows, as in every real cache."""
    names = ["efficientnet_lite0@112", "efficientnet_lite0@224"]
    memory, streamed = CachedFeatures(demo_cache, names), CachedFeatures(demo_cache, names, memory_budget=491_520)
    train_rows, val_rows, _, _ = streamed.splits(seed=0, val_fraction=0.3)
    scattered = np.flatnonzero(np.isin(np.arange(len(streamed)), val_rows))
    assert scattered[-1] - scattered[0] + 1 > len(scattered)  # a span read would touch rows not asked for
    streamed.cache.file = counter = RowCounter(streamed.cache.file)
    for rows in (val_rows, train_rows):
        counter.rows = 0
        got = list(streamed.batches(rows, 2))
        assert counter.rows == len(rows) * len(names)
        for a, b in zip(memory.batches(rows, 2), got, strict=True):
            assert np.array_equal(a.index, b.index) and torch.equal(a.features[names[1]], b.features[names[1]])


def test_run_folder_name_and_the_cache_taken_are_stated(demo_cache, tmp_path):
    features = tmp_path / "data" / "features"
    features.mkdir(parents=True)
    os.symlink(demo_cache, features / "mine.h5")
    arnet = ["--set", "hidden=16", "--set", "warmup_epochs=1", "--set", "joint_epochs=1", "--set", "finetune_epochs=1"]
    first = run_cli("policy.cli", "--method", "arnet", "--no-progress", *arnet, cwd=tmp_path)
    assert "using data/features/mine.h5" in first.stderr  # which cache, in one line
    match = tmp_path / "data" / "runs" / "mine" / "arnet_hidden=16_warmup_epochs=1_joint_epochs=1_finetune_epochs=1"
    assert match.is_dir()
    run_cli("policy.cli", "--method", "random", "--no-progress", *arnet, "--set", f"match_run={match}", cwd=tmp_path)
    made = sorted(p.name for p in (tmp_path / "data" / "runs" / "mine").iterdir())
    assert len(made) == 2 and all((tmp_path / "data" / "runs" / "mine" / name / "metrics.json").exists()
                                  for name in made)
    assert any(name.startswith("random_") and "match_run=" in name for name in made)
