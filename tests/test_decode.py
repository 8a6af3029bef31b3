"""Decoding strategies give the same frames; keyframe mode reads keyframes; the cost model picks sensibly."""
import os

import decord
import numpy as np

from extract.decode import choose_strategy, read_frames
from extract.sampling import Sampling


def test_exact_and_pass_read_identical_frames_and_keyframe_reads_keyframes(demo_root):
    path = os.path.join(demo_root, "videos", "gray_disc_hlines_000.mp4")
    sampling = Sampling(num_frames=5)
    exact, idx_exact, _ = read_frames(path, sampling, "exact")
    passed, idx_pass, strategy = read_frames(path, sampling, "pass")
    assert strategy == "pass" and np.array_equal(idx_exact, idx_pass)
    assert exact.shape == (5, 3, 224, 224) and exact.dtype.is_floating_point is False
    assert np.array_equal(exact.numpy(), passed.numpy())
    keys = set(decord.VideoReader(path).get_key_indices())
    _, idx_key, _ = read_frames(path, sampling, "keyframe")
    assert set(idx_key.tolist()) <= keys


def test_cost_model_prefers_one_pass_for_dense_sampling():
    keyframes = list(range(0, 3000, 250))  # a 2-minute video at 25 fps, GOP 250
    sparse = Sampling(num_frames=16).indices(3000, 25.0)
    dense = Sampling(fps=1.0).indices(3000, 25.0)
    assert choose_strategy(np.unique(sparse), keyframes) == "exact"
    assert choose_strategy(np.unique(dense), keyframes) == "pass"
