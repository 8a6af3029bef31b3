"""Every registered method trains under ``torchrun`` (2 CPU processes, gloo), and a killed
distributed run resumes to the same numbers (every rank's generators are checkpointed)."""
import json
import os

import pytest
import torch

from conftest import ROOT, killed_after_first_epoch, run_cli
from extract.training import rng_state, set_rng_state
from policy.methods import METHODS

SMALL = {"hidden": 16, "hidden_coarse": 16, "hidden_fine": 32, "warmup_epochs": 1, "joint_epochs": 1,
         "finetune_epochs": 1}
ENV = {"OMP_NUM_THREADS": "1"}


def torchrun(*args, **kwargs):
    return run_cli("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "policy.cli", *args,
                   env=ENV, **kwargs)


def small(method):
    """``--set`` pairs that make ``method`` quick, for whichever of these fields its config has."""
    fields = METHODS[method].Config.__dataclass_fields__
    return [arg for key, value in SMALL.items() if key in fields for arg in ("--set", f"{key}={value}")]


def test_every_method_trains_under_torchrun_streaming_its_share(demo_cache, tmp_path):
    """One launch of 2 ranks trains every method (tests/every_method_under_torchrun.py): 9 training
    videos in batches of 3 give shares of 2 and 1, and a last batch of one video; each method's
    feature budget per node holds one copy, not two, so the ranks stream."""
    proc = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(ROOT, "tests", "every_method_under_torchrun.py"), demo_cache, str(tmp_path),
                   env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in METHODS:
        metrics = json.load(open(tmp_path / method / "metrics.json"))
        assert metrics["videos"] == 10 and 0 <= metrics["mAP"] <= 1, method
        assert json.load(open(tmp_path / method / "config.json"))["features_in_memory"] is False, method


def test_killed_distributed_run_resumes_to_the_same_numbers(demo_cache, tmp_path):
    args = ["--method", "liteeval", "--features", demo_cache, "--epochs", "4", "--batch-size", "3", "--no-progress",
            *small("liteeval")]
    assert torchrun(*args, "--out", str(tmp_path / "full")).stdout.count("mAP") == 1  # only rank 0 reports
    run = tmp_path / "killed"
    killed_after_first_epoch(["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "policy.cli",
                              *args], run, ENV)
    state = torch.load(run / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2  # one state per rank: the ranks drew different amounts of noise
    torchrun(*args, "--out", str(run), "--resume")
    resumed, full = (json.load(open(r / "metrics.json")) for r in (run, tmp_path / "full"))
    assert resumed.pop("run_id") != full.pop("run_id") and resumed == full


def test_the_cuda_generator_is_saved_and_restored(monkeypatch):
    """Without a GPU: the checkpointed state holds the CUDA generator and restores it to that device."""
    saved, restored = torch.tensor([7], dtype=torch.uint8), {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update(state=state, device=device))
    device = torch.device("cuda", 0)
    state = rng_state(device)
    assert torch.equal(state["cuda"], saved) and torch.equal(state["cpu"], torch.get_rng_state())
    set_rng_state(state, device)
    assert torch.equal(restored["state"], saved) and restored["device"] == device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_killed_run_on_cuda_resumes_to_the_same_numbers(demo_cache, tmp_path):
    args = ["policy.cli", "--method", "liteeval", "--features", demo_cache, "--device", "cuda", "--epochs", "4",
            "--batch-size", "2", "--no-progress", *small("liteeval")]
    run_cli(*args, "--out", str(tmp_path / "full"))
    run = tmp_path / "killed"
    killed_after_first_epoch(args, run, ENV)
    assert "cuda" in torch.load(run / "last.pt", weights_only=True)["rng"][0]
    run_cli(*args, "--out", str(run), "--resume")
    resumed, full = (json.load(open(r / "metrics.json")) for r in (run, tmp_path / "full"))
    assert resumed.pop("run_id") != full.pop("run_id") and resumed == full
