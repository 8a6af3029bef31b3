"""evaluate: metrics against sklearn and hand computations; every report in every format; plots."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score

from eval.cli import main as evaluate
from eval.formats import save_figure
from eval.reports import REPORTS, Options
from eval.runs import RunError, find_runs
from extract.cache import Cache
from extract.metrics import average_precision, hit_at_k, interpolated_average_precision, mean_average_precision
from policy.methods import METHODS
from policy.methods.base import COARSE_FINE
from policy.run_folder import ActionCodes, Predictions, RunFolder


@pytest.mark.parametrize("seed", range(3))
def test_average_precision_equals_sklearn_on_random_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((300, 12)), 1 + seed % 2)  # many ties
    labels = (rng.random((300, 12)) < 0.15).astype(np.uint8)
    labels[0] = 1
    np.testing.assert_allclose(average_precision(scores, labels), average_precision_score(labels, scores, average=None),
                               rtol=1e-12, atol=1e-15)
    assert mean_average_precision(scores, labels)[0] == pytest.approx(
        average_precision_score(labels, scores, average="macro"), rel=1e-12)


def test_hand_computed_ties_classes_without_positives_and_multi_label_hits():
    scores = np.array([[0.9, 0.2], [0.9, 0.3], [0.1, 0.4]])
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    # tie at 0.9: one threshold with P = 1/2, R = 1/2; then P = 2/3 at R = 1
    assert average_precision(scores, labels)[0] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    mean_ap, left_out = mean_average_precision(scores, labels)
    assert left_out == 1 and mean_ap == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    multi = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    truth = np.array([[1, 0, 1], [0, 0, 1]])
    assert hit_at_k(multi, truth, 1) == 0.0  # top-1 of video 0 is class 1, of video 1 class 0
    assert hit_at_k(multi, truth, 2) == 0.5  # video 0: class 2 is second; video 1 needs all three
    assert hit_at_k(multi, truth, 3) == 1.0


def test_interpolated_average_precision_on_a_hand_computed_voc_example():
    # ranked list: + - + - - +, 3 positives; precision 1, 1/2, 2/3, 1/2, 2/5, 1/2
    # monotone envelope at the positives: 1, 2/3, 1/2 -> AP = (1 + 2/3 + 1/2) / 3
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    labels = np.array([[1], [0], [1], [0], [0], [1]])
    assert interpolated_average_precision(scores, labels)[0] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert average_precision(scores, labels)[0] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    worse = np.array([[0], [1], [1], [0], [0], [1]])  # precision 0, 1/2, 2/3, 1/2, 2/5, 1/2
    assert interpolated_average_precision(scores, worse)[0] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert average_precision(scores, worse)[0] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


ARNET_CODES = ActionCodes(legend={-1: "no frame", -2: "skipped over", 0: "hi@224", 1: "lo@112", 2: "skip 1",
                                  3: "skip 2", 4: "skip 4"},
                          marks={-2: ".", 0: "224", 1: "112", 2: "s1", 3: "s2", 4: "s4"}, visited=(0, 1, 2, 3, 4),
                          expensive=(0,))
RUNS = [("uniform", {}), ("lstm", {}), ("liteeval", {}), ("liteeval", {"sync": False}),
        ("liteeval", {"gamma": 0.5}), ("liteeval", {"hidden_coarse": 64}), ("liteeval-rl", {}), ("random", {}),
        ("multiscale", {}), ("scsampler", {}), ("arnet", {}), ("arnet", {"actions": "skip"}),
        ("arnet", {"alpha": 0.0, "beta": 0.0}), ("arnet", {"stages": ("joint",)})]


@pytest.fixture(scope="module")
def synthetic_runs(demo_cache, tmp_path_factory):
    """One run folder per method and variant, with random predictions on the demo cache's test videos."""
    root = tmp_path_factory.mktemp("runs")
    with Cache(demo_cache) as cache:
        test = np.flatnonzero(cache.split == "test")
        ids, labels = [cache.ids[i] for i in test], cache.labels[test]
    n, T, C = len(ids), 8, labels.shape[1]
    rng = np.random.default_rng(0)
    for k, (method, overrides) in enumerate(RUNS):
        folder = root / f"{k:02d}_{method}"
        folder.mkdir()
        cfg = METHODS[method].Config(method=method, features=demo_cache, **overrides)
        costs = {"efficientnet_lite0@224": 0.38, "efficientnet_lite0@112": 0.1}
        cfg = METHODS[method].resolve(cfg, costs, {"num_frames": T})
        RunFolder.save_config(str(folder), {**dataclasses.asdict(cfg), "cache_dataset": "demo"})  # resolved, as saved
        actions = rng.choice([1, 2], size=(n, T)) if method.startswith("liteeval") else rng.choice([0, 1, 2, 4, -2],
                                                                                                   size=(n, T))
        if method in ("uniform", "lstm"):
            actions[:] = 2
        step_gflops = np.cumsum(np.where(actions == 2, 0.4, 0.1), 1)
        per_step = {"step_scores": rng.random((n, T, C)), "step_gflops": step_gflops}
        if method == "uniform":
            per_step["frame_scores"] = rng.random((n, T, C))
        codes = COARSE_FINE if method.startswith(("liteeval", "uniform", "lstm")) else ARNET_CODES
        predictions = Predictions(video_id=ids, labels=labels, scores=rng.random((n, C)), actions=actions,
                                  gflops=step_gflops[:, -1], codes=codes, per_step=per_step)
        RunFolder.save_results(str(folder), {}, predictions, cache=demo_cache, dataset="demo")
    return str(root)


@pytest.mark.parametrize("fmt", ["md", "json", "csv"])
@pytest.mark.parametrize("report", sorted(REPORTS))
def test_every_report_renders_in_every_format(report, fmt, synthetic_runs):
    result = CliRunner().invoke(evaluate, ["--report", report, "--runs", synthetic_runs, "--format", fmt, "--paper"])
    assert result.exit_code == 0, result.output
    if fmt == "json":
        data = json.loads(result.output)
        assert data["rows"] and set(data["columns"]) <= set().union(*data["rows"])
    elif fmt == "csv":
        assert result.output.count("\n") >= 2 and "," in result.output.splitlines()[0]
    else:
        assert result.output.startswith("### ") and "| ours |" in result.output


def test_table1_rows_and_published_numbers(synthetic_runs):
    rows = json.loads(CliRunner().invoke(evaluate, ["--report", "table1", "--runs", synthetic_runs, "--format",
                                                    "json", "--paper"]).output)["rows"]
    ours = [r for r in rows if r["source"] == "ours"]
    shown = {r["method"].split(" (")[0] for r in ours}
    assert len(ours) == len(RUNS) and {"UNIFORM", "LSTM", "Random Policy", "Multi-Scale", "SCSampler",
                                       "AR-Net", "LiteEval", "LiteEval-RL"} <= shown
    published = {(r["source"], r["method"], r["dataset"]): r for r in rows if r["source"] != "ours"}
    assert published[("published (LiteEval Table 1)", "LiteEval", "fcvid")]["GFLOPs/V"] == 94.3
    assert {"FrameGlimpse", "FastForward", "AdaFrame", "ListenToLook (Image)"} <= {k[1] for k in published}
    run = find_runs([synthetic_runs])[0]
    expected = 100 * average_precision_score(run.labels, run.scores, average="macro")
    assert ours[0]["mAP"] == pytest.approx(expected, rel=1e-12)


def test_missing_runs_name_the_commands(synthetic_runs, tmp_path):
    only_uniform = tmp_path / "u"
    os.symlink(os.path.join(synthetic_runs, "00_uniform"), only_uniform)
    result = CliRunner().invoke(evaluate, ["--report", "sync", "--runs", str(tmp_path)])
    assert result.exit_code == 1 and "train-policy --method liteeval --no-sync" in result.output
    result = CliRunner().invoke(evaluate, ["--report", "online", "--runs", str(tmp_path)])
    assert result.exit_code == 1 and "train-policy --method liteeval" in result.output


@pytest.mark.parametrize("report", ["table1", "tradeoff", "online", "usage", "frames", "gamma"])
def test_plots_are_written_and_not_blank(report, synthetic_runs, tmp_path):
    path = tmp_path / f"{report}.png"
    result = CliRunner().invoke(evaluate, ["--report", report, "--runs", synthetic_runs, "--plot", str(path)])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert image.shape[0] > 100 and image.std() > 5


def test_plot_without_matplotlib_says_to_install_the_extra(synthetic_runs, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = REPORTS["table1"](find_runs([synthetic_runs]), Options())
    with pytest.raises(RunError, match=r"framegate\[plot\]"):
        save_figure(report, str(tmp_path / "x.png"))


def test_a_run_from_another_cache_is_refused_in_one_line(synthetic_runs, tmp_path):
    import shutil

    for name in ("00_uniform", "02_liteeval"):
        shutil.copytree(os.path.join(synthetic_runs, name), tmp_path / name)
    run = RunFolder.load(str(tmp_path / "00_uniform"))
    per_step = {k: run.array(k) for k in ("step_scores", "step_gflops", "frame_scores")}
    other = Predictions(video_id=run.video_id[::-1], labels=run.labels, scores=run.scores, actions=run.actions,
                        gflops=run.gflops, codes=run.codes, per_step=per_step)  # evaluated on other videos
    RunFolder.save_results(run.path, {}, other, cache=run.cache, dataset=run.dataset)
    result = CliRunner().invoke(evaluate, ["--report", "online", "--runs", str(tmp_path)])
    assert result.exit_code == 1
    assert "were evaluated on different videos" in result.output and result.output.count("\n") == 1
    table = CliRunner().invoke(evaluate, ["--report", "table1", "--runs", str(tmp_path)])
    assert table.exit_code == 0 and table.output.count("| ours |") == 2  # the other reports still work
