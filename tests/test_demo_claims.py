"""The demo's claims on a demo generated from a seed of its own: the chain from videos to the
claims report runs, every claim is measured, gamma sets the fine usage, and every claim fails for
a broken method (the negative controls)."""
import json
import shutil
from types import SimpleNamespace

import h5py
import numpy as np

from conftest import run_cli
from eval.reports import REPORTS, Options, lead, random_frames_scores
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
    test = "at 95%, paired bootstrap over the 20 test videos"
    assert sum(f"within 1.5 points of UNIFORM (UNIFORM's lead not above it {test})" in c for c in claims) == 3
    assert {f"coarse features alone score more than 1.5 mAP points below UNIFORM ({test})", "random policy at the "
            f"learned policy's budget scores more than 5 mAP points below it ({test})"} <= set(claims)
    assert sum(c.startswith("online:") for c in claims) == 3
    assert f"FrameExit: mAP above random frames at its budget ({test})" in claims
    sweep = claims["the γ sweep moves GFLOPs monotonically"]
    assert sweep["measured"].startswith("γ=0.1: ") and "γ=0.5: " in sweep["measured"] and sweep["holds"]
    assert all(isinstance(row["holds"], bool) and row["measured"] for row in report.rows)

    broken = tmp_path / "broken"
    shutil.copytree(runs, broken)
    for name in ("liteeval-low", "liteeval-high", "arnet"):  # a classifier that names another class
        rewrite(broken / name, scores=lambda x: np.roll(x, 1, axis=-1), step_scores=lambda x: np.roll(x, 1, axis=-1))
    frameexit, uniform = (next(r for r in found if r.path.endswith(name)) for name in ("frameexit", "uniform"))
    reads = frameexit.codes.is_expensive(frameexit.actions).sum(1)  # a policy that does not look: random frames
    rewrite(broken / "frameexit", scores=lambda x: random_frames_scores(uniform, reads)[0])  # at the same budget
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


def test_random_frames_are_one_per_segment_and_the_lead_is_paired():
    n, frames, classes = 6, 12, 3
    frame_scores = np.broadcast_to(np.arange(1, frames + 1, dtype=np.float32)[None, :, None], (n, frames, classes))
    sampled = np.arange(frames)[None] < np.array([12, 12, 12, 8, 5, 1])[:, None]  # videos of 12 down to 1 frames
    reference = SimpleNamespace(array=lambda key: frame_scores, actions=None,
                                codes=SimpleNamespace(sampled=lambda actions: sampled))
    reads = np.array([4, 3, 1, 4, 9, 2])  # 9 of 5 frames takes all 5; 2 of 1 frame takes it
    for draw in random_frames_scores(reference, reads):
        mean_index = draw[:, 0] - 1  # the mean frame index picked
        assert 4.5 <= mean_index[0] <= 6.5  # 4 of 12: one in each of 0-2, 3-5, 6-8, 9-11
        assert 4 <= mean_index[1] <= 7 and 3 <= mean_index[3] <= 4  # 3 of 12: 0-3, 4-7, 8-11; 4 of 8: 0-1, ..., 6-7
        assert mean_index[4] == 2 and mean_index[5] == 0  # every frame of 5; the only frame
    labels = np.eye(classes)[np.arange(30) % classes]
    good = labels + 0.1 * np.random.default_rng(0).random(labels.shape)
    same = lead(good, good.copy(), labels, "sklearn")
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)  # the same videos on both sides: no noise
    ahead = lead(good, np.roll(good, 1, axis=1), labels, "sklearn")
    assert ahead.value > 70 and ahead.low > 50  # 100 against chance (a third)
