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
