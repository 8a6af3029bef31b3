"""The demo's claims on a demo generated from a seed of its own: the chain from videos to the
claims report runs, every claim is measured, and gamma sets the fine usage."""
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
    report = REPORTS["claims"](find_runs([str(runs)]), Options(paper=False, videos=4))
    claims = {row["claim"]: row for row in report.rows}
    assert sum("within 1.5 points of UNIFORM" in c for c in claims) == 3  # two LiteEval runs and AR-Net
    assert {"coarse features alone score >= 10 mAP points below UNIFORM",
            "random policy at the learned policy's budget scores clearly (>= 5 points) below it"} <= set(claims)
    assert sum(c.startswith("online:") for c in claims) == 2
    sweep = claims["the γ sweep moves GFLOPs monotonically"]
    assert sweep["measured"].startswith("γ=0.1: ") and "γ=0.5: " in sweep["measured"] and sweep["holds"]
    assert all(isinstance(row["holds"], bool) and row["measured"] for row in report.rows)
