import numpy as np
import pytest

from extract.sampling import Sampling


def test_uniform_segment_centres_as_tsn():
    n, T = 100, 8
    tick = n / T
    assert Sampling(num_frames=T).indices(n, 25.0).tolist() == [int(tick / 2 + tick * i) for i in range(T)]
    assert Sampling(num_frames=4).indices(40, 25.0).tolist() == [5, 15, 25, 35]


def test_short_videos_repeat_frames():
    assert Sampling(num_frames=6).indices(3, 25.0).tolist() == [0, 0, 1, 1, 2, 2]
    assert Sampling(num_frames=4).indices(1, 25.0).tolist() == [0, 0, 0, 0]


def test_fps_sampling_and_cap():
    idx = Sampling(fps=1.0).indices(250, 25.0)  # 10 s at 25 fps -> 10 samples, mid-second
    assert idx.tolist() == [12, 37, 62, 87, 112, 137, 162, 187, 212, 237]
    capped = Sampling(fps=1.0, max_frames=4).indices(250, 25.0)
    assert len(capped) == 4 and capped[0] == 12 and capped[-1] == 237 and np.all(np.diff(capped) > 0)


def test_invalid_sampling():
    with pytest.raises(ValueError):
        Sampling(num_frames=8, fps=1.0)
    with pytest.raises(ValueError):
        Sampling()
    assert Sampling(num_frames=16).tag == "t16" and Sampling(fps=1, max_frames=25).tag == "fps1-max25"


@pytest.mark.parametrize("options, message", [
    (dict(num_frames=100000), r"--num-frames must be 1\.\.4096"),
    (dict(num_frames=0), r"--num-frames must be 1\.\.4096"),
    (dict(fps=1.0, max_frames=-5), r"--max-frames must be 1\.\.4096"),
    (dict(fps=float("nan")), r"--fps must be 0\.001\.\.1000 frames per second, not nan"),
    (dict(fps=float("inf")), "not inf"),
    (dict(fps=0.0), "not 0"),
    (dict(fps=-2.0), "not -2"),
    (dict(num_frames=16, max_frames=8), "--max-frames caps what --fps samples"),  # was silently ignored
    (dict(max_frames=8), "--max-frames caps what --fps samples"),
])
def test_absurd_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as err:
        Sampling(**options)
    assert "\n" not in str(err.value)


def test_uncapped_fps_sampling_is_bounded():
    assert len(Sampling(fps=1.0).indices(25 * 4096, 25.0)) == 4096
    with pytest.raises(ValueError, match="--fps 1 takes 4097 frames of this 4097 s video, more than 4096: "
                                         "pass --max-frames"):
        Sampling(fps=1.0).indices(25 * 4097, 25.0)
    capped = Sampling(fps=1000.0, max_frames=5).indices(25 * 3600 * 24, 25.0)  # a day: thinned without a huge array
    assert capped.tolist() == [0, 540000, 1080000, 1619999, 2159999]


def test_fps_sampling_follows_timestamps_of_a_variable_frame_rate():
    n, rate = 250, 25.0
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, n) / rate  # a constant rate, timestamps rounded
    times = np.append(np.arange(n) / rate + jitter, n / rate) + 3.0
    for sampling in (Sampling(fps=1.0), Sampling(fps=3.0, max_frames=7)):
        assert np.array_equal(sampling.indices(n, rate, times), sampling.indices(n, rate))
    # 50 frames at 25 fps, a 4 s pause (one frame shown), 50 more: 8 s, 100 frames, 12.5 fps on average
    times = np.concatenate([np.arange(50) / 25, 8.0 - np.arange(50, 0, -1) / 25, [8.0]])
    idx = Sampling(fps=1.0).indices(100, 12.5, times)
    assert idx.tolist() == [12, 37, 49, 49, 49, 49, 62, 87]  # the frame shown at 0.5, 1.5, ..., 7.5 s
    assert Sampling(fps=1.0).indices(100, 12.5).tolist() == [6, 18, 31, 43, 56, 68, 81, 93]  # the average rate
