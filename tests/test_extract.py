"""extract-features end to end on the real (tiny) demo videos: schema, features, resume, bad files, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import decord
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from conftest import ROOT, run_cli
from extract.backbones import create_backbone
from extract.decode import read_frames
from extract.sampling import Sampling

BACKBONES = ["--backbone", "mobilenetv2@112", "--backbone", "resnet18@84"]


def extract(root, out, *extra, check=True, **kwargs):
    return run_cli("extract.cli", "--dataset", "demo", "--video-root", root, "--weights", "none",
                   "--num-frames", "4", "--out", str(out), "--no-progress", *extra, check=check, **kwargs)


def read(path):
    """Everything in a cache as plain Python/numpy values."""
    with h5py.File(path, "r") as f:
        return {
            "ids": [i.decode() for i in f["videos/id"][:]],
            "frame_index": f["videos/frame_index"][:],
            "length": f["videos/length"][:],
            "labels": f["videos/labels"][:],
            "features": {k: f["features"][k][:] for k in f["features"]},
            "failed": {r["id"].decode(): r["reason"].decode() for r in f["failed"][:]},
        }


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    """One uninterrupted single-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    proc = extract(demo_root, out, *BACKBONES, "--workers", "1")
    return out, proc


def test_cache_schema(reference, demo_root):
    out, proc = reference
    assert "20 videos cached" in proc.stdout
    with h5py.File(out, "r") as f:
        assert [c.decode() for c in f["classes"][:]][:2] == ["red_disc", "green_square"]
        assert f["videos/labels"].shape == (20, 10) and f["videos/labels"].dtype == np.uint8
        assert f["videos/length"][:].tolist() == [4] * 20
        assert f["videos/frame_index"][0].tolist() == Sampling(num_frames=4).indices(24, 12.0).tolist()
        assert f["features/mobilenetv2@112"].shape == (20, 4, 1280)
        assert f["features/resnet18@84"].dtype == np.float16
        flops = {r["name"].decode(): r for r in f["flops"][:]}
        assert set(flops) == {"mobilenetv2@112", "resnet18@84"} and flops["resnet18@84"]["dim"] == 512
        assert flops["mobilenetv2@112"]["resolution"] == 112 and 0.07 < flops["mobilenetv2@112"]["gflops"] < 0.09
        assert json.loads(f.attrs["sampling"])["num_frames"] == 4 and f.attrs["dataset"] == "demo"
        assert "none" in json.loads(f.attrs["weights"])["resnet18@84"]
        assert f["failed"].shape == (0,)
        splits = [s.decode() for s in f["videos/split"][:]]
    lists = {line.split()[0]: int(line.split()[1]) for name in ("train", "test")
             for line in open(os.path.join(demo_root, f"{name}.txt"))}
    data = read(out)
    assert data["ids"] == sorted(lists, key=list(lists).index) and set(splits) == {"train", "test"}
    assert [int(np.flatnonzero(row)[0]) for row in data["labels"]] == [lists[i] for i in data["ids"]]


def test_features_equal_a_plain_reference_computation(reference, demo_root):
    """Decode the cached frame indices with decord, preprocess by hand, run the same weights."""
    data = read(reference[0])
    for row in (0, 13):
        reader = decord.VideoReader(os.path.join(demo_root, data["ids"][row]))
        frames = torch.from_numpy(reader.get_batch(data["frame_index"][row].tolist()).asnumpy()).permute(0, 3, 1, 2)
        crops = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(frames)).float() / 255
        for name, res in (("mobilenetv2@112", 112), ("resnet18@84", 84)):
            x = F.interpolate(crops, size=(res, res), mode="bilinear", antialias=True)
            x = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(x)
            with torch.no_grad():
                expected = create_backbone(name, weights="none").module(x).numpy()
            np.testing.assert_allclose(data["features"][name][row].astype(np.float32), expected, rtol=2e-2, atol=2e-2)


def test_rerun_skips_and_new_backbone_is_added_without_recomputing(reference, demo_copy, tmp_path):
    out = tmp_path / "grow.h5"
    extract(demo_copy, out, "--backbone", "mobilenetv2@112")
    first = read(out)
    again = extract(demo_copy, out, "--backbone", "mobilenetv2@112")
    assert "0 processed" in again.stdout
    grown = extract(demo_copy, out, "--backbone", "resnet18@84")
    assert "20 processed" in grown.stdout and "with resnet18@84" in grown.stdout
    data = read(out)
    assert np.array_equal(data["features"]["mobilenetv2@112"], first["features"]["mobilenetv2@112"])
    np.testing.assert_allclose(data["features"]["resnet18@84"], read(reference[0])["features"]["resnet18@84"],
                               atol=1e-3)
    other = extract(demo_copy, out, "--backbone", "resnet18@84", "--num-frames", "8", "--out", str(out), check=False)
    assert other.returncode != 0 and "holds sampling" in other.stderr and "another --out" in other.stderr


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(reference, demo_root, tmp_path):
    """Killed with SIGKILL at several random moments, resumed each time: same cache, nothing lost or doubled."""
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "extract.cli", "--dataset", "demo", "--video-root", demo_root, "--weights", "none",
           "--num-frames", "4", "--out", str(out), "--no-progress", "--workers", "0", "--chunk-videos", "1",
           "--batch-size", "4", *BACKBONES]
    rng = np.random.default_rng(7)
    for delay in rng.uniform(2.5, 6.0, size=3):  # start-up takes ~2.5 s: every kill lands mid-run or in assembly
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(out):
            with h5py.File(out, "r") as f:  # the cache opens after every kill
                assert f.attrs["dataset"] == "demo" and len(set(f["videos/id"][:])) == len(f["videos/id"])
    parts = str(out) + ".parts"
    journalled = len(os.listdir(parts)) if os.path.isdir(parts) else 0
    resumed = extract(demo_root, out, *BACKBONES, "--workers", "0")
    processed = int(resumed.stdout.split(" processed")[0].rsplit(" ", 1)[1])
    assert journalled == 0 or processed < 20  # the journalled videos were not decoded again
    data, ref = read(out), read(reference[0])
    assert data["ids"] == ref["ids"] and len(set(data["ids"])) == 20
    assert np.array_equal(data["frame_index"], ref["frame_index"])
    for name in ref["features"]:
        np.testing.assert_allclose(data["features"][name], ref["features"][name], atol=1e-3)
    assert not os.path.exists(parts)


def write_audio_only(path):
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for _ in range(20):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_bad_videos_and_annotations_are_recorded_and_the_run_goes_on(demo_copy, tmp_path):
    videos = os.path.join(demo_copy, "videos")
    open(os.path.join(videos, "empty.mp4"), "wb").close()
    with open(os.path.join(videos, "garbage.mp4"), "wb") as f:
        f.write(os.urandom(4096))
    write_audio_only(os.path.join(videos, "audio.mp4"))
    with open(os.path.join(demo_copy, "test.txt"), "a") as f:
        f.write("videos/empty.mp4 1\nvideos/garbage.mp4 2\nvideos/audio.mp4 3\n"
                "videos/red_disc_000.mp4 42\nvideos/gone.mp4 1\nonly-a-path\n")
    out = tmp_path / "bad.h5"
    proc = extract(demo_copy, out, "--backbone", "mobilenetv2@112", "--workers", "1")
    data = read(out)
    assert len(data["ids"]) == 20
    assert data["failed"]["videos/empty.mp4"] == "zero-byte file"
    assert "cannot open video stream" in data["failed"]["videos/garbage.mp4"]
    assert "cannot open video stream" in data["failed"]["videos/audio.mp4"]
    assert "label 42 is not in the class list" in " ".join(data["failed"].values())
    assert "gone.mp4 not found" in " ".join(data["failed"].values())
    assert "malformed line 'only-a-path'" in proc.stderr
    assert "6 listed in /failed" in proc.stdout
    strict = extract(demo_copy, out, "--backbone", "mobilenetv2@112", "--strict", check=False)
    assert strict.returncode == 1


def write_odd_videos(folder):
    """A one-frame video, a 4K frame and a true grayscale (gray pixel format, FFV1) video."""
    import av

    from extract.demo import write_video

    write_video(os.path.join(folder, "one_frame.mp4"), [np.full((120, 160, 3), 90, np.uint8)])
    write_video(os.path.join(folder, "uhd.mp4"), [np.random.default_rng(0).integers(0, 255, (2160, 3840, 3),
                                                                                      dtype=np.uint8)] * 2)
    with av.open(os.path.join(folder, "gray.mkv"), "w") as container:
        stream = container.add_stream("ffv1", rate=12)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "gray"
        for i in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((64, 96), 40 * i, np.uint8), format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_one_frame_4k_and_grayscale_videos_are_extracted(demo_copy, tmp_path):
    videos = os.path.join(demo_copy, "videos")
    write_odd_videos(videos)
    with open(os.path.join(demo_copy, "test.txt"), "a") as f:
        f.write("videos/one_frame.mp4 0\nvideos/uhd.mp4 1\nvideos/gray.mkv 2\n")
    out = tmp_path / "odd.h5"
    extract(demo_copy, out, "--backbone", "mobilenetv2@112", "--workers", "1")
    data = read(out)
    rows = {v: i for i, v in enumerate(data["ids"])}
    assert not data["failed"] and len(rows) == 23
    assert data["frame_index"][rows["videos/one_frame.mp4"]].tolist() == [0, 0, 0, 0]  # repeated
    assert np.isfinite(data["features"]["mobilenetv2@112"][rows["videos/uhd.mp4"]].astype(np.float32)).all()
    frames, _, _ = read_frames(os.path.join(videos, "gray.mkv"), Sampling(num_frames=3))
    brightness = frames.float().mean(dim=(1, 2, 3))
    assert torch.equal(frames[:, 0], frames[:, 1]) and torch.all(brightness[1:] > brightness[:-1])  # gray -> RGB


def test_nothing_succeeded_exits_non_zero(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    (tmp_path / "classes.txt").write_text("a\n")
    (tmp_path / "train.txt").write_text("videos/a.mp4 0\n")
    (tmp_path / "test.txt").write_text("videos/a.mp4 0\n")
    proc = extract(str(tmp_path), tmp_path / "none.h5", "--backbone", "mobilenetv2@112", check=False)
    assert proc.returncode == 1 and "0 videos cached" in proc.stdout


def test_torchrun_two_processes_on_cpu(reference, demo_root, tmp_path):
    out = tmp_path / "ddp.h5"
    run_cli("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "extract.cli",
            "--dataset", "demo", "--video-root", demo_root, "--weights", "none", "--num-frames", "4",
            "--out", str(out), "--no-progress", "--workers", "0", *BACKBONES)
    data, ref = read(out), read(reference[0])
    assert data["ids"] == ref["ids"] and np.array_equal(data["frame_index"], ref["frame_index"])
    for name in ref["features"]:
        np.testing.assert_allclose(data["features"][name], ref["features"][name], atol=1e-3)
