"""Decoding strategies give the same frames; keyframe mode reads keyframes; the cost model picks sensibly."""
import os

import decord
import numpy as np
import pytest

from extract import decode
from extract.decode import (
    DECODERS,
    VideoError,
    choose_strategy,
    decoder_problem,
    open_video,
    read_distinct,
    read_frames,
    resolve_decoder,
)
from extract.errors import ConfigError
from extract.sampling import Sampling

# every decoder; torchcodec's tests skip where FFmpeg's libraries (or torchcodec) are missing, saying which
AVAILABLE = [d for d in sorted(DECODERS) if not decoder_problem(d)]
EVERY = [pytest.param(d, marks=pytest.mark.skipif(bool(decoder_problem(d)), reason=decoder_problem(d) or "-"))
         for d in sorted(DECODERS)]


@pytest.mark.parametrize("decoder", EVERY)
def test_exact_and_pass_read_identical_frames_and_keyframe_reads_keyframes(demo_root, decoder):
    path = os.path.join(demo_root, "videos", "gray_disc_hlines_000.mp4")
    sampling = Sampling(num_frames=5)
    exact, idx_exact, _ = read_frames(path, sampling, "exact", decoder)
    passed, idx_pass, strategy = read_frames(path, sampling, "pass", decoder)
    assert strategy == "pass" and np.array_equal(idx_exact, idx_pass)
    assert exact.shape == (5, 3, 224, 224) and exact.dtype.is_floating_point is False
    assert np.array_equal(exact.numpy(), passed.numpy())
    keys = set(decord.VideoReader(path).get_key_indices())
    _, idx_key, _ = read_frames(path, sampling, "keyframe", decoder)
    assert set(idx_key.tolist()) <= keys


def test_every_decoder_gives_the_same_frames_in_any_order(demo_root, tmp_path):
    """Frames by index, in presentation order, the same from every decoder: on a demo video and on
    one with B-frames (packets out of presentation order), read in a shuffled order of groups."""
    write_timed(tmp_path / "bframes.mp4", [40 * i for i in range(24)], options={"preset": "fast", "bf": "3", "g": "8"})
    for path in (os.path.join(demo_root, "videos", "red_disc_000.mp4"), str(tmp_path / "bframes.mp4")):
        videos = {name: open_video(path, name) for name in AVAILABLE}
        reference = videos["decord"]
        order = np.random.default_rng(0).permutation(len(reference))
        for name, video in videos.items():
            assert len(video) == len(reference) and video.keyframes() == reference.keyframes(), name
            np.testing.assert_allclose(video.times(), reference.times(), atol=1e-6)
            for group in np.array_split(order, 5):
                targets = sorted(group.tolist())
                assert np.array_equal(video.frames(targets), reference.frames(targets)), (name, targets)
    frames = videos["pyav"].frames(list(range(24)))
    assert frames.mean(axis=(1, 2, 3)).tolist() == pytest.approx([10 * i for i in range(24)], abs=2)


def test_cost_model_prefers_one_pass_for_dense_sampling():
    keyframes = list(range(0, 3000, 250))  # a 2-minute video at 25 fps, GOP 250
    sparse = Sampling(num_frames=16).indices(3000, 25.0)
    dense = Sampling(fps=1.0).indices(3000, 25.0)
    assert choose_strategy(np.unique(sparse), keyframes) == "exact"
    assert choose_strategy(np.unique(dense), keyframes) == "pass"


def write_timed(path, pts_ms, codec="libx264", options=None):
    """A 64x48 video whose frame ``i`` is grey level ``10 * i``, shown at ``pts_ms[i]`` milliseconds."""
    import fractions

    import av

    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = stream.time_base = tb
        stream.options = options or {"preset": "ultrafast", "g": "4", "crf": "0"}
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def zero_timestamps(source, path):
    """``source`` remuxed with every packet at time 0."""
    import av

    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.pts = packet.dts = 0
                packet.stream = stream
                out.mux(packet)


@pytest.mark.parametrize("decoder", EVERY)
def test_variable_frame_rate_is_sampled_by_timestamps(tmp_path, decoder):
    """4 frames at 25 fps, then a 1.9 s pause, then 8 more: at 2 fps sample k is the frame shown at
    (k + 0.5) / 2 s, not frame (k + 0.5) * average rate / 2 (1.25 s would read the frame of 2.08 s)."""
    write_timed(tmp_path / "vfr.mp4", [0, 40, 80, 120] + [2000 + 40 * i for i in range(8)])
    frames, indices, _ = read_frames(str(tmp_path / "vfr.mp4"), Sampling(fps=2.0), decoder=decoder)
    assert indices.tolist() == [3, 3, 3, 3, 10]
    assert frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([30, 30, 30, 30, 100], abs=2)


@pytest.mark.parametrize("decoder", EVERY)
def test_timestamps_that_do_not_increase_are_refused(tmp_path, decoder):
    """All-zero timestamps (decord then returns shifted, repeated frames) and H.264 with B-frames in AVI
    (no timestamps: random access returns other frames) go to /failed with the reason."""
    write_timed(tmp_path / "ok.mp4", [40 * i for i in range(12)])
    zero_timestamps(tmp_path / "ok.mp4", tmp_path / "zero.mp4")
    write_timed(tmp_path / "bframes.avi", [40 * i for i in range(12)], options={"preset": "fast", "bf": "2"})
    for name in ("zero.mp4", "bframes.avi"):
        with pytest.raises(VideoError, match=r"frame timestamps do not increase \(\d+ of 11 steps stand still or go "
                                             r"back, the first after frame \d+\).*re-encode the file"):
            read_frames(str(tmp_path / name), Sampling(num_frames=4), decoder=decoder)
    frames, _, _ = read_frames(str(tmp_path / "ok.mp4"), Sampling(num_frames=4), decoder=decoder)
    assert frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([10, 40, 70, 100], abs=2)


def test_repeated_frames_are_decoded_once_and_t_is_bounded(demo_root, tmp_path):
    path = os.path.join(demo_root, "videos", "red_disc_000.mp4")  # 24 frames
    crops, indices, rows, _ = read_distinct(path, Sampling(num_frames=4096))
    assert crops.shape == (24, 3, 224, 224) and len(indices) == len(rows) == 4096
    assert np.array_equal(np.arange(24)[rows], indices)
    with pytest.raises(ValueError, match=r"--num-frames must be 1\.\.4096"):
        Sampling(num_frames=100000)
    write_timed(tmp_path / "long.mp4", [0, 5_000_000])  # two frames 5000 s apart
    with pytest.raises(VideoError, match="cannot sample it: --fps 1 takes 5001 frames .* pass --max-frames"):
        read_frames(str(tmp_path / "long.mp4"), Sampling(fps=1.0))


def test_an_unknown_decoder_is_refused_in_one_line(demo_root):
    from extract.finetune import FinetuneConfig, finetune

    line = "decoder='ffmpeg': decoder must be auto or one of decord, pyav, torchcodec"
    with pytest.raises(ConfigError, match=line):
        open_video(os.path.join(demo_root, "videos", "red_disc_000.mp4"), "ffmpeg")
    with pytest.raises(ConfigError, match=line):  # before anything is loaded or written
        finetune(FinetuneConfig(dataset="demo", backbone="mobilenetv2@112", decoder="ffmpeg"))


def over_reporting_avi(path, frames: int, header: int) -> None:
    """An MPEG-4 AVI of ``frames`` frames whose headers (avih total frames, strh length) claim ``header``."""
    import struct

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    data = bytearray(path.read_bytes())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    assert struct.unpack("<I", data[avih + 24:avih + 28]) == (frames,)
    data[avih + 24:avih + 28] = struct.pack("<I", header)  # dwTotalFrames
    data[strh + 40:strh + 44] = struct.pack("<I", header)  # dwLength
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("decoder", EVERY)
def test_a_header_that_over_reports_frames_is_read_as_the_frames_that_exist(tmp_path, decoder):
    """The header says 120 frames, the file holds 50 (as decord's loop on such files, dmlc/decord#373):
    every decoder counts the frames its index finds, so sampling never asks past the real end."""
    import av

    path = tmp_path / "over.avi"
    over_reporting_avi(path, 50, 120)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 120  # what the header claims
    video = open_video(str(path), decoder)
    assert len(video) == 50
    frames, indices, _ = read_frames(str(path), Sampling(num_frames=16), decoder=decoder)
    assert indices.max() <= 49 and frames.shape[0] == 16
    assert frames[-1].float().mean().item() == pytest.approx(5 * indices[-1], abs=3)


def test_torchcodec_that_cannot_load_ffmpeg_is_found_out_before_decoding(monkeypatch):
    """torchcodec 0.17 imports without FFmpeg and fails at its first call: the check makes that call."""
    pytest.importorskip("torchcodec")
    import torchcodec._core

    def missing():
        raise RuntimeError("Could not load libtorchcodec. Likely causes: ...")

    monkeypatch.setattr(torchcodec._core, "get_ffmpeg_library_versions", missing)
    assert decode.torchcodec_problem() == decode.FFMPEG_MISSING


def test_torchcodec_without_ffmpeg_says_what_to_install_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(decode, "torchcodec_problem", lambda: decode.FFMPEG_MISSING)
    with pytest.raises(ConfigError, match=r"--decoder torchcodec: torchcodec needs FFmpeg's shared libraries "
                                          r"\(versions 4 to 8\): install them \(Debian/Ubuntu: apt-get install ffmpeg"):
        resolve_decoder("torchcodec")
    assert resolve_decoder("auto") == "pyav"  # the next fastest
    assert resolve_decoder("auto", recorded="decord") == "decord"  # a cache keeps its decoder
    assert resolve_decoder("auto", recorded="torchcodec") == "pyav"  # ... unless it cannot run here
