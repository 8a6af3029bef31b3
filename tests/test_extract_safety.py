"""extract-features never leaves a cache that looks right and is not: it follows edited annotations,
refuses a second writer, survives a dying decoder process, a full disk and non-finite features."""
import os
import signal
import time

import numpy as np
import pytest

from conftest import hang_decoding, run_cli
from extract import cache as cache_module
from extract import pipeline
from extract.atomic import DiskFull
from extract.cache import Cache
from extract.locks import Busy, exclusive
from extract.pipeline import ExtractConfig, run_extraction
from extract.sampling import Sampling


def config(root, out, **kwargs) -> ExtractConfig:
    lists = [os.path.join(root, "train.txt"), os.path.join(root, "test.txt")]
    kwargs = {"backbones": ["mobilenetv2@112"], "workers": 0, **kwargs}
    return ExtractConfig(dataset="demo", annotations=lists, video_root=root, classes=os.path.join(root, "classes.txt"),
                         sampling=Sampling(num_frames=2), out=str(out), weights="none", progress=False, **kwargs)


def snapshot(path):
    with Cache(str(path)) as c:
        return {"ids": c.ids, "labels": c.labels.copy(), "split": c.split.tolist(),
                "features": c.features("mobilenetv2@112")[:]}


def test_edited_annotations_are_followed_and_unchanged_features_reused(demo_copy, tmp_path):
    out = tmp_path / "c.h5"
    run_extraction(config(demo_copy, out))
    before = snapshot(out)
    test_list = os.path.join(demo_copy, "test.txt")
    lines = open(test_list).read().splitlines()
    relabel = lines[0].split()[0]
    dropped = [line.split()[0] for line in lines[1:3]]
    lines = [f"{relabel} 9"] + lines[3:]  # one relabelled, two dropped
    with open(test_list, "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = run_extraction(config(demo_copy, out))
    assert summary.processed == 0 and summary.changes == "2 dropped, 1 relabelled"
    after = snapshot(out)
    assert after["ids"] == [i for i in before["ids"] if i not in dropped]
    row = after["ids"].index(relabel)
    assert np.flatnonzero(after["labels"][row]).tolist() == [9]
    keep = [before["ids"].index(i) for i in after["ids"]]
    np.testing.assert_array_equal(after["features"], before["features"][keep])  # reused, not recomputed
    assert run_extraction(config(demo_copy, out)).changes == ""  # now current: left as it is


def test_a_second_writer_is_refused_while_the_first_lives(demo_root, tmp_path):
    out = tmp_path / "c.h5"
    with exclusive(str(out) + ".lock", str(out)):  # this test process is "the first run"
        proc = run_cli("extract.cli", "--dataset", "demo", "--video-root", demo_root, "--num-frames", "2",
                       "--weights", "none", "--out", str(out), "--no-progress", check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == (
            f"Error: {out} is being written by pid {os.getpid()} on {os.uname().nodename}: wait for that run to "
            "finish, or pass another --out")
        assert not out.exists() and not os.path.exists(str(out) + ".parts")
        with pytest.raises(Busy):
            with exclusive(str(out) + ".lock", str(out)):
                pass


def test_a_killed_decoder_process_fails_its_video_only(demo_root, tmp_path, monkeypatch):
    real = pipeline.read_frames

    def deadly(path, *args):
        if path.endswith("blue_disc_000.mp4"):
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a decoder's segfault would
        return real(path, *args)

    monkeypatch.setattr(pipeline, "read_frames", deadly)  # the workers are forked from this process
    out = tmp_path / "c.h5"
    summary = run_extraction(config(demo_root, out, workers=2))
    assert summary.new_failures == [("videos/blue_disc_000.mp4", "the decoding process died on this video "
                                     "(killed: out of memory, or crashed)")]
    with Cache(str(out)) as c:
        assert len(c.ids) == 19 and "videos/blue_disc_000.mp4" in c.failed


def test_a_decoder_that_hangs_is_stopped_at_the_time_limit_and_the_run_goes_on(demo_root, tmp_path, monkeypatch):
    """A decoder looping forever in native code (as decord on a header that over-reports frames) stalled
    its worker, and so the run, forever: past the video's limit its processes are stopped (terminated:
    a hung decoder answers no request), the video is listed as timed out, new processes do the rest."""
    hang_decoding(monkeypatch, pipeline, "read_frames", "blue_disc_000.mp4")  # the workers are forked from here
    out = tmp_path / "c.h5"
    start = time.monotonic()
    summary = run_extraction(config(demo_root, out, workers=2))
    assert time.monotonic() - start < 120
    assert [(v, reason.split(":")[0]) for v, reason in summary.new_failures] == [
        ("videos/blue_disc_000.mp4", "decoding took longer than 3 s (60 s + 1 s per MB of file)")]
    with Cache(str(out)) as c:
        assert len(c.ids) == 19
        assert "decoding took longer than 3 s" in c.failed["videos/blue_disc_000.mp4"]


def test_non_finite_features_are_never_cached(demo_root, tmp_path, monkeypatch):
    real = pipeline.compute_features

    def overflowing(backbones, crops, *args):
        out = real(backbones, crops, *args)
        return {k: np.where(np.arange(len(v))[:, None] == 0, np.float16(np.inf), v) for k, v in out.items()}

    monkeypatch.setattr(pipeline, "compute_features", overflowing)  # the first frame of every batch overflows
    out = tmp_path / "c.h5"
    cfg = config(demo_root, out, batch_size=4)  # 2 frames per video: every other video holds an infinity
    summary = run_extraction(cfg)
    assert len(summary.new_failures) == 10
    assert all("non-finite features from mobilenetv2@112" in reason for _, reason in summary.new_failures)
    with Cache(str(out)) as c:
        assert len(c.ids) == 10 and np.isfinite(c.features("mobilenetv2@112")[:]).all()


def test_a_full_disk_keeps_the_old_cache_and_the_chunks(demo_root, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    run_extraction(config(demo_root, out))
    before = snapshot(out)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1 << 20}))
    with pytest.raises(DiskFull, match=r"needs about 0\.\d\d GiB, 0\.00 GiB free there: free some space"):
        run_extraction(config(demo_root, out, backbones=["mobilenetv2@112", "resnet18@84"]))
    np.testing.assert_array_equal(snapshot(out)["features"], before["features"])
    assert os.listdir(str(out) + ".parts") and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_leftover_temporary_files_are_swept_on_the_next_start(demo_root, tmp_path):
    out = tmp_path / "c.h5"
    os.makedirs(str(out) + ".parts")
    leftovers = [f"{out}.4242.tmp", os.path.join(str(out) + ".parts", "1-r0-1.h5.4242.tmp")]
    for path in leftovers:
        open(path, "wb").write(b"x" * 100)
    run_extraction(config(demo_root, out))
    assert not any(os.path.exists(p) for p in leftovers)


def test_option_gaps_get_one_line(demo_root, tmp_path):
    base = ("extract.cli", "--dataset", "demo", "--video-root", demo_root, "--num-frames", "2", "--weights", "none",
            "--no-progress")
    folder = run_cli(*base, "--out", str(tmp_path), check=False)
    assert folder.returncode == 2 and f"--out {tmp_path} is a folder" in folder.stderr
    cuda = run_cli(*base, "--out", str(tmp_path / "c.h5"), "--device", "cuda", check=False)
    assert cuda.returncode == 1 and "Traceback" not in cuda.stderr
    assert cuda.stderr.strip().splitlines()[-1].startswith("Error: --device cuda: torch sees no CUDA device")


def test_train_policy_never_picks_an_empty_cache_as_the_newest(tmp_path, monkeypatch):
    from extract.cache import write_cache
    from extract.flops import FlopsEntry
    from policy.cli import default_cache

    folder = tmp_path / "data" / "features"
    folder.mkdir(parents=True)
    entry = FlopsEntry("m@84", 84, 0.1, 10, 3)
    for age, (name, n) in enumerate((("full.h5", 1), ("empty.h5", 0))):  # the empty one (all failed) is newer
        write_cache(str(folder / name), dataset="demo", sampling={}, classes=["a"], ids=[f"v{i}" for i in range(n)],
                    splits=["train"] * n, labels=np.ones((n, 1)), length=np.full(n, 2),
                    frame_index=np.zeros((n, 2)), flops=[entry], features={"m@84": np.zeros((n, 2, 3))})
        os.utime(folder / name, (1e9 + age, 1e9 + age))
    monkeypatch.chdir(tmp_path)
    assert default_cache() == os.path.join("data", "features", "full.h5")


def test_the_cache_records_its_decoder_and_never_mixes_two(demo_root, tmp_path):
    """PyAV's frames are decord's (same features); the cache says which decoder read them, a run with
    another decoder into it is refused, ``auto`` keeps the cache's, and a cache made before decoders were
    recorded counts as decord's."""
    out = tmp_path / "c.h5"
    run_extraction(config(demo_root, out, decoder="pyav"))
    with Cache(str(out)) as c:
        assert c.decoder == "pyav" and c.preprocessing["decoder"].startswith("pyav ")
        by_pyav = c.features("mobilenetv2@112")[:]
    with pytest.raises(cache_module.CacheMismatch, match=r"holds preprocessing .*pyav .*not .*decord .*pass another"):
        run_extraction(config(demo_root, out, decoder="decord"))
    assert run_extraction(config(demo_root, out, decoder="auto")).processed == 0  # auto: the cache's decoder
    other = tmp_path / "d.h5"
    run_extraction(config(demo_root, other, decoder="decord"))
    with Cache(str(other)) as c:
        assert c.decoder == "decord"
        np.testing.assert_array_equal(c.features("mobilenetv2@112")[:], by_pyav)
    import json

    import h5py
    with h5py.File(other, "a") as f:  # as written before the decoder was recorded
        f.attrs["preprocessing"] = json.dumps({k: v for k, v in json.loads(f.attrs["preprocessing"]).items()
                                               if k != "decoder"})
    with Cache(str(other)) as c:
        assert c.decoder == "decord"
    assert run_extraction(config(demo_root, other)).processed == 0  # accepted: nothing to redo
