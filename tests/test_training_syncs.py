"""A training loss never waits for the device: no value is read back to the host (no ``.item()``,
no truth value of a tensor, as ``torch.distributions``' argument validation takes at every step)."""
import collections

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import TOY_DIMS, toy_method
from policy.data import Batch
from policy.methods import METHODS

READS_BACK = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's values to the host (on CUDA each waits for the device)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS_BACK:
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_training_loss_never_reads_back_from_the_device(name):
    method = toy_method(name, {"fps": 1.0})
    length = torch.tensor([16, 10])
    batch = Batch(np.arange(2), {n: torch.randn(2, 16, d) for n, d in TOY_DIMS.items()}, torch.eye(3)[:2], length)
    for epoch in sorted({0, method.cfg.epochs - 1}):  # the first stage and the last (warm-ups, REINFORCE)
        with HostReads() as reads:
            loss, stats = method.loss(method.model, batch, epoch)
        assert not reads.calls, f"epoch {epoch}: {dict(reads.calls)}"
        assert loss.dim() == 0 and loss.requires_grad
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
