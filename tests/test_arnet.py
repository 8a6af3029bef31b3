"""AR-Net and its baselines: skip semantics, routing, costs, losses, stages, and the published FLOPs."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TOY_FLOPS
from extract.backbones import create_backbone
from extract.cache import write_cache
from extract.flops import FlopsEntry, backbone_flops
from policy.cli import main as train_policy
from policy.data import Batch
from policy.methods import METHODS
from policy.methods.arnet import SKIPPED_OVER, ARNet, flops_per_frame, uniform_usage
from policy.run_folder import RunFolder
from policy.train import train

DIMS, DP, C, SKIPS = [6, 5], 5, 3, torch.tensor([1, 2, 4])
ALL = torch.ones(5, dtype=torch.bool)


def hand_made(seed=0, steps=8, n=1):
    torch.manual_seed(seed)
    model = ARNet(DIMS, DP, C, hidden=4, skips=3).eval()
    feats = [torch.randn(n, steps, d) for d in DIMS]
    return model, feats, feats[1], torch.full((n,), steps)


def test_skip_semantics_on_a_hand_made_sequence():
    model, feats, policy, length = hand_made()
    # L = 2 resolutions, then skip 1 / 2 / 4 as codes 2 / 3 / 4; entries at skipped-over steps are ignored
    forced = torch.tensor([[3, 0, 0, 4, 0, 0, 0, 1]])
    out = model(feats, policy, length, skips=SKIPS, allowed=ALL, forced=forced)
    assert out["codes"].tolist() == [[3, SKIPPED_OVER, 0, 4, SKIPPED_OVER, SKIPPED_OVER, SKIPPED_OVER, 1]]
    # the policy never reads a skipped-over frame: changing those features changes none of its outputs
    changed = policy.clone()
    changed[:, [1, 4, 5, 6]] += 100
    with torch.no_grad():
        again = model(feats, changed, length, skips=SKIPS, allowed=ALL, forced=forced)
        torch.testing.assert_close(again["policy_logits"], out["policy_logits"], rtol=0, atol=0)
        read = policy.clone()
        read[:, 2] += 100  # a visited frame: what follows changes
        reread = model(feats, read, length, skips=SKIPS, allowed=ALL, forced=forced)["policy_logits"]
        assert not torch.equal(reread[:, 7], out["policy_logits"][:, 7])
    skip_one = model(feats, policy, length, skips=SKIPS, allowed=ALL, forced=torch.full((1, 8), 2))
    assert skip_one["codes"].tolist() == [[2] * 8]  # skip 1 skips only the current frame


def test_routing_and_video_prediction_average_the_chosen_heads():
    model, feats, policy, length = hand_made()
    forced = torch.tensor([[0, 1, 3, 0, 0, 1, 2, 0]])  # codes 0/1 route to heads 0/1
    out = model(feats, policy, length, skips=SKIPS, allowed=ALL, forced=forced)
    codes = out["codes"][0].tolist()
    expected, chosen = [], []
    for t, code in enumerate(codes):
        if code in (0, 1):
            expected.append(model.heads[code](feats[code][0, t]))
            chosen.append(t)
    from policy.methods.arnet import video_logits
    L = 2
    frame_logits = (out["logits"] * out["P"][:, :, :L].unsqueeze(-1)).sum(2)
    video = video_logits(frame_logits, out["P"][:, :, :L].sum(-1))
    torch.testing.assert_close(video[0], torch.stack(expected).mean(0))
    assert codes[2] == 3 and codes[3] == SKIPPED_OVER  # skip 2 covers frames 2 and 3


def test_disallowed_actions_are_never_taken():
    model, feats, policy, length = hand_made(n=16)
    resolution_only = torch.tensor([True, True, False, False, False])
    for mode in ("argmax", "sample", "gumbel"):
        codes = model(feats, policy, length, skips=SKIPS, allowed=resolution_only, mode=mode, tau=1.0)["codes"]
        assert codes.min() >= 0 and codes.max() <= 1


def test_uniform_usage_counts_every_frame_with_forced_actions():
    """Eq. 11 over frames: a frame skipped over carries the skip that jumped it, so an all-skip-4
    policy has frequency 1 on skip 4: (1 - 1/7)^2 + 6 (1/7)^2 = 42/49 (not 0.134 from visited frames)."""
    torch.manual_seed(0)
    dims = [6, 5, 4, 3]
    model = ARNet(dims, 3, C, hidden=4, skips=3).eval()
    steps = 16
    feats = [torch.randn(2, steps, d) for d in dims]
    length, allowed = torch.full((2,), steps), torch.ones(7, dtype=torch.bool)
    out = model(feats, feats[3], length, skips=SKIPS, allowed=allowed, forced=torch.full((2, steps), 6))
    assert out["codes"][0].tolist() == [6, SKIPPED_OVER, SKIPPED_OVER, SKIPPED_OVER] * 4
    assert uniform_usage(out["frame_P"], length).item() == pytest.approx(42 / 49)
    # a mixed sequence: skip 2 covers frames 1-2, skip 4 frames 4-7; every frame counts once
    forced = torch.tensor([[0, 5, 0, 1, 6, 0, 0, 0, 2, 3, 4, 0, 1, 2, 3, 4]] * 2)
    out = model(feats, feats[3], length, skips=SKIPS, allowed=allowed, forced=forced)
    counts = out["frame_P"][0].sum(0).tolist()
    assert counts == [2, 2, 2, 2, 2, 2, 4] and out["frame_P"].sum(-1).eq(1).all()
    expected = sum((c / 16 - 1 / 7) ** 2 for c in counts)
    assert uniform_usage(out["frame_P"], length).item() == pytest.approx(expected)
    padded = torch.tensor([16, 6])  # frames past the length carry nothing, and the frequency is over 6 frames
    out = model(feats, feats[3], padded, skips=SKIPS, allowed=allowed, forced=torch.full((2, steps), 6))
    assert out["frame_P"][1, 6:].sum() == 0 and out["frame_P"][1].sum() == 6


def test_flops_and_uniform_usage_terms_by_hand():
    P = torch.zeros(1, 4, 5)
    P[0, 0, 0] = P[0, 1, 1] = P[0, 2, 3] = 1  # high res, low res, skip 2 (frame 3 skipped over)
    per_action = torch.tensor([4.0, 0.5, 0.0, 0.0, 0.0])
    assert flops_per_frame(P, per_action, 0.1, torch.tensor([4])).item() == pytest.approx((4 + 0.5 + 3 * 0.1) / 4)
    every_frame_high = torch.zeros(2, 4, 7)
    every_frame_high[:, :, 0] = 1
    assert uniform_usage(every_frame_high, torch.tensor([4, 4])).item() == pytest.approx(42 / 49)
    balanced = torch.eye(7).unsqueeze(0)
    assert uniform_usage(balanced, torch.tensor([7])).item() == pytest.approx(0.0, abs=1e-12)


def arnet_config(cache, out, method="arnet", **kw):
    base = dict(method=method, features=cache, out=str(out), batch_size=4, hidden=16, warmup_epochs=1,
                joint_epochs=1, finetune_epochs=1)
    return METHODS[method].Config(**{**base, **kw})


def test_stages_freeze_what_they_must(demo_cache, tmp_path):
    cfg = arnet_config(demo_cache, tmp_path / "a")
    before = dataclasses.replace(cfg)
    cfg = METHODS["arnet"].resolve(cfg, {"efficientnet_lite0@224": 0.384, "efficientnet_lite0@112": 0.106},
                                   {"num_frames": 8})
    assert before == arnet_config(demo_cache, tmp_path / "a") != cfg  # resolving returns a new config
    method = METHODS["arnet"](cfg, {"efficientnet_lite0@224": 1280, "efficientnet_lite0@112": 1280}, 10,
                              {"efficientnet_lite0@224": 0.384, "efficientnet_lite0@112": 0.106})
    assert cfg.epochs == 3 and method.schedule == ["warmup", "joint", "finetune"]
    optimizer = method.optimizer()
    torch.manual_seed(0)
    batch = Batch(np.arange(4), {n: torch.randn(4, 8, 1280) for n in cfg.backbones},
                  torch.eye(10)[:4], torch.full((4,), 8))

    def snapshot():
        return {k: v.clone() for k, v in method.model.state_dict().items()}

    for epoch, policy_moves in ((0, False), (1, True), (2, False)):
        method.on_epoch(epoch, optimizer)
        assert optimizer.param_groups[0]["lr"] == [0.02, 0.001, 0.0005][epoch]
        before = snapshot()
        loss, _ = method.loss(method.model, batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after = snapshot()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("heads.") for k in moved)
        assert any(k.startswith(("lstm.", "fc.")) for k in moved) == policy_moves, (epoch, moved)
    assert not method.selectable(1) and method.selectable(2)


@pytest.mark.parametrize("actions", ["both", "resolution", "skip"])
def test_arnet_trains_on_the_demo_cache_with_every_action_space(demo_cache, tmp_path, actions):
    metrics = train(arnet_config(demo_cache, tmp_path / actions, actions=actions), progress=False)
    assert metrics["videos"] == 10 and metrics["gflops_per_video"] > 0
    codes = RunFolder.load(str(tmp_path / actions)).actions
    if actions == "resolution":
        assert codes.min() >= 0
    if actions == "skip":
        assert not np.isin(codes, [1]).any()


@pytest.fixture(scope="module")
def arnet_flops_cache(tmp_path_factory):
    """A small cache with random features but the real FLOPs table of AR-Net's ResNet set, T = 16."""
    names = ["resnet50@224", "resnet34@168", "resnet18@112", "mobilenetv2@84"]
    entries = [backbone_flops(create_backbone(n, weights="none")) for n in names]
    path = tmp_path_factory.mktemp("arnet") / "arnet.h5"
    n, steps, classes = 6016, 16, 200  # 6000 test videos: the Random Policy's mean cost is within 0.5% of expected
    rng = np.random.default_rng(0)
    entries = [dataclasses.replace(e, dim=8) for e in entries]  # 8-d features: heads cost ~0 GMACs
    write_cache(str(path), dataset="synthetic", sampling={"num_frames": steps},
                classes=[str(i) for i in range(classes)],
                ids=[str(i) for i in range(n)], splits=["train"] * 16 + ["test"] * (n - 16),
                labels=np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)], length=np.full(n, steps),
                frame_index=np.tile(np.arange(steps), (n, 1)), flops=entries,
                features={e.name: rng.standard_normal((n, steps, 8)).astype(np.float16) for e in entries})
    return str(path)


def test_published_gflops_of_uniform_and_multiscale(arnet_flops_cache, tmp_path):
    uniform = train(METHODS["uniform"].Config(method="uniform", features=arnet_flops_cache, out=str(tmp_path / "u"),
                                              epochs=1), progress=False)
    assert uniform["gflops_per_video"] == pytest.approx(65.76, rel=0.01)  # AR-Net Table 1, ResNet-50 x 16
    multi = train(arnet_config(arnet_flops_cache, tmp_path / "m", method="multiscale", batch_size=256), progress=False)
    assert multi["gflops_per_frame"] == pytest.approx(6.90, rel=0.02)
    cfg = arnet_config(arnet_flops_cache, tmp_path / "r", method="random", batch_size=256)
    random = train(cfg, progress=False)
    saved = json.load(open(tmp_path / "r" / "config.json"))
    assert saved["backbones"] == ["resnet50@224", "resnet34@168", "resnet18@112", "mobilenetv2@84"]
    assert saved["policy"] == "mobilenetv2@84" and cfg.backbones == () and saved["epochs"] == cfg.warmup_epochs
    # AR-Net Table 1 (ResNet): 1.04 GFLOPs/f, 16.57 GFLOPs/V at T = 16; each frame drawn independently
    assert random["gflops_per_frame"] == pytest.approx(1.04, rel=0.02)
    assert random["gflops_per_video"] == pytest.approx(16.57, rel=0.02)
    codes = RunFolder.load(str(tmp_path / "r")).actions
    assert codes.min() >= 0 and np.bincount(codes.ravel(), minlength=7).min() > 0.1 * codes.size
    sc = train(arnet_config(arnet_flops_cache, tmp_path / "s", method="scsampler", batch_size=256), progress=False)
    # SCSampler: MobileNetV2 on all 16 frames, ResNet-50 on the 10 most confident
    assert sc["gflops_per_video"] == pytest.approx(16 * 0.0504 + 10 * 4.087, rel=0.01)


@pytest.mark.parametrize("allowed", [[True, True, False, False, False], [True, False, True, True, True]],
                         ids=["resolution", "skip"])
def test_policy_logits_have_no_nan_when_actions_are_restricted(allowed):
    model, feats, policy, _ = hand_made(n=6)
    length, allowed = torch.tensor([8, 5, 8, 3, 8, 6]), torch.tensor(allowed)  # padding: frames never visited
    with torch.no_grad():
        out = model(feats, policy, length, skips=SKIPS, allowed=allowed, mode="sample")
    logits, visited = out["policy_logits"], out["codes"] >= 0
    assert not logits.isnan().any()
    assert (logits[~visited] == 0).all()  # frames the policy did not read
    assert logits[visited][:, allowed].isfinite().all() and (logits[visited][:, ~allowed] == float("-inf")).all()


@pytest.mark.parametrize("method,stages,total,fields", [
    ("arnet", {}, 110, "(warmup_epochs 10 + joint_epochs 50 + finetune_epochs 50 = 110): set warmup_epochs, "
                       "joint_epochs, finetune_epochs"),
    ("arnet", {"stages": ("joint",), "joint_epochs": 4}, 4, "(joint_epochs 4 = 4): set joint_epochs"),
    ("random", {}, 10, "(warmup_epochs 10 = 10): set warmup_epochs"),
    ("scsampler", {"warmup_epochs": 3}, 3, "(warmup_epochs 3 = 3): set warmup_epochs"),
])
def test_epochs_other_than_the_stages_total_are_refused(method, stages, total, fields):
    """Today ``--method arnet --epochs 6`` trained 110 epochs (the stages' epochs silently won).
    Unset (0) or set to the stages' total, ``epochs`` is that total."""
    cls = METHODS[method]

    def resolve(**kw):
        return cls.resolve(cls.Config(method=method, **stages, **kw), TOY_FLOPS, {"num_frames": 8})

    with pytest.raises(ValueError) as err:
        resolve(epochs=6)
    assert str(err.value) == (f"epochs=6: {method} trains for its stages' epochs {fields} "
                              "(epochs is their total, at least 1)")
    assert resolve().epochs == resolve(epochs=total).epochs == total


def test_train_policy_epochs_for_arnet_is_refused_in_one_line(tmp_path):
    cache, n = str(tmp_path / "toy.h5"), 6
    write_cache(cache, dataset="toy", sampling={"num_frames": 4}, classes=["a", "b"], ids=[str(i) for i in range(n)],
                splits=["train"] * 4 + ["test"] * 2, labels=np.eye(2, dtype=np.uint8)[np.arange(n) % 2],
                length=np.full(n, 4), frame_index=np.tile(np.arange(4), (n, 1)),
                flops=[FlopsEntry(name, 8, gflops, 1, 5) for name, gflops in TOY_FLOPS.items()],
                features={name: np.ones((n, 4, 5), np.float16) for name in TOY_FLOPS})
    result = CliRunner().invoke(train_policy, ["--method", "arnet", "--features", cache, "--out",
                                               str(tmp_path / "run"), "--epochs", "6", "--no-progress"])
    assert result.exit_code == 1 and result.output.startswith("Error: epochs=6: arnet trains for its stages' epochs")
    assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()
