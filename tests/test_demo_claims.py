"""The demo's claims on a demo generated from a seed of its own: the chain from videos to the
claims report runs, every claim is measured, gamma sets the fine usage, and every claim fails for
a broken method (the negative controls)."""
import json
import shutil

import h5py
import numpy as np

from conftest import run_cli
from eval.reports import REPORTS, Options
from eval.runs import find_runs
from extract.demo import generate_demo
from policy.methods import METHODS
from policy.methods.arnet import ARNetConfig
from policy.train import train

SEED = 11


def test_claims_on_a_small_demo_of_another_seed(tmp_path):
    root = tmp_path / "demo"
    generate_demo(str(root), seed=SEED, videos_per_class=4, frames=24, test_fraction=0.5, progress=False)
    other = run_cli("extract.cli", "--dataset", "demo", "--demo-seed", "3", "--video-root", str(root), check=False)
    assert other.returncode == 2 and f"holds the demo of seed {SEED}, not 3" in other.stderr
    cache = str(tmp_path / "demo.h5")
    run_cli("extract.cli", "--dataset", "demo", "--demo-seed", str(SEED), "--video-root", str(root), "--num-frames",
            "8", "--out", cache, "--backbone", "efficientnet_lite0@224", "--backbone", "efficientnet_lite0@84",
            "--workers", "1", "--no-progress")
    runs = tmp_path / "runs"

    def run(name, method, **kw):
        fields = METHODS[method].Config.__dataclass_fields__
        base = dict(method=method, features=cache, out=str(runs / name), epochs=12, batch_size=4, lr=1e-3, hidden=32,
                    hidden_coarse=32, hidden_fine=64, coarse="efficientnet_lite0@84", lam=16.0, optim="adam",
                    warmup_lr=1e-3, joint_lr=1e-3, finetune_lr=5e-4, alpha=0.3, warmup_epochs=3, joint_epochs=6,
                    finetune_epochs=3)
        if issubclass(METHODS[method].Config, ARNetConfig):  # AR-Net's family trains for its stages' epochs
            del base["epochs"]
        return train(METHODS[method].Config(**{k: v for k, v in {**base, **kw}.items() if k in fields}),
                     progress=False)

    run("uniform", "uniform")
    run("uniform-coarse", "uniform", fine="efficientnet_lite0@84")
    low, high = run("liteeval-low", "liteeval", gamma=0.1), run("liteeval-high", "liteeval", gamma=0.5)
    assert high["fine_usage"] > low["fine_usage"] + 0.15  # gamma, not cross-entropy alone, sets the usage
    run("arnet", "arnet")
    run("random", "random", match_run=str(runs / "arnet"))
    run("frameexit", "frameexit")
    found = find_runs([str(runs)])
    report = REPORTS["claims"](found, Options(paper=False, videos=4))
    claims = {row["claim"]: row for row in report.rows}
    video = 100 / len(found[0].video_id)  # 20 test videos: one is 5 points, so "within" allows 5 rather than 1.5
    assert video == 5.0
    assert sum(f"within {video:.1f} points of UNIFORM" in c for c in claims) == 3  # two LiteEval runs and AR-Net
    assert {"coarse features alone score >= 10 mAP points below UNIFORM",
            "random policy at the learned policy's budget scores clearly (>= 5 points) below it"} <= set(claims)
    assert sum(c.startswith("online:") for c in claims) == 3
    assert "FrameExit: above random frames at its budget by more than one test video (5.0 points)" in claims
    sweep = claims["the γ sweep moves GFLOPs monotonically"]
    assert sweep["measured"].startswith("γ=0.1: ") and "γ=0.5: " in sweep["measured"] and sweep["holds"]
    assert all(isinstance(row["holds"], bool) and row["measured"] for row in report.rows)

    broken = tmp_path / "broken"
    shutil.copytree(runs, broken)
    for name in ("liteeval-low", "liteeval-high", "arnet", "frameexit"):  # a classifier that names another class
        rewrite(broken / name, scores=lambda x: np.roll(x, 1, axis=-1), step_scores=lambda x: np.roll(x, 1, axis=-1))
    with h5py.File(runs / "uniform" / "predictions.h5") as f:  # coarse features as good as fine ones
        rewrite(broken / "uniform-coarse", scores=lambda x, fine=f["scores"][...]: fine)
    with h5py.File(runs / "liteeval-low" / "predictions.h5") as f:  # gamma that moves nothing
        rewrite(broken / "liteeval-high", gflops=lambda x, low=f["gflops"][...]: low)
    config = json.loads((broken / "random" / "config.json").read_text())
    (broken / "random" / "config.json").write_text(json.dumps({**config, "match_run": str(broken / "arnet")}))
    report = REPORTS["claims"](find_runs([str(broken)]), Options(paper=False, videos=4))
    assert len(report.rows) == len(claims)
    assert [row["claim"] for row in report.rows if row["holds"]] == []  # every claim fails for a broken method

    for folder in broken.iterdir():  # the broken runs as another cache's: the reports across caches
        with h5py.File(folder / "predictions.h5", "r+") as f:
            f.attrs["cache"] = str(tmp_path / "broken.h5")
    both = find_runs([str(runs), str(broken)])
    verdicts = {row["claim"]: row for row in REPORTS["verdicts"](both, Options()).rows}
    assert set(verdicts) == set(claims)
    for claim, row in verdicts.items():
        assert (row["demo"], row["broken"]) == ("yes" if claims[claim]["holds"] else "no", "no")
        assert row["same"] == ("no" if claims[claim]["holds"] else "yes")
    spread = {row["method"]: row for row in REPORTS["spread"](both, Options()).rows}
    assert spread["FrameExit"]["caches"] == 2 and "–" in spread["FrameExit"]["top1"]  # min–max over the two


def rewrite(folder, **change) -> None:
    """Replace datasets of a run folder's ``predictions.h5`` by a function of their values."""
    with h5py.File(folder / "predictions.h5", "r+") as f:
        for key, fn in change.items():
            f[key][...] = fn(f[key][...])
