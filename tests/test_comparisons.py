"""The comparison systems (FrameGlimpse, FastForward, AdaFrame, MultiAgent, ListenToLook, FrameExit,
OCSampler): each mechanism under forced or hand-set decisions, what it costs, a short training
run whose loss falls, and how evaluate shows them."""
import csv
import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import run_cli
from eval.cli import main as evaluate
from policy.data import Batch
from policy.methods import METHODS
from policy.methods.base import AFTER_STOP, NOT_READ, PREVIEW, READ
from policy.methods.selectors import coarse_to_fine
from policy.train import train

COMPARISONS = ["frameglimpse", "fastforward", "adaframe", "multiagent", "listentolook", "frameexit", "ocsampler"]
FINE, COARSE = "fine@224", "coarse@112"
FLOPS = {FINE: 4.0, COARSE: 0.3}
DIMS = {FINE: 6, COARSE: 5}
C = 3


def build(name: str, **kw):
    torch.manual_seed(0)
    cfg = METHODS[name].Config(method=name, hidden=8, **kw)
    cfg = METHODS[name].resolve(cfg, FLOPS, {"num_frames": 16})
    method = METHODS[name](cfg, DIMS, C, FLOPS)
    method.model.eval()
    return method


def batch(length=(16, 10), steps=16) -> Batch:
    torch.manual_seed(1)
    n = len(length)
    return Batch(np.arange(n), {FINE: torch.randn(n, steps, DIMS[FINE]), COARSE: torch.randn(n, steps, DIMS[COARSE])},
                 torch.eye(C)[:n], torch.tensor(length))


def test_fastforward_visits_exactly_the_frames_its_jumps_say():
    method = build("fastforward")  # jumps 1, 2, 4, 8; action 4 stops
    forced = torch.tensor([[1, 2, 0, 4] + [4] * 12, [3, 3, 0, 0] + [0] * 12])
    with torch.no_grad():
        inf = method.infer(method.model, batch(), {"actions": forced})
    assert inf.step_frame[0, :5].tolist() == [0, 2, 6, 7, -1]  # +2, +4, +1, stop
    assert inf.step_frame[1, :3].tolist() == [0, 8, -1]  # +8, then +8 would pass the 10 frames' end: stop
    first = inf.actions[0]
    assert np.flatnonzero(first == READ).tolist() == [0, 2, 6, 7]
    assert np.flatnonzero(first == NOT_READ).tolist() == [1, 3, 4, 5] and (first[8:] == AFTER_STOP).all()
    assert inf.actions[1, 10:].tolist() == [-1] * 6  # padding
    read = method.module_costs + FLOPS[FINE]
    np.testing.assert_allclose(inf.gflops, [4 * read, 2 * read])
    assert 0 < method.module_costs < 1e-3  # the agent's modules priced; the backbone dominates


def test_frameglimpse_reads_where_it_is_told_and_stops():
    method = build("frameglimpse")
    locations = torch.tensor([[1.0, 0.0, 0.5] + [0.5] * 5, [0.0] * 8])
    stop = torch.tensor([[0, 0, 1] + [0] * 5, [0] * 8])
    with torch.no_grad():
        inf = method.infer(method.model, batch(), {"locations": locations, "stop": stop})
    assert inf.step_frame[0].tolist() == [8, 15, 0, -1, -1, -1, -1, -1]  # middle first (round(0.5 * 15))
    assert inf.step_frame[1].tolist() == [4] + [0] * 7  # never stops: at most `glimpses` reads
    # the modules at every glimpse; the backbone once per distinct frame, as recognize computes it
    np.testing.assert_allclose(inf.gflops, [3 * method.module_costs + 3 * FLOPS[FINE],
                                            8 * method.module_costs + 2 * FLOPS[FINE]])
    assert inf.step_scores.shape == (2, 8, C) and np.allclose(inf.step_scores[0, 3:], inf.step_scores[0, 2])


def test_adaframe_pays_its_memory_once_and_a_read_per_step():
    method = build("adaframe", steps=4, memory=4)
    stop = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    with torch.no_grad():
        inf = method.infer(method.model, batch(length=(16, 10, 3)), {"locations": torch.zeros(3, 4), "stop": stop})
    assert inf.step_frame[0].tolist() == [8, 0, -1, -1]
    assert inf.step_frame[1].tolist() == [4, 0, 0, 0]  # frame 0 read three times: computed once
    memory = 4 * method.memory_frame_cost
    np.testing.assert_allclose(inf.gflops, [memory + 2 * method.module_costs + 2 * FLOPS[FINE],
                                            memory + 4 * method.module_costs + 2 * FLOPS[FINE],
                                            3 * method.memory_frame_cost + 4 * method.module_costs + 2 * FLOPS[FINE]])
    assert method.memory_frame_cost == pytest.approx(0.3, rel=1e-3)  # a 3-frame video's memory: its 3 frames
    assert np.flatnonzero(inf.actions[0] == PREVIEW).tolist() == [2, 6, 10, 14]  # the memory's frames, not read


def test_multiagent_moves_its_pointers():
    method = build("multiagent", agents=2, steps=2, move=0.25)
    moves = torch.tensor([[[2, 0], [1, 0]], [[0, 2], [2, 2]]])  # (N, steps, agents): 0 back, 1 stay, 2 forward
    with torch.no_grad():
        inf = method.infer(method.model, batch(), {"moves": moves})
    # starts at the centres of 2 segments (4 and 12 of 16; 2 and 7 of 10), moves of 4 (16 frames) and 2 (10 frames)
    assert inf.step_frame[0].tolist() == [4, 12, 8, 8, 8, 4]
    assert inf.step_frame[1].tolist() == [2, 7, 0, 9, 2, 9]  # clamped to the video
    # every agent's step runs the modules; the backbone runs on 3 and 4 distinct frames
    np.testing.assert_allclose(inf.gflops, [6 * method.module_costs + 3 * FLOPS[FINE],
                                            6 * method.module_costs + 4 * FLOPS[FINE]])


def test_listentolook_picks_distinct_frames_after_previewing_all():
    method = build("listentolook", frames=4)
    with torch.no_grad():
        inf = method.infer(method.model, batch(length=(16, 3)))
    assert len(set(inf.step_frame[0])) == 4 and (inf.step_frame[0] >= 0).all()
    assert sorted(inf.step_frame[1][:3]) == [0, 1, 2] and inf.step_frame[1, 3] == -1  # only 3 frames to pick
    preview, pick = method.costs
    attention = 2 * 16 * 8 / 1e9
    expected = [16 * preview + 4 * (pick + attention), 3 * preview + 3 * (pick + attention)]
    np.testing.assert_allclose(inf.gflops, expected)
    assert (inf.actions[0] != NOT_READ).all() and (inf.actions[0] == READ).sum() == 4  # the rest: PREVIEW


def test_ocsampler_picks_the_top_k_and_its_sampling_is_a_distribution():
    method = build("ocsampler", frames=2)
    scores = torch.tensor([[0.5, 2.0, -1.0]])
    total = sum(method.log_prob(scores, torch.tensor([list(p)])).exp().item()
                for p in itertools.permutations(range(3), 2))
    assert total == pytest.approx(1.0)  # Plackett-Luce over ordered draws without replacement
    assert method.pick(scores, torch.tensor([3]), noise=False).tolist() == [[1, 0]]
    with torch.no_grad():
        inf = method.infer(method.model, batch(length=(16, 1)))
    scored, context, pick = method.costs
    np.testing.assert_allclose(inf.gflops, [16 * scored + context + 2 * pick, scored + context + pick])
    assert inf.step_frame[1].tolist() == [0, -1]


def test_frameexit_exiting_at_step_k_costs_exactly_k_frames():
    assert coarse_to_fine(8) == (3, 0, 7, 1, 5, 2, 4, 6)  # middle, first, last, then ever finer midpoints
    assert all(sorted(coarse_to_fine(n)) == list(range(n)) for n in range(1, 60))
    official = [8, 0, 15, 4, 12, 7, 10, 5, 13, 2]  # 10 of 16 frames spread uniformly, in the official code's order
    for order, first, second in (("official", official, [5, 0, 9, 2, 7, 4, 6, 3, 8, 1]),
                                 ("coarse-to-fine", list(coarse_to_fine(16)), list(coarse_to_fine(10)))):
        method = build("frameexit", max_frames=6, order=order) if order != "official" else build("frameexit")
        with torch.no_grad():
            for gate in method.model.gates:  # no gate fires: the budget stops it
                gate.bias.fill_(-1e9)
        for k in (1, 3, 6):
            with torch.no_grad():
                inf = method.infer(method.model, batch(), budget=k)
            np.testing.assert_allclose(inf.gflops, k * method.step_costs)
            assert inf.step_frame[0, :k].tolist() == first[:k]
            assert np.flatnonzero(inf.actions[1] == READ).tolist() == sorted(second[:k])
            assert (inf.actions[0] == AFTER_STOP).sum() == 16 - k
    assert method.step_costs == pytest.approx(4.0, rel=1e-3)
    short = build("frameexit")
    with torch.no_grad():
        for gate in short.model.gates:
            gate.bias.fill_(-1e9)
        inf = short.infer(short.model, batch(length=(4, 10)))
    assert inf.step_frame[0].tolist() == [2, 0, 3, 1, 3, 1, 2, 1, 3, 0]  # 10 picks of 4 frames: repeats
    np.testing.assert_allclose(inf.gflops[0], 10 * short.step_costs - 6 * FLOPS[FINE])  # each frame computed once


@pytest.mark.parametrize("name", COMPARISONS)
def test_a_short_training_run_lowers_the_loss(name, demo_cache, tmp_path):
    extra = {"warmup_epochs": 4} if name == "ocsampler" else {}
    cfg = METHODS[name].Config(method=name, features=demo_cache, out=str(tmp_path / name), epochs=8, batch_size=4,
                               lr=3e-3, hidden=32, **extra)
    metrics = train(cfg, progress=False)
    with open(tmp_path / name / "train_log.csv") as f:
        ce = [float(r["ce"]) for r in csv.DictReader(f) if r.get("ce")]
    assert ce[-1] < ce[0], ce
    assert metrics["videos"] == 10 and metrics["gflops_per_video"] > 0


def test_evaluate_shows_them_online_and_checks_them_against_random_frames(demo_cache, tmp_path):
    common = dict(features=demo_cache, epochs=6, batch_size=4, lr=3e-3)
    train(METHODS["uniform"].Config(method="uniform", out=str(tmp_path / "uniform"), **common), progress=False)
    train(METHODS["frameexit"].Config(method="frameexit", out=str(tmp_path / "frameexit"), hidden=32, **common),
          progress=False)
    online = json.loads(CliRunner().invoke(evaluate, ["--report", "online", "--runs", str(tmp_path), "--format",
                                                      "json"]).output)
    assert any(r["curve"] == "FrameExit" for r in online["rows"])
    claims = json.loads(CliRunner().invoke(evaluate, ["--report", "claims", "--runs", str(tmp_path), "--format",
                                                      "json"]).output)
    row = [r for r in claims["rows"] if "random frames" in r["claim"]]
    assert len(row) == 1 and "random frames/V" in row[0]["measured"]
    table = json.loads(CliRunner().invoke(evaluate, ["--report", "table1", "--runs", str(tmp_path), "--paper",
                                                     "--format", "json"]).output)
    assert {"FrameExit", "UNIFORM (efficientnet_lite0@224)"} <= {r["method"] for r in table["rows"]}
    published = {r["method"] for r in table["rows"] if r["source"] != "ours"}
    assert {"FrameGlimpse", "FastForward", "AdaFrame", "ListenToLook (Image)", "FrameExit (ResNet-50)",
            "OCSampler (K=5 of 10)"} <= published  # the published row's K, 5 of 10 uniformly sampled candidates


@pytest.mark.parametrize("name", ["adaframe", "listentolook", "ocsampler"])
def test_a_cache_without_the_cheap_feature_is_refused_in_one_line(name, demo_cache, tmp_path):
    proc = run_cli("policy.cli", "--method", name, "--features", demo_cache, "--set", "coarse=mobilenetv2@84",
                   "--out", str(tmp_path / "r"), "--no-progress", check=False)
    assert proc.returncode == 1 and "lacks features mobilenetv2@84" in proc.stderr
    assert "extract-features --dataset demo --backbone mobilenetv2@84" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("name", ["frameglimpse", "adaframe"])
def test_the_location_score_is_taken_at_the_sample_not_the_clamped_location(name):
    """REINFORCE's score of a Gaussian location has mean 0 only at the sampled value; taken at the
    location clamped to [0, 1] it is biased near the edges (at mean 0.95, sigma 0.1: -2.0 instead of 0)."""
    method = build(name, sigma=0.1)
    with torch.no_grad():
        method.model.location.weight.zero_()
        method.model.location.bias.fill_(float(np.log(0.95 / 0.05)))  # mean 0.95
        if name == "frameglimpse":
            method.model.stop.weight.zero_()
            method.model.stop.bias.fill_(-30.0)  # never stops: every move is taken
    torch.manual_seed(0)
    n = 4000
    many = Batch(np.arange(n), {FINE: torch.randn(n, 16, DIMS[FINE]), COARSE: torch.randn(n, 16, DIMS[COARSE])},
                 torch.eye(C)[torch.arange(n) % C], torch.full((n,), 16))
    out = method.model(method.rollout, many, "sample")
    mean = 0.95
    score = torch.autograd.grad(out["log_prob"][:, 0].mean(), method.model.location.bias)[0] / (mean * (1 - mean))
    assert abs(score.item()) < 0.6  # E[(x - mean) / sigma^2] = 0 (its noise: 10 / sqrt(4000) = 0.16)


def test_a_frameexit_gate_can_exit_on_a_video_with_two_labels():
    """A perfect prediction on a 2-label video has cross-entropy log 2 > epsilon: the exit target is
    the KL divergence to the normalised labels, 0 there, on any label set."""
    method = build("frameexit")
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = labels / labels.sum(1, keepdim=True)
    logits = torch.log(y.clamp(min=1e-9)).unsqueeze(1).expand(2, 3, C)  # perfect at every step
    n, s, _ = logits.shape
    from policy.ops import step_ce

    ce = step_ce(logits, labels)
    assert ce[0, 0].item() == pytest.approx(np.log(2), abs=1e-6)
    assert method.exit_targets(ce, labels).tolist() == [[1.0] * 3, [1.0] * 3]
    wrong = step_ce(logits.flip(0), labels)  # each video given the other's prediction
    assert method.exit_targets(wrong, labels).tolist() == [[0.0] * 3, [0.0] * 3]
