"""The papers' accounting on long caches, and the official codes' conventions as named options."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eval.cli import main as evaluate
from eval.runs import find_runs
from extract.cache import Cache, Journal, VideoFeatures, assemble
from extract.datasets import VideoRecord
from extract.decode import resize_crop
from extract.flops import FlopsEntry
from extract.metrics import mean_average_precision
from policy.data import Batch
from policy.methods import METHODS
from policy.methods.arnet import ARNet
from policy.ops import spread_frames
from policy.run_folder import RunFolder
from policy.train import train

FINE, COARSE, CLASSES, T = "big@224", "small@112", 4, 129
COSTS = {FINE: 7.8, COARSE: 0.08}  # GMACs per frame, LiteEval's pair


def long_cache(path, lengths, dims=(8, 6), fps=True, splits=None):
    """A cache written by phase 1's own writer: 1-fps sampling up to 129 frames (or T segments),
    class-dependent features so that methods learn something."""
    rng = np.random.default_rng(0)
    splits = splits or ["train" if i % 3 else "test" for i in range(len(lengths))]
    videos = [VideoRecord(f"v{i}", f"/nowhere/v{i}.mp4", (i % CLASSES,), s) for i, s in enumerate(splits)]
    journal = Journal(str(path))
    done = []
    for i, n in enumerate(lengths):
        feats = {}
        for name, d in zip((FINE, COARSE), dims, strict=True):
            x = rng.standard_normal((n, d)).astype(np.float32)
            x[:, i % CLASSES] += 3.0
            feats[name] = x.astype(np.float16)
        done.append(VideoFeatures(i, np.arange(n, dtype=np.int64), feats))
    journal.write(done, [], {FINE: "none", COARSE: "none"})
    sampling = {"num_frames": None, "fps": 1.0, "max_frames": T, "seek": "exact"} if fps else \
        {"num_frames": T, "fps": None, "max_frames": None, "seek": "exact"}
    assemble(str(path), chunks=journal.chunks(), videos=videos, classes=[f"c{k}" for k in range(CLASSES)], problems=[],
             attrs={"dataset": "synthetic", "video_root": "/nowhere", "sampling": json.dumps(sampling, sort_keys=True),
                    "preprocessing": "{}"},
             flops={n: FlopsEntry(n, int(n.split("@")[1]), COSTS[n], 10, d)
                    for n, d in zip((FINE, COARSE), dims, strict=True)},
             weights={FINE: "none", COARSE: "none"}, max_length=T)
    journal.remove()
    return str(path)


@pytest.fixture(scope="module")
def cache129(tmp_path_factory):
    lengths = [129, 129, 40, 25, 10, 90, 129, 3, 60, 129, 77, 129] * 3
    return long_cache(tmp_path_factory.mktemp("long") / "fps1-max129.h5", lengths)


def config(method, cache, out, **kw):
    kw = {"fine": FINE, **({"coarse": COARSE} if method.startswith("liteeval") else {}), **kw}
    kw = {"epochs": 2, "batch_size": 8, "lr": 1e-2, **kw}
    return METHODS[method].Config(method=method, features=cache, out=str(out), **kw)


def test_spread_frames_takes_segment_centres():
    length = torch.tensor([100, 10, 25])
    feats = torch.arange(3 * 129, dtype=torch.float32).view(3, 129, 1) % 129
    batch = spread_frames(Batch(np.arange(3), {"x": feats}, torch.zeros(3, 2), length), ["x"], 25)
    assert batch.length.tolist() == [25, 10, 25]
    assert batch.features["x"][0, :, 0].long().tolist() == [int((i + 0.5) * 4) for i in range(25)]
    assert batch.features["x"][1, :10, 0].long().tolist() == list(range(10))  # fewer frames: all, in order
    assert batch.features["x"][2, :, 0].long().tolist() == list(range(25))


@pytest.mark.parametrize("method", ["uniform", "lstm"])
def test_uniform_and_lstm_take_25_frames_of_a_129_frame_cache(cache129, tmp_path, method):
    cfg = config(method, cache129, tmp_path / method, **({"hidden": 8} if method == "lstm" else {}))
    metrics = train(cfg, progress=False)
    saved = json.load(open(tmp_path / method / "config.json"))
    assert saved["frames"] == 25 and saved["normalise"] == "l2"  # the defaults on a cache sampled by fps
    cfg = METHODS[method].resolve(cfg, COSTS, {"fps": 1.0})
    run = RunFolder.load(str(tmp_path / method))
    ids, actions, gflops = run.video_id, run.actions, run.gflops
    with Cache(cache129) as cache:
        length = dict(zip(cache.ids, cache.length, strict=True))
    frames = np.array([min(length[v], 25) for v in ids])
    assert actions.shape[1] == 25 and ((actions != -1).sum(1) == frames).all()
    method_obj = METHODS[method](cfg, {FINE: 8}, CLASSES, COSTS)
    per_frame = method_obj.frame_cost if method == "uniform" else method_obj.costs[0]
    head = 0.0 if method == "uniform" else method_obj.costs[1]
    np.testing.assert_allclose(gflops, frames * per_frame + head, rtol=1e-9)
    assert per_frame == pytest.approx(7.8, rel=1e-3)  # the fine backbone plus a tiny head (and LSTM step)
    assert metrics["frames_per_video"] == pytest.approx(frames.mean())
    every = train(config(method, cache129, tmp_path / f"{method}-all", frames=0,
                         **({"hidden": 8} if method == "lstm" else {})), progress=False)
    assert every["frames_per_video"] == pytest.approx(np.mean([length[v] for v in ids]))


def test_cache_on_disk_grows_with_real_frames_not_with_padding(tmp_path):
    short = long_cache(tmp_path / "short.h5", [5] * 60, dims=(256, 128))
    full = long_cache(tmp_path / "full.h5", [129] * 60, dims=(256, 128))
    with Cache(short) as cache:
        stored = sum(cache.features(n).id.get_storage_size() for n in (FINE, COARSE))
        assert cache.features(FINE).shape == (60, 129, 256)
        assert np.array_equal(cache.features(FINE)[3, 5:], np.zeros((124, 256), np.float16))
    real = 60 * 5 * (256 + 128) * 2
    assert stored < 1.5 * real  # padding to 129 frames would be 25.8x
    assert os.path.getsize(short) < os.path.getsize(full) / 10


def test_liteeval_budget_per_video_and_per_batch(cache129, tmp_path):
    usage = torch.tensor([0.0, 1.0])
    video = METHODS["liteeval"](config("liteeval", cache129, tmp_path, gamma=0.5, lam=1.0), {FINE: 8, COARSE: 6},
                                CLASSES, COSTS)
    assert video.budget(usage).tolist() == [0.25, 0.25]  # eq. 5: each video's own usage
    batch = METHODS["liteeval"](config("liteeval", cache129, tmp_path, gamma=0.5, lam=1.0, budget="batch"),
                                {FINE: 8, COARSE: 6}, CLASSES, COSTS)
    assert batch.budget(usage).tolist() == [0.0, 0.0]  # the code's MSE of the batch's mean usage


def test_liteeval_projections_train_and_are_priced(cache129, tmp_path):
    cfg = config("liteeval", cache129, tmp_path / "p", project=True, hidden_coarse=4, hidden_fine=8)
    train(cfg, progress=False)
    saved = json.load(open(tmp_path / "p" / "config.json"))
    assert saved["project"] is True and saved["budget"] == "video"
    method = METHODS["liteeval"](cfg, {FINE: 8, COARSE: 6}, CLASSES, COSTS)
    per_frame, per_read, _ = method.policy_costs
    # per frame: coarse projection 6x4 + cLSTM 4(4)(4 + 4) + gate (4 + 2x8)x2; per read: 8x8 + fLSTM 4(8)(12 + 8)
    assert per_frame == pytest.approx((24 + 128 + 40) / 1e9) and per_read == pytest.approx((64 + 640) / 1e9)
    model = method.model.eval()
    assert model.clstm.input_size == 4 and model.flstm.input_size == 4 + 8 and model.gate.in_features == 4 + 16
    coarse, fine = torch.randn(2, 5, 6), torch.randn(2, 5, 8)
    with torch.no_grad():
        out = model(coarse, fine, torch.tensor([5, 2]))
        changed = fine.clone()
        changed[1, 2:] = 1e3  # padding never reaches a real step (nor the BatchNorm statistics in training)
        again = model(coarse, changed, torch.tensor([5, 2]))
    torch.testing.assert_close(out["logits"][1, :2], again["logits"][1, :2])


def test_uniform_logit_consensus_and_lstm_mean_readout(cache129, tmp_path):
    cfg = config("uniform", cache129, tmp_path / "u", consensus="logits")
    cfg = METHODS["uniform"].resolve(cfg, COSTS, {"fps": 1.0})
    uniform = METHODS["uniform"](cfg, {FINE: 8}, CLASSES, COSTS)
    feats, length = torch.randn(2, 25, 8), torch.tensor([25, 7])
    batch = Batch(np.arange(2), {FINE: feats}, torch.zeros(2, CLASSES), length)
    model = uniform.model.eval()
    inf = uniform.infer(model, batch)
    logits = model.head(feats[1, :7])
    np.testing.assert_allclose(inf.scores[1], logits.mean(0).softmax(-1).detach().numpy(), rtol=1e-5)
    cfg = config("lstm", cache129, tmp_path / "l", readout="mean", hidden=6)
    cfg = METHODS["lstm"].resolve(cfg, COSTS, {"fps": 1.0})
    lstm = METHODS["lstm"](cfg, {FINE: 8}, CLASSES, COSTS)
    model = lstm.model.eval()
    inf = lstm.infer(model, batch)
    with torch.no_grad():
        per_step = model(feats[1:, :7], length[1:])["logits"][0]
    np.testing.assert_allclose(inf.scores[1], per_step.mean(0).softmax(-1).numpy(), rtol=1e-5)


def test_select_on_eval_uses_the_evaluation_split_and_all_training_videos(cache129, tmp_path):
    train(config("uniform", cache129, tmp_path / "e", select_on="eval"), progress=False)
    saved = json.load(open(tmp_path / "e" / "config.json"))
    assert saved["select_on"] == "eval" and "evaluation split" in saved["validation"]
    assert saved["train_videos"] == 24 and saved["val_videos"] == saved["eval_videos"] == 12
    run = find_runs([str(tmp_path / "e")])[0]
    assert "select_on=eval" in run.label


def test_options_are_reachable_from_the_cli_and_bad_values_stop_in_one_line(cache129, tmp_path):
    from policy.cli import main as train_policy

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(train_policy, ["--method", "liteeval", "--features", cache129, "--out", str(out),
                                          "--epochs", "1", "--no-progress", "--set", "budget=batch",
                                          "--set", "project=true", "--set", "select_on=eval",
                                          "--set", "hidden_coarse=4", "--set", "hidden_fine=8"])
    assert result.exit_code == 0, result.output
    saved = json.load(open(out / "config.json"))
    assert (saved["budget"], saved["project"], saved["select_on"]) == ("batch", True, "eval")
    bad = runner.invoke(train_policy, ["--method", "uniform", "--features", cache129, "--out", str(tmp_path / "bad"),
                                       "--no-progress", "--set", "consensus=median"])
    assert bad.exit_code != 0 and "consensus must be one of softmax, logits" in bad.output
    assert "Traceback" not in bad.output


def test_arnet_policy_head_reads_the_lstm_state():
    torch.manual_seed(0)
    model = ARNet([6, 5, 3], 3, CLASSES, hidden=4, skips=3, policy_head=True).eval()
    assert model.heads[2][1].in_features == 4  # the lowest resolution's head reads the policy's hidden state
    feats = [torch.randn(1, 6, d) for d in (6, 5, 3)]
    forced = torch.full((1, 6), 2)  # the lowest resolution on every frame
    with torch.no_grad():
        out = model(feats, feats[2], torch.tensor([6]), skips=torch.tensor([1, 2, 4]),
                    allowed=torch.ones(6, dtype=torch.bool), forced=forced)
        h, c, states = torch.zeros(1, 4), torch.zeros(1, 4), []
        for t in range(6):
            h, c = model.lstm(feats[2][:, t], (h, c))
            states.append(model.heads[2](h))
    torch.testing.assert_close(out["logits"][0, :, 2], torch.cat(states))


def test_arnet_conventions_train_and_show_in_the_row(tmp_path):
    cache = long_cache(tmp_path / "t16.h5", [16] * 24, fps=False)
    base = dict(hidden=8, warmup_epochs=1, joint_epochs=1, finetune_epochs=1, batch_size=8, policy=COARSE,
                backbones=(FINE, COARSE))
    cfg = METHODS["arnet"].Config(method="arnet", features=cache, out=str(tmp_path / "a"), policy_head=True,
                                  stochastic_eval=True, **base)
    metrics = train(cfg, progress=False)
    assert json.load(open(tmp_path / "a" / "config.json"))["normalise"] == "none" and metrics["videos"] == 8
    sc = METHODS["scsampler"].Config(method="scsampler", features=cache, out=str(tmp_path / "s"), rank="logit",
                                     topk=4, **base)
    assert train(sc, progress=False)["gflops_per_video"] == pytest.approx(16 * 0.08 + 4 * 7.8, rel=1e-3)
    labels = {r.method: r.label for r in find_runs([str(tmp_path)])}
    assert "stochastic_eval=True" in labels["arnet"] and "policy_head=True" in labels["arnet"]
    assert "rank=logit" in labels["scsampler"]


def test_arnet_average_precision_counts_classes_without_positives_as_zero():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1], [0.1, 0.7, 0.2]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
    # class 0 ranks videos 0, 2, 1, 3: positives at ranks 1 and 4 -> (1 + 2/4) / 2; class 1: 1, 3, 2, 0 ->
    # positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 2 has no positive: AP 0, kept in the mean
    expected = ((1 + 2 / 4) / 2 + (1 + 2 / 3) / 2 + 0) / 3
    assert mean_average_precision(scores, labels, kind="arnet") == (pytest.approx(expected), 1)
    assert mean_average_precision(scores, labels)[0] == pytest.approx(((1 + 2 / 4) / 2 + (1 + 2 / 3) / 2) / 2)


def test_evaluate_shows_frames_features_conventions_and_published_counting(cache129, tmp_path):
    runs = tmp_path / "runs"
    train(config("uniform", cache129, runs / "u"), progress=False)
    train(config("uniform", cache129, runs / "u-raw", normalise="none"), progress=False)
    result = CliRunner().invoke(evaluate, ["--report", "table1", "--runs", str(runs), "--paper", "--format", "json",
                                           "--ap", "arnet"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert {"frames/V", "features", "counted"} <= set(table["columns"])
    ours = [r for r in table["rows"] if r["source"] == "ours"]
    assert sorted(r["features"] for r in ours) == ["l2", "none"]
    assert ours[0]["frames/V"] == 25  # the test videos have 25 frames or more
    assert any("mix feature normalisations" in n for n in table["notes"])
    minik = [r for r in table["rows"] if r["dataset"] == "minik"]
    assert {r["method"]: r["top1"] for r in minik}["AR-Net (ResNet)"] == 71.7 and all(r["mAP"] is None for r in minik)
    efficient = [r for r in table["rows"] if r["method"] == "UNIFORM (EfficientNet)"]
    assert efficient and all("native resolution" in r["counted"] for r in efficient)
    assert any(r["method"] == "LiteEval" and r["source"] == "published (AR-Net Table 2)" for r in table["rows"])


def test_nearest_downsampling_is_recorded_and_not_mixed(demo_root, tmp_path):
    from conftest import run_cli

    crops = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    near = resize_crop(crops, 112, "nearest")
    torch.testing.assert_close(near, torch.nn.functional.interpolate(crops.float() / 255, size=112, mode="nearest"))
    assert not torch.equal(near, resize_crop(crops, 112))
    out = tmp_path / "near.h5"
    args = ("extract.cli", "--dataset", "demo", "--video-root", demo_root, "--num-frames", "2", "--out", str(out),
            "--backbone", "mobilenetv2@84", "--weights", "none", "--workers", "0", "--no-progress")
    run_cli(*args, "--downsample", "nearest")
    with Cache(str(out)) as cache:
        assert "nearest" in cache.preprocessing["lower_resolutions"]
    mixed = run_cli(*args, "--backbone", "resnet18@112", check=False)
    assert mixed.returncode != 0 and "holds preprocessing" in mixed.stderr


def test_online_report_needs_uniform_over_every_frame_of_a_long_cache(cache129, tmp_path):
    from eval.reports import REPORTS, Options

    runs = tmp_path / "runs"
    train(config("liteeval", cache129, runs / "lite", hidden_coarse=4, hidden_fine=8, epochs=1), progress=False)
    train(config("uniform", cache129, runs / "u25", epochs=1), progress=False)
    report = REPORTS["online"](find_runs([str(runs)]), Options())
    assert report.empty and "--set frames=0" in report.notes[0]
    train(config("uniform", cache129, runs / "all", frames=0, epochs=1), progress=False)
    report = REPORTS["online"](find_runs([str(runs)]), Options())
    assert {r["curve"] for r in report.rows} >= {"UNIFORM-K", "SEQ-K"} and max(r["K"] for r in report.rows) == T
