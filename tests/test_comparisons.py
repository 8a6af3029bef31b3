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
from policy.methods.agents import nearby
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


def test_fastforward_jumps_back_and_forth_and_stops_by_its_stop_network():
    method = build("fastforward")  # jumps -2, -1, +1, +2, +4, +8, +16 (indices 0-6)
    actions = torch.tensor([[3, 4, 1, 2, 0] + [0] * 11, [5, 6] + [0] * 14, [0, 2, 0] + [0] * 13])
    stop = torch.tensor([[0, 0, 0, 0, 1] + [0] * 11, [0] * 16, [0, 0, 1] + [0] * 13])
    with torch.no_grad():
        inf = method.infer(method.model, batch(length=(16, 10, 3)), {"actions": actions, "stop": stop})
    assert inf.step_frame[0, :6].tolist() == [0, 2, 6, 5, 6, -1]  # +2, +4, -1, +1, then the stop network stops it
    assert inf.step_frame[1, :3].tolist() == [0, 8, -1]  # +8, then +16 would pass the 10 frames' end: stop
    assert inf.step_frame[2, :4].tolist() == [0, 0, 1, -1]  # -2 from the first frame stays there
    first = inf.actions[0]
    assert np.flatnonzero(first == READ).tolist() == [0, 2, 5, 6]
    assert np.flatnonzero(first == NOT_READ).tolist() == [1, 3, 4] and (first[7:] == AFTER_STOP).all()
    assert inf.actions[1, 10:].tolist() == [-1] * 6  # padding
    modules, backbone = method.module_costs, FLOPS[FINE]  # a frame read again is computed once
    np.testing.assert_allclose(inf.gflops, [5 * modules + 4 * backbone, 2 * modules + 2 * backbone,
                                            3 * modules + 2 * backbone])
    assert 0 < method.module_costs < 1e-3  # the agent's modules priced; the backbone dominates


def test_frameglimpse_glimpses_from_the_first_frame_and_averages_what_it_emits():
    method = build("frameglimpse")  # 6 glimpses, output=emit
    locations = torch.tensor([[1.0, 0.5, -0.3, 1.4, 0.5, 0.0], [0.2] * 6])
    output = torch.tensor([[0, 1, 0, 0, 1, 0], [0] * 6])
    forced = {"locations": locations, "output": output}
    with torch.no_grad():
        inf = method.infer(method.model, batch(), forced)
        out = method.model(method.rollout, batch(), "argmax", forced)
    assert inf.step_frame[0].tolist() == [0, 15, 8, 0, 15, 8]  # a location outside [0, 1] reads the nearest end
    assert inf.step_frame[1].tolist() == [0, 2, 2, 2, 2, 2]
    np.testing.assert_allclose(inf.gflops, [6 * method.module_costs + 3 * FLOPS[FINE],
                                            6 * method.module_costs + 2 * FLOPS[FINE]])
    probs = out["logits"].softmax(-1).numpy()
    np.testing.assert_allclose(inf.step_scores[0, 0], probs[0, 0], rtol=1e-5)  # nothing emitted yet: every glimpse
    np.testing.assert_allclose(inf.step_scores[0, 5], (probs[0, 1] + probs[0, 4]) / 2, rtol=1e-5)  # the emitted two
    np.testing.assert_allclose(inf.scores[1], probs[1].mean(0), rtol=1e-5)  # none emitted: every glimpse
    stopping = build("frameglimpse", output="stop")
    with torch.no_grad():
        inf = stopping.infer(stopping.model, batch(), {"locations": locations, "output": torch.tensor(
            [[0, 0, 1, 0, 0, 0], [0] * 6])})
    assert inf.step_frame[0].tolist() == [0, 15, 8, -1, -1, -1]  # output=stop: the third glimpse stops


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


class Utilities(torch.nn.Module):
    """A utility head that predicts the given values, one per step."""

    def __init__(self, values):
        super().__init__()
        self.values, self.step = values, 0

    def forward(self, h):
        self.step += 1
        return torch.full((len(h), 1), self.values[self.step - 1])


def test_adaframe_stops_by_adaptive_lookahead():
    """It stops once the predicted utility has fallen more than `margin` below its best so far more
    than `lookahead` times: 0.5, 0.6 (best), 0.5 (once), 0.595 (within the margin), 0.55 (twice): stop."""
    method = build("adaframe", steps=6, margin=0.01, lookahead=1)
    assert method.module_costs > 0  # priced before the head is replaced
    method.model.utility = Utilities([0.5, 0.6, 0.5, 0.595, 0.55, 0.7])
    with torch.no_grad():
        inf = method.infer(method.model, batch())
    assert (inf.step_frame >= 0).sum(1).tolist() == [5, 5]


def test_multiagent_moves_its_pointers_and_sees_its_nearby_agents():
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
    assert nearby(4, "cpu").tolist() == [[0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0, 0, 1, 0]]
    assert nearby(1, "cpu").tolist() == [[0.0]]  # alone: no context


def test_listentolook_picks_distinct_frames_after_previewing_all():
    method = build("listentolook", frames=4)
    with torch.no_grad():
        inf = method.infer(method.model, batch(length=(16, 3)))
    assert len(set(inf.step_frame[0])) == 4 and (inf.step_frame[0] >= 0).all()
    assert sorted(inf.step_frame[1][:3]) == [0, 1, 2] and inf.step_frame[1, 3] == -1  # only 3 frames to pick
    preview, step, attention, pick = method.costs
    expected = [16 * preview + 4 * (step + 16 * attention + pick + FLOPS[FINE]),
                3 * preview + 3 * (step + 3 * attention + pick + FLOPS[FINE])]
    np.testing.assert_allclose(inf.gflops, expected)
    assert (inf.actions[0] != NOT_READ).all() and (inf.actions[0] == READ).sum() == 4  # the rest: PREVIEW


def test_listentolook_trains_its_attention_softly_from_the_memorys_mean():
    """No sample is drawn: the same batch gives the same loss twice, and the attention's gradient
    reaches every previewed frame's key, not only the picked ones."""
    method = build("listentolook", frames=2)
    method.model.train()
    losses = [method.loss(method.model, batch(), 0)[0] for _ in range(2)]
    assert losses[0].item() == losses[1].item()
    losses[0].backward()
    assert method.model.keys[0].weight.grad.abs().sum() > 0 and method.model.query.weight.grad.abs().sum() > 0


def test_ocsampler_picks_k_of_its_candidates_and_its_sampling_is_a_distribution():
    method = build("ocsampler", frames=2)
    scores = torch.tensor([[0.5, 2.0, -1.0, 0.3]])
    sets = list(itertools.combinations(range(4), 2))
    p = {s: method.log_prob(scores, torch.tensor([list(s)])).exp().item() for s in sets}
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-6)  # the unordered set's probability over every set
    assert method.log_prob(scores, torch.tensor([[1, 0]])).item() == pytest.approx(
        method.log_prob(scores, torch.tensor([[0, 1]])).item())
    torch.manual_seed(0)
    drawn = method.pick(scores.expand(20000, 4), noise=True).sort(1).values.tolist()
    for s in sets:  # the draws without replacement follow it (noise: sqrt(p / 20000) < 0.005)
        assert drawn.count(list(s)) / 20000 == pytest.approx(p[s], abs=0.02)
    assert method.pick(scores, noise=False).tolist() == [[0, 1]]  # the top 2, in time order
    with torch.no_grad():
        inf = method.infer(method.model, batch(length=(16, 1)))
    assert inf.step_frame[0].tolist()[0] in (0, 2, 4, 5, 7, 8, 10, 12, 13, 15)  # 10 candidates spread over 16
    assert np.flatnonzero(inf.actions[0] != NOT_READ).tolist() == [0, 2, 4, 5, 7, 8, 10, 12, 13, 15]
    assert inf.step_frame[1].tolist() == [0, 0]  # a 1-frame video: its 10 candidates are one frame
    cheap, scorer, video, embed = method.costs
    np.testing.assert_allclose(inf.gflops, [10 * cheap + 10 * scorer + video + 2 * (embed + FLOPS[FINE]),
                                            cheap + 10 * scorer + video + 2 * embed + FLOPS[FINE]])


def test_ocsampler_reward_needs_no_labels_and_its_baseline_is_k_uniform_candidates():
    method = build("ocsampler", frames=2, candidates=4, warmup_epochs=0)
    b = batch()
    candidates = method.candidates(b.length, 16, False)
    assert candidates.tolist() == [[2, 6, 10, 14], [1, 3, 6, 8]]
    loss, rewards = method.policy_loss(method.model, b, candidates)
    unlabelled = Batch(b.index, b.features, torch.zeros_like(b.labels), b.length)
    torch.manual_seed(0)
    _, again = method.policy_loss(method.model, unlabelled, candidates)
    torch.manual_seed(0)
    _, labelled = method.policy_loss(method.model, b, candidates)
    assert torch.equal(again[0], labelled[0]) and torch.equal(again[1], labelled[1])  # the labels play no part
    with torch.no_grad():
        uniform = method.classify(method.model, b, candidates[:, [1, 3]])[:, -1].softmax(-1).amax(-1)
    assert torch.allclose(rewards[1], uniform)  # the baseline: 2 of the 4 candidates spread uniformly


def test_frameexit_exiting_at_step_k_costs_exactly_k_frames():
    assert coarse_to_fine(8) == (3, 0, 7, 1, 5, 2, 4, 6)  # middle, first, last, then ever finer midpoints
    assert all(sorted(coarse_to_fine(n)) == list(range(n)) for n in range(1, 60))
    official = [8, 0, 15, 4, 12, 7, 10, 5, 13, 2]  # 10 of 16 frames spread uniformly, in the official code's order
    for order, first, second in (("official", official, [5, 0, 9, 2, 7, 4, 6, 3, 8, 1]),
                                 ("coarse-to-fine", list(coarse_to_fine(16)), list(coarse_to_fine(10)))):
        method = build("frameexit", first_threshold=1.0, **({"max_frames": 6, "order": order}
                                                             if order != "official" else {}))
        with torch.no_grad():
            for gate in method.model.gates:  # no gate fires, nor step 0's confidence: the budget stops it
                gate.bias.fill_(-1e9)
        for k in (1, 3, 6):
            with torch.no_grad():
                inf = method.infer(method.model, batch(), budget=k)
            np.testing.assert_allclose(inf.gflops, method.module_costs[:k].sum().item() + k * FLOPS[FINE])
            assert inf.step_frame[0, :k].tolist() == first[:k]
            assert np.flatnonzero(inf.actions[1] == READ).tolist() == sorted(second[:k])
            assert (inf.actions[0] == AFTER_STOP).sum() == 16 - k
    short = build("frameexit", first_threshold=1.0)
    assert len(short.model.classifiers) == 10 and len(short.model.gates) == 8  # steps 1-8 (the last always exits)
    with torch.no_grad():
        for gate in short.model.gates:
            gate.bias.fill_(-1e9)
        inf = short.infer(short.model, batch(length=(4, 10)))
    assert inf.step_frame[0].tolist() == [2, 0, 3, 1, 3, 1, 2, 1, 3, 0]  # 10 picks of 4 frames: repeats
    np.testing.assert_allclose(inf.gflops[0], short.module_costs.sum().item() + 4 * FLOPS[FINE])  # each once


def test_frameexit_step_0_exits_on_its_confidence_and_later_steps_by_their_gates():
    method = build("frameexit")
    with torch.no_grad():
        method.model.classifiers[0].bias.copy_(torch.tensor([30.0, 0.0, 0.0]))  # softmax 1.0 > 0.99 on any frame
        inf = method.infer(method.model, batch())
    assert inf.step_frame[:, 1].tolist() == [-1, -1]
    np.testing.assert_allclose(inf.gflops, method.module_costs[0].item() + FLOPS[FINE])
    with torch.no_grad():
        method.model.classifiers[0].bias.zero_()
        for s, gate in enumerate(method.model.gates, 1):
            gate.bias.fill_(1e9 if s == 3 else -1e9)  # only step 3's gate fires
        inf = method.infer(method.model, batch())
    assert (inf.step_frame >= 0).sum(1).tolist() == [4, 4]


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
    mean = 0.95
    with torch.no_grad():  # FrameGlimpse's mean is the head's output; AdaFrame's its sigmoid
        method.model.location.weight.zero_()
        method.model.location.bias.fill_(mean if name == "frameglimpse" else float(np.log(mean / (1 - mean))))
    torch.manual_seed(0)
    n = 4000
    many = Batch(np.arange(n), {FINE: torch.randn(n, 16, DIMS[FINE]), COARSE: torch.randn(n, 16, DIMS[COARSE])},
                 torch.eye(C)[torch.arange(n) % C], torch.full((n,), 16))
    out = method.model(method.rollout, many, "sample")
    slope = 1.0 if name == "frameglimpse" else mean * (1 - mean)
    score = torch.autograd.grad(out["log_prob"][:, 0].mean(), method.model.location.bias)[0] / slope
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
