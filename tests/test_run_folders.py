"""A run folder is either finished and consistent or visibly unfinished: no re-run, sweep, resume,
second writer, NaN or damaged file makes one that reads as finished with numbers it does not hold."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT
from eval.cli import main as evaluate
from eval.runs import find_runs
from extract.locks import Busy, exclusive
from extract.training import Diverged, Loop, fit
from policy.cli import main as train_policy
from policy.data import CacheError
from policy.methods import METHODS
from policy.run_folder import RunError, RunFolder
from policy.train import train


def config(method, cache, out, **kw):
    base = dict(method=method, features=cache, out=str(out), epochs=1, batch_size=4, lr=1e-3, hidden=16,
                hidden_coarse=16, hidden_fine=16)
    fields = METHODS[method].Config.__dataclass_fields__
    return METHODS[method].Config(**{k: v for k, v in {**base, **kw}.items() if k in fields})


@pytest.fixture(scope="module")
def finished(demo_cache, tmp_path_factory):
    """A finished UNIFORM run, copied by the tests that change it."""
    run = tmp_path_factory.mktemp("runs") / "uniform"
    train(config("uniform", demo_cache, run), progress=False)
    return run


def copy_run(finished, tmp_path, name="run"):
    shutil.copytree(finished, tmp_path / name)
    return tmp_path / name


def test_a_finished_run_is_replaced_only_with_force(finished, demo_cache, tmp_path):
    run = copy_run(finished, tmp_path)
    before = json.loads((run / "metrics.json").read_text())
    with pytest.raises(RunError, match="holds a finished run: --force replaces it, --out writes another folder"):
        train(config("uniform", demo_cache, run, seed=1), progress=False)
    assert json.loads((run / "metrics.json").read_text()) == before  # nothing of it was touched
    train(config("uniform", demo_cache, run, seed=1), force=True, progress=False)
    replaced = RunFolder.load(str(run))
    assert replaced.config["run_id"] != before["run_id"] and replaced.config["seed"] == 1


def test_a_failed_rerun_leaves_a_visibly_unfinished_folder_that_evaluate_skips(finished, demo_cache, tmp_path,
                                                                                 monkeypatch):
    run = copy_run(finished, tmp_path)
    copy_run(finished, tmp_path, "other")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C, a kill or a full disk in the middle of training

    monkeypatch.setattr("policy.train.fit", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config("uniform", demo_cache, run, lr=0.5), force=True, progress=False)
    assert json.loads((run / "config.json").read_text())["lr"] == 0.5
    assert not (run / "metrics.json").exists() and not (run / "predictions.h5").exists()
    assert not (run / "model.pt").exists()  # the old run's model does not pass for the new one's
    with pytest.raises(RunError, match="unfinished run"):
        RunFolder.load(str(run))
    lines = []
    assert [r.path for r in find_runs([str(tmp_path)], skipped=lines.append)] == [str(tmp_path / "other")]
    assert len(lines) == 1 and lines[0].startswith(f"skipped {run}: {run} is an unfinished run")


def test_files_of_two_runs_are_refused_as_mixed(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "run_id": "another"}))
    with pytest.raises(RunError, match="mixes files of different runs"):
        RunFolder.load(str(run))


def test_a_second_writer_is_refused_while_the_first_lives(finished, demo_cache, tmp_path):
    run = copy_run(finished, tmp_path)
    before = sorted(os.listdir(run))
    with exclusive(str(run / ".lock"), str(run)):  # as a live train-policy holds it
        with pytest.raises(Busy, match=rf"{run} is being written by pid {os.getpid()} on .*: wait for it"):
            train(config("uniform", demo_cache, run), force=True, progress=False)
    assert sorted(os.listdir(run)) == before


def test_the_default_folder_names_every_option_that_changes_the_result(demo_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--method", "uniform", "--features", demo_cache, "--epochs", "1", "--no-progress"]
    for extra in ([], ["--seed", "1"], ["--lr", "0.01"], ["--batch-size", "8"]):
        result = CliRunner().invoke(train_policy, common + extra)
        assert result.exit_code == 0, result.output
    stem = os.path.join("data", "runs", "demo_t8")
    assert sorted(os.listdir(stem)) == ["uniform_epochs=1", "uniform_epochs=1_batch_size=8", "uniform_epochs=1_lr=0.01",
                                        "uniform_epochs=1_seed=1"]
    again = CliRunner().invoke(train_policy, common)
    assert again.exit_code == 1 and "holds a finished run: --force replaces it" in again.output


def test_resume_with_other_settings_is_refused_and_lists_them(demo_cache, tmp_path):
    run = tmp_path / "le"
    train(config("liteeval", demo_cache, run, gamma=0.2), progress=False)
    with pytest.raises(RunError, match=r"other settings \(gamma=0.2 there, 0.9 here; lam=2.0 there, 4.0 here\)"):
        train(config("liteeval", demo_cache, run, gamma=0.9, lam=4.0, epochs=2), resume=True, progress=False)
    assert RunFolder.load(str(run)).config["gamma"] == 0.2  # the finished run is kept
    longer = train(config("liteeval", demo_cache, run, gamma=0.2, epochs=2), resume=True, progress=False)
    assert RunFolder.load(str(run)).metrics == longer and longer["best_epoch"] in (0, 1)


@pytest.mark.parametrize("streamed", [False, True])
def test_non_finite_features_are_refused_on_loading(demo_cache, tmp_path, streamed):
    cache = tmp_path / "nan.h5"
    shutil.copy(demo_cache, cache)
    with h5py.File(cache, "r+") as f:
        ids = [v.decode() for v in f["videos/id"][:]]
        row = int(np.flatnonzero(f["videos/split"][:] == b"train")[3])
        f["features/efficientnet_lite0@224"][row, 1, :13] = np.nan
    budget = {"memory_budget_gb": 1e-6} if streamed else {}
    with pytest.raises(CacheError, match=f"features of video {ids[row]} hold NaN or inf"):
        train(config("uniform", str(cache), tmp_path / "run", **budget), progress=False)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_loss_that_turns_non_finite_stops_training_before_anything_of_it_is_saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    loop = Loop(epochs=3, seed=0, best=str(tmp_path / "best.pt"), last=str(tmp_path / "last.pt"),
                log=str(tmp_path / "log.csv"), progress=False)

    def step(model, batch, epoch):
        loss = model(batch).pow(2).mean()
        return (loss * float("nan") if epoch == 1 else loss), {}

    from extract.distributed import Dist
    with pytest.raises(Diverged, match="the loss turned non-finite .* in epoch 1"):
        fit(loop, model, torch.optim.SGD(model.parameters(), lr=0.1), info=Dist(), device=torch.device("cpu"),
            batches=lambda epoch: [torch.ones(4, 3)], step=step, validate=lambda epoch, row: {"val_mAP": 0.5},
            keep=lambda epoch, score: {"epoch": epoch})
    assert torch.load(loop.last, weights_only=True)["epoch"] == 0


def test_all_zero_labels_are_refused_before_training(demo_cache, tmp_path):
    cache = tmp_path / "zero.h5"
    shutil.copy(demo_cache, cache)
    with h5py.File(cache, "r+") as f:
        f["videos/labels"][...] = 0
    with pytest.raises(CacheError, match="no train video has a label"):
        train(config("uniform", str(cache), tmp_path / "run"), progress=False)


def test_a_truncated_cache_is_one_line(demo_cache, tmp_path):
    cache = tmp_path / "cut.h5"
    cache.write_bytes(open(demo_cache, "rb").read()[:5000])
    result = CliRunner().invoke(train_policy, ["--method", "uniform", "--features", str(cache),
                                               "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "is not a readable feature cache" in result.output
    assert "Traceback" not in result.output


def damage(run, how):
    if how == "config not JSON":
        (run / "config.json").write_text('{"method": "uniform", ')
    elif how == "config a list":
        (run / "config.json").write_text("[1, 2]")
    elif how == "config without method":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "method"}))
    elif how == "config lacks a field":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "normalise"}))
    elif how == "config out of range":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "batch_size": 10 ** 9}))
    elif how == "scores of wrong shape":
        with h5py.File(run / "predictions.h5", "r+") as f:
            scores = f["scores"][:]
            del f["scores"]
            f["scores"] = scores[:, :3]
    elif how == "NaN scores":
        with h5py.File(run / "predictions.h5", "r+") as f:
            f["scores"][2, 1] = np.nan
    elif how == "predictions truncated":
        data = (run / "predictions.h5").read_bytes()
        (run / "predictions.h5").write_bytes(data[:len(data) // 3])


DAMAGES = {"config not JSON": "is not JSON", "config a list": "holds a JSON list, not an object",
           "config without method": "names no method", "config out of range": "batch_size=1000000000",
           "config lacks a field": "lacks normalise",
           "scores of wrong shape": r"has /scores of shape \(10, 3\)",
           "NaN scores": "1 of 10 videos have non-finite scores", "predictions truncated": "is damaged"}


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_a_damaged_run_is_skipped_by_evaluate_with_one_line(finished, tmp_path, how):
    copy_run(finished, tmp_path, "good")
    damage(copy_run(finished, tmp_path, "bad"), how)
    result = CliRunner().invoke(evaluate, ["--report", "table1", "--runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    skipped = result.stderr.strip().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {tmp_path / 'bad'}")
    assert __import__("re").search(DAMAGES[how], skipped[0]), skipped[0]
    assert result.stdout.count("UNIFORM") == 1 and "nan" not in result.stdout.lower()


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temporary_file(tmp_path):
    script = ("import resource, signal, torch\n"
              "from extract.training import save_atomic\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
              f"save_atomic({{'w': torch.zeros(1 << 20)}}, {str(tmp_path / 'model.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1
    assert f"DiskFull: writing {tmp_path / 'model.pt'} failed (file too large;" in proc.stderr
    assert os.listdir(tmp_path) == []
