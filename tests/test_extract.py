"""extract-features end to end on the real (tiny) demo videos: schema, features, resume, bad files, torchrun."""
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
from extract.cache import Cache
from extract.decode import read_frames
from extract.demo import CLASSES
from extract.sampling import Sampling

BACKBONES = ["--backbone", "mobilenetv2@112", "--backbone", "resnet18@84"]


def extract(root, out, *extra, check=True, **kwargs):
    return run_cli("extract.cli", "--dataset", "demo", "--video-root", root, "--weights", "none",
                   "--num-frames", "4", "--out", str(out), "--no-progress", *extra, check=check, **kwargs)


def read(path):
    """Everything in a cache as plain Python/numpy values."""
    with Cache(str(path)) as cache:
        return {
            "ids": cache.ids,
            "frame_index": np.stack([cache.frame_index(i) for i in range(len(cache.ids))]),
            "length": cache.length,
            "labels": cache.labels,
            "features": {k: cache.features(k)[:] for k in cache.backbones},
            "failed": cache.failed,
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
    with Cache(str(out)) as cache:
        assert cache.classes[:2] == ["red_disc", "green_square"]
        assert cache.labels.shape == (20, 10) and cache.labels.dtype == np.uint8
        assert cache.length.tolist() == [4] * 20
        assert cache.frame_index(0).tolist() == Sampling(num_frames=4).indices(24, 12.0).tolist()
        assert cache.features("mobilenetv2@112").shape == (20, 4, 1280)
        assert cache.features("resnet18@84").dtype == np.float16
        flops = cache.flops
        assert set(flops) == {"mobilenetv2@112", "resnet18@84"} and flops["resnet18@84"].dim == 512
        assert flops["mobilenetv2@112"].resolution == 112 and 0.07 < flops["mobilenetv2@112"].gflops < 0.09
        assert cache.sampling["num_frames"] == 4 and cache.dataset == "demo"
        assert "none" in cache.weights["resnet18@84"]
        assert cache.failed == {}
        splits = cache.split.tolist()
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
    parts = str(out) + ".parts"

    def chunks() -> int:
        return sum(not n.endswith(".tmp") for n in os.listdir(parts)) if os.path.isdir(parts) else 0

    for delay in rng.uniform(0.0, 0.5, size=3):  # each kill lands a random moment after a new chunk: mid-run
        before = chunks()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while chunks() <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(out):
            with Cache(str(out)) as cache:  # the cache opens after every kill
                assert cache.dataset == "demo" and len(set(cache.ids)) == len(cache.ids)
    journalled = chunks()
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


# ---------------------------------------------------------------- assembly at scale, orphaned journals, folder layout

def synthetic(i, name, T, dim, version=0):
    """Features of video ``i`` (exact in float16), its length and frame indices: what a test journal holds."""
    n = 1 + i % T
    base = (i * 7 + np.arange(T)[:, None] * 5 + np.arange(dim) + 97 * version + 31 * len(name)) % 1024
    return n, np.arange(n, dtype=np.int64) * 2 + i % 3, np.where(np.arange(T)[:, None] < n, base, 0).astype(np.float16)


def test_assembly_reads_each_chunk_whole_and_old_rows_in_runs(tmp_path, monkeypatch):
    """Thousands of tiny videos: an old cache merged with two ranks' strided chunks, written in many small blocks.
    The output is checked value by value; the HDF5 reads are counted: per chunk and per run, never per video."""
    import extract.cache as cache
    from extract.datasets import VideoRecord
    from extract.flops import FlopsEntry

    T, dim, n_videos, a, b = 6, 3, 2400, "a@8", "b@8"
    videos = [VideoRecord(f"v{i}", str(tmp_path / "videos" / f"v{i}.mp4"), (i % 5, (i + 1) % 5), "train")
              for i in range(n_videos)]
    kw = dict(videos=videos, classes=list("vwxyz"), problems=[("list.txt:9", "malformed line")], max_length=T,
              attrs={"dataset": "synthetic", "video_root": str(tmp_path / "videos")}, weights={a: "none", b: "none"},
              flops={name: FlopsEntry(name, 8, 0.1, 10, dim) for name in (a, b)})
    monkeypatch.setattr(cache, "BLOCK_BYTES", 2 * T * dim * 100)  # blocks of 100 rows: chunks straddle them

    def write(journal, indices, names, version=0, failed=()):
        done = []
        for i in indices:
            n, frames, _ = synthetic(i, a, T, dim)
            done.append(cache.VideoFeatures(i, frames, {m: synthetic(i, m, T, dim, version)[2][:n] for m in names}))
        journal.write(done, [(i, "cannot open video stream") for i in failed], {m: "none" for m in names})

    out = str(tmp_path / "c.h5")
    first = cache.Journal(out)
    for lo in range(0, 1600, 32):  # the old cache: backbone a for videos 0..1599
        write(first, range(lo, lo + 32), [a])
    assert cache.assemble(out, chunks=first.chunks(), **{**kw, "weights": {a: "none"}}) == (1600, 1)
    first.remove()
    second = [cache.Journal(out, rank) for rank in (0, 1)]  # then two ranks add b to it and a + b to 1600..2399
    for rank, journal in enumerate(second):
        for lo in range(rank, 1600, 64):
            write(journal, [i for i in range(lo, lo + 64, 2) if i != 101], [b])  # 101 keeps a only
        for lo in range(1600 + rank, n_videos, 64):
            indices = range(lo, min(lo + 64, n_videos), 2)
            write(journal, [i for i in indices if i % 500 != 1], [a, b], failed=[i for i in indices if i % 500 == 1])
    write(second[0], [7, 1700], [a, b], version=1)  # a later chunk wins
    chunks = second[0].chunks()
    reads = 0
    getitem = h5py.Dataset.__getitem__

    def counting(self, key):
        nonlocal reads
        reads += 1
        return getitem(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    cached, failed = cache.assemble(out, chunks=chunks, **kw)
    monkeypatch.undo()
    assert reads <= 7 * len(chunks) + 2 * (n_videos // 100) + 10, reads  # old code: 4 per video
    data = read(out)
    lost = {101} | {i for i in range(1600, n_videos) if i % 500 == 1}
    kept = [i for i in range(n_videos) if i not in lost]
    assert (cached, failed) == (len(kept), 1 + len(lost)) and data["ids"] == [f"v{i}" for i in kept]
    assert list(data["failed"].items())[0] == ("list.txt:9", "malformed line")
    assert data["failed"]["v2001"] == "cannot open video stream"
    assert data["failed"]["v101"] == "features missing for b@8"
    assert data["length"].tolist() == [1 + i % T for i in kept]
    for row, i in enumerate(kept):
        n, frames, _ = synthetic(i, a, T, dim)
        assert data["frame_index"][row].tolist() == frames.tolist() + [-1] * (T - n)
        for name in (a, b):
            version = 1 if i in (7, 1700) else 0
            assert np.array_equal(data["features"][name][row], synthetic(i, name, T, dim, version)[2]), (i, name)
    assert [np.flatnonzero(r).tolist() for r in data["labels"]] == [sorted({i % 5, (i + 1) % 5}) for i in kept]
    with Cache(str(out)) as c:
        assert [c.video_path(i) for i in range(3)] == [str(tmp_path / "videos" / f"v{i}.mp4") for i in range(3)]


def journal_from(reference, out, rows, weights=None, **attrs):
    """Chunks of ``out``'s journal holding ``rows`` of the reference cache, as a killed run leaves them."""
    from extract.cache import Journal, VideoFeatures, run_identity
    from extract.datasets import load_annotations

    with Cache(str(reference)) as c:
        videos = load_annotations("demo", [], c.video_root).videos
        identity = {"dataset": c.dataset, "sampling": c.attr("sampling"), "preprocessing": c.attr("preprocessing"),
                    **attrs}
        journal = Journal(str(out), identity=run_identity(identity, videos))
        weights = weights or c.weights
        n = c.length
        done = [VideoFeatures(row, c.frame_index(row)[: n[row]],
                              {name: c.features(name)[row, : n[row]] for name in weights}) for row in rows]
    journal.write(done, [], weights)
    return journal.folder


def test_orphaned_journal_resumes_without_the_cache(reference, demo_root, tmp_path):
    """The cache was deleted, its .parts folder was not: the run uses the chunks and writes the same cache."""
    out = tmp_path / "orphan.h5"
    parts = journal_from(reference[0], out, range(0, 4))
    journal_from(reference[0], out, range(4, 8))
    proc = extract(demo_root, out, *BACKBONES, "--workers", "0")
    assert "12 processed" in proc.stdout and "20 videos cached" in proc.stdout
    data, ref = read(out), read(reference[0])
    assert data["ids"] == ref["ids"] and np.array_equal(data["frame_index"], ref["frame_index"])
    for name in ref["features"]:
        np.testing.assert_allclose(data["features"][name], ref["features"][name], atol=1e-3)
    assert not os.path.exists(parts)


@pytest.mark.parametrize("case", ["other weights", "unrequested backbone", "other sampling"])
def test_journal_of_another_run_stops_with_one_line(case, reference, demo_root, tmp_path):
    out = tmp_path / "foreign.h5"
    weights = {"mobilenetv2@112": "torchvision:IMAGENET1K_V1"} if case == "other weights" else None
    journal_from(reference[0], out, range(3), weights)
    extra = {"other weights": BACKBONES, "unrequested backbone": BACKBONES[:2],
             "other sampling": [*BACKBONES, "--num-frames", "8"]}[case]
    proc = extract(demo_root, out, *extra, "--workers", "0", check=False)
    expected = {"other weights": "foreign.h5.parts holds mobilenetv2@112 computed with weights "
                                 "torchvision:IMAGENET1K_V1",
                "unrequested backbone": "foreign.h5.parts holds resnet18@84 from an interrupted run: add --backbone "
                                        "resnet18@84 to finish it, or delete that folder",
                "other sampling": "foreign.h5.parts holds work of another dataset, sampling or video list"}[case]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and expected in proc.stderr
    assert "delete that folder" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_list_dataset_reads_a_folder_per_class_without_annotations(demo_root, tmp_path, monkeypatch):
    import shutil

    from click.testing import CliRunner

    from extract.cli import main

    root = tmp_path / "folders"
    for split, number in (("train", "000"), ("test", "001")):
        for name in ("red_disc", "blue_disc"):
            (root / split / name).mkdir(parents=True)
            shutil.copy(os.path.join(demo_root, "videos", f"{name}_{number}.mp4"), root / split / name)
    out = tmp_path / "folders.h5"
    proc = run_cli("extract.cli", "--dataset", "list", "--video-root", str(root), "--weights", "none", "--num-frames",
                   "4", "--out", str(out), "--no-progress", "--workers", "0", "--backbone", "mobilenetv2@112",
                   cwd=tmp_path)  # no data/list/annotations/ there
    assert "4 videos cached" in proc.stdout
    with Cache(str(out)) as cache:
        assert cache.classes == ["blue_disc", "red_disc"]
        assert cache.split.tolist() == ["train", "train", "test", "test"]
        assert cache.ids[:2] == ["train/blue_disc/blue_disc_000.mp4", "train/red_disc/red_disc_000.mp4"]
        assert cache.labels.argmax(axis=1).tolist() == [0, 1, 0, 1]
    monkeypatch.chdir(tmp_path)
    refused = CliRunner().invoke(main, ["--dataset", "minik", "--video-root", str(root), "--out", str(out)])
    assert refused.exit_code == 2 and "no --annotations given and data/minik/annotations/ is empty" in refused.output


# ---------------------------------------------------------------- feeding the device: batches, workers, the demo


class FrameCode(torch.nn.Module):
    """Stand-in backbone: each frame's feature is its first pixel (``dim`` copies); records batch sizes."""

    def __init__(self, dim):
        super().__init__()
        self.one, self.dim, self.batches = torch.nn.Parameter(torch.ones(())), dim, []

    def forward(self, x):
        self.batches.append(len(x))
        return x[:, :1, 0, 0].expand(-1, self.dim) * self.one


def test_a_group_runs_full_batches_and_one_partial_batch_in_one_transfer_each(monkeypatch):
    """Frame counts that do not divide the batch size: the leftover frames wait for the next video,
    only the group's last batch is partial, each frame's features land with its video, and every
    batch comes back to the host in one transfer whatever the number of backbones."""
    from tqdm import tqdm

    from extract.backbones import Arch, Backbone
    from extract.decode import VideoError
    from extract.pipeline import ExtractConfig, Summary, _extract_group

    lengths = [5, 3, 7, 0, 1, 6, 4, 2]  # 0: a video that fails to decode
    first = np.cumsum([0] + lengths)

    def frames_of(path, sampling, seek, decoder):
        v = int(path)
        if not lengths[v]:
            raise VideoError("zero-byte file")
        codes = torch.arange(first[v], first[v + 1], dtype=torch.uint8)  # each frame: its number in the group
        return codes.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous(), np.arange(lengths[v]), "exact"

    monkeypatch.setattr("extract.pipeline.read_frames", frames_of)
    arch = Arch("code", 1, "fc", build=None, imagenet=None, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    backbones = [Backbone(f"code{dim}@8", arch, 8, FrameCode(dim), "none") for dim in (1, 2)]
    written = []
    journal = type("Journal", (), {"write": lambda self, done, failed, weights: written.extend(done)})()
    transfers = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: transfers.append(t.shape) or cpu(t))
    cfg = ExtractConfig("demo", [], "", [], Sampling(num_frames=4), "", batch_size=8, workers=0, chunk_videos=2)
    summary = Summary()
    items = [(v, str(v)) for v in range(len(lengths))]
    _extract_group(cfg, backbones, items, [str(v) for v in range(len(lengths))], journal, torch.device("cpu"),
                   tqdm(disable=True), summary)
    total = sum(lengths)  # 28 frames: 3 batches of 8 and one of 4 (today: 8, 8, 8, 2, 2)
    assert backbones[0].module.batches == backbones[1].module.batches == [8, 8, 8, 4]
    assert len(transfers) == 4 and summary.frames == total
    assert sorted(v.index for v in written) == [v for v in range(len(lengths)) if lengths[v]]
    for video in written:
        expected = np.arange(first[video.index], first[video.index + 1], dtype=np.float16)[:, None]
        assert np.array_equal(video.features["code1@8"], expected)
        assert np.array_equal(video.features["code2@8"], np.repeat(expected, 2, axis=1))


def test_default_workers_follow_the_cores_per_rank(monkeypatch):
    from click.testing import CliRunner

    from extract import cli
    from extract.decode import default_workers
    from extract.pipeline import Summary

    for cores, ranks, expected in ((64, None, 16), (64, "8", 7), (12, "2", 5), (2, None, 1), (2, "4", 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert default_workers() == expected
    seen = []
    monkeypatch.setattr(cli, "run_extraction", lambda cfg: seen.append(cfg.workers) or Summary(cached=1))
    args = ["--dataset", "demo", "--annotations", "unused.txt", "--no-progress"]
    for extra in ([], ["--workers", "0"], ["--workers", "3"]):
        assert CliRunner().invoke(cli.main, args + extra).exit_code == 0
    assert seen == [1, 0, 3]  # 2 cores, 4 ranks: the least, 1; an explicit value as given
    assert "Default: cores per rank - 1" in " ".join(CliRunner().invoke(cli.main, ["--help"]).output.split())


SMALL_DEMO = """\
import functools, runpy, sys
from extract import demo
demo.generate_demo = functools.partial(demo.generate_demo, videos_per_class=2, frames=24, test_fraction=0.5)
sys.argv[0] = "extract-features"
runpy.run_module("extract.cli", run_name="__main__")
"""


def test_torchrun_ranks_generate_the_demo_once_and_extract_it(tmp_path):
    """Two ranks start on a folder without the demo: one generates it while the other waits."""
    script = tmp_path / "small_demo.py"  # extract-features with a demo of 20 videos, not 240
    script.write_text(SMALL_DEMO)
    root, out = tmp_path / "demo", tmp_path / "c.h5"
    proc = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "--dataset", "demo",
                   "--video-root", str(root), "--num-frames", "4", "--backbone", "efficientnet_lite0@112",
                   "--out", str(out), "--workers", "0", "--no-progress", env={"OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("generating the demo dataset") == 1 and "20 videos cached" in proc.stdout
    assert sorted(os.listdir(root / "videos")) == sorted(f"{c}_{k:03d}.mp4" for c in CLASSES for k in range(2))
    data = read(out)
    assert len(data["ids"]) == 20 and not data["failed"]
