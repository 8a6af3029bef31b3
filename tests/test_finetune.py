"""finetune-backbone: a tiny real run, resume after SIGKILL, the weights in extract-features, bad input (torchrun:
tests/test_devices.py)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from conftest import ROOT, hang_decoding, run_cli
from extract.cache import Cache
from extract.finetune import segment_indices

BACKBONE = "efficientnet_lite0@84"  # the one ImageNet backbone available offline, at its cheapest
FAST = ("--set", "segments=4", "--batch-size", "4", "--workers", "0", "--no-progress")


def finetune(root, out, *extra, check=True, env=None):
    return run_cli("extract.finetune", "--dataset", "list", "--video-root", str(root), "--backbone", BACKBONE,
                   "--out", str(out), *FAST, *extra, check=check, env=env)


def test_segment_indices_random_offsets_stay_in_their_segments():
    rng = np.random.default_rng(0)
    for n, k in ((100, 16), (7, 16), (16, 16)):
        for _ in range(20):
            idx = segment_indices(n, k, rng)
            edges = np.floor(np.arange(k + 1) * n / k).astype(int)
            assert len(idx) == k and (idx >= 0).all() and (idx < n).all()
            assert ((idx >= edges[:-1]) & ((idx < np.maximum(edges[1:], edges[:-1] + 1)))).all()
    assert segment_indices(100, 4).tolist() == [12, 37, 62, 87]  # validation: the centres, as extraction


def test_one_epoch_writes_a_backbone_that_extract_features_loads(two_classes, tmp_path):
    out = tmp_path / "w" / "ft.pt"
    proc = finetune(two_classes, out, "--epochs", "1")
    assert "best validation mAP" in proc.stdout and "epoch 0" in proc.stderr
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("_fc.") for k in state)  # the classifier is stripped
    assert (tmp_path / "w" / "ft.pt.log.csv").read_text().startswith("epoch,lr,loss,val_mAP")
    caches = {}
    for weights in ("imagenet", str(out)):
        cache = tmp_path / f"{len(caches)}.h5"
        run_cli("extract.cli", "--dataset", "list", "--video-root", str(two_classes), "--num-frames", "2", "--out",
                str(cache), "--backbone", BACKBONE, "--weights", weights, "--workers", "0", "--no-progress")
        with Cache(cache) as c:
            caches[weights] = c.features(BACKBONE)[:].astype(np.float32)
            if weights != "imagenet":
                assert "sha256=" in c.weights[BACKBONE]
    assert np.abs(caches["imagenet"] - caches[str(out)]).max() > 1e-2  # the finetuned weights changed the features


def test_weights_finetuned_picks_the_default_output(two_classes, tmp_path):
    run_cli("extract.finetune", "--dataset", "list", "--video-root", str(two_classes), "--backbone", BACKBONE,
            "--epochs", "1", *FAST, cwd=tmp_path)
    assert (tmp_path / "data" / "weights" / f"list_{BACKBONE}.pt").is_file()
    args = ("extract.cli", "--dataset", "list", "--video-root", str(two_classes), "--num-frames", "2",
            "--workers", "0", "--no-progress", "--weights", "finetuned")
    run_cli(*args, "--backbone", BACKBONE, "--out", str(tmp_path / "c.h5"), cwd=tmp_path)
    missing = run_cli(*args, "--backbone", "efficientnet_lite0@112", "--out", str(tmp_path / "d.h5"), cwd=tmp_path,
                      check=False)
    assert missing.returncode != 0 and "finetune-backbone --dataset list --backbone efficientnet_lite0@112" in \
        missing.stderr and "Traceback" not in missing.stderr


def test_resume_after_sigkill_ends_with_the_same_weights(two_classes, tmp_path):
    plain = tmp_path / "plain" / "ft.pt"
    finetune(two_classes, plain, "--epochs", "2")
    killed = tmp_path / "killed" / "ft.pt"
    killed.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "extract.finetune", "--dataset", "list", "--video-root",
                             str(two_classes), "--backbone", BACKBONE, "--out", str(killed), "--epochs", "2", *FAST],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(f"{killed}.log.csv"):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(f"{killed}.last.pt", weights_only=True)
    assert state["epoch"] == 0
    finetune(two_classes, killed, "--epochs", "2", "--resume")
    a = torch.load(f"{plain}.last.pt", weights_only=True)["model"]
    b = torch.load(f"{killed}.last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_gets_one_line_and_the_run_goes_on(two_classes, tmp_path):
    (two_classes / "val" / "green_square").mkdir()  # a class with no training video
    shutil.copy(two_classes / "val" / "red_disc" / "red_disc_001.mp4", two_classes / "val" / "green_square" / "g.mp4")
    (two_classes / "train" / "red_disc" / "broken.mp4").write_bytes(b"not a video at all" * 100)
    proc = finetune(two_classes, tmp_path / "bad.pt", "--epochs", "1")
    assert "1 class(es) have no training video (green_square)" in proc.stderr
    assert "failed (skipped): train/red_disc/broken.mp4: cannot open video stream" in proc.stderr
    assert (tmp_path / "bad.pt").is_file() and "Traceback" not in proc.stderr
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, other)  # another architecture's weights
    wrong = run_cli("extract.cli", "--dataset", "list", "--video-root", str(two_classes), "--num-frames", "2",
                    "--out", str(tmp_path / "x.h5"), "--backbone", BACKBONE, "--weights", str(other), check=False)
    assert wrong.returncode != 0 and "do not fit" in wrong.stderr and len(wrong.stderr.strip().splitlines()) <= 3


def test_a_decoder_that_hangs_is_stopped_and_finetuning_goes_on(two_classes, tmp_path, monkeypatch):
    """Clips are decoded in worker processes under the decoding time limit: a training video whose
    decoder hangs (deaf to SIGTERM, as native code is) is skipped as timed out, and the epoch ends."""
    from extract import finetune as module

    hang_decoding(monkeypatch, module, "read_resized", "train/blue_disc/blue_disc_000.mp4")
    cfg = module.FinetuneConfig(dataset="list", backbone=BACKBONE, out=str(tmp_path / "b.pt"),
                                video_root=str(two_classes), segments=4, epochs=1, batch_size=4, workers=1,
                                device="cpu")
    result = module.finetune(cfg, progress=False)
    assert list(result["failed"]) == ["train/blue_disc/blue_disc_000.mp4"]
    assert result["failed"]["train/blue_disc/blue_disc_000.mp4"].startswith("decoding took longer than 3 s")
    assert (tmp_path / "b.pt").is_file()
