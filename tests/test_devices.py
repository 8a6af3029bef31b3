"""The CUDA and multi-GPU paths, checked on a CPU: 2 gloo ranks under torchrun, a monkeypatched
CUDA, stand-ins that count. What only a GPU can show is in bench/gpu_checks.py."""
import os
import signal
import subprocess
import sys
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from extract import distributed
from extract.cache import Cache
from extract.training import Loop, fit
from policy.data import CachedFeatures, prefetch
from policy.ops import price


def torchrun(*args, timeout=240):
    """``torchrun --nproc_per_node 2 -m ARGS`` in a session of its own, killed whole (every rank) at ``timeout``."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", *args], cwd=ROOT, start_new_session=True, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(args[:3])} ... still running after {timeout} s: a rank waits at a collective")
    return proc.returncode, out, err


def test_finetune_under_torchrun_goes_on_when_a_ranks_share_does_not_decode(two_classes, tmp_path):
    """One rank's whole share of a step is a zero-byte video: both ranks skip that step together."""
    root = two_classes
    (root / "train" / "red_disc" / "empty.mp4").write_bytes(b"")
    out = tmp_path / "ft.pt"
    code, stdout, stderr = torchrun("extract.finetune", "--dataset", "list", "--video-root", str(root), "--backbone",
                                    "efficientnet_lite0@84", "--out", str(out), "--epochs", "1", "--set", "segments=2",
                                    "--batch-size", "2", "--workers", "0", "--no-progress")
    assert code == 0, stderr[-2000:]
    assert out.is_file() and "failed (skipped): train/red_disc/empty.mp4" in stderr
    assert stdout.count("best validation mAP") == 1  # rank 0 alone reports and saves


def test_a_budget_that_holds_one_copy_keeps_one_process_in_memory(demo_cache):
    """The other side of tests/test_distributed.py, where 2 ranks under the same budget stream."""
    with Cache(demo_cache) as c:
        size = c.features("efficientnet_lite0@224").size * 2  # float16
    assert CachedFeatures(demo_cache, ["efficientnet_lite0@224"], memory_budget=int(1.5 * size)).in_memory


def test_each_rank_reads_only_its_share(demo_cache):
    names = ["efficientnet_lite0@224"]
    rows = np.arange(20)
    for budget in (None, 491_520):  # in memory, streamed
        store = CachedFeatures(demo_cache, names, memory_budget=budget)
        whole = list(store.batches(rows, 3, torch.Generator().manual_seed(4)))
        shares = [list(store.batches(rows, 3, torch.Generator().manual_seed(4), share=(r, 2))) for r in (0, 1)]
        for b, s0, s1 in zip(whole, *shares, strict=True):
            if len(b.index) == 1:  # fewer rows than ranks: every rank skips it
                assert s0 is None and s1 is None
            else:
                assert np.array_equal(b.index[0::2], s0.index)
                assert np.array_equal(b.index[1::2], s1.index)
                assert torch.equal(b.features[names[0]][1::2], s1.features[names[0]])


def test_the_loader_casts_and_normalises_as_the_host_did(demo_cache):
    store = CachedFeatures(demo_cache, ["efficientnet_lite0@112"], l2_normalise=True)
    rows = np.arange(len(store))
    for host, ready in zip(store.batches(rows, 4), store.loader(rows, 4, torch.device("cpu")), strict=True):
        x = host.features["efficientnet_lite0@112"]
        assert x.dtype == torch.float16  # the host keeps what the cache holds; the device casts
        expected = torch.nn.functional.normalize(x.float(), dim=-1)
        assert torch.equal(ready.features["efficientnet_lite0@112"], expected)


def test_prefetch_keeps_order_raises_and_stops():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken()))
    items = prefetch(iter(range(1000)), depth=1)
    assert next(items) == 0
    items.close()  # the consumer stops early: the producer thread ends, nothing waits forever


class FusedOffCPU(nn.Module):
    """Stands in for ``nn.LSTM`` on CUDA, which runs as cuDNN's RNN, an op the FLOP counter cannot see."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(x) if x.device.type == "cpu" else torch.zeros(*x.shape[:-1], 16, device=x.device)


def test_modules_are_priced_on_the_cpu_whatever_their_device():
    assert price(FusedOffCPU().to("meta"), 1, 8) == price(FusedOffCPU(), 1, 8) == pytest.approx(8 * 16 / 1e9)


def test_cuda_ranks_join_nccl_bound_to_their_own_gpu(monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(set_device=d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.update(backend=backend, **kw))
    info, device = distributed.setup("auto")
    assert device == torch.device("cuda", 1) and calls["set_device"] == device
    assert calls["backend"] == "nccl" and calls["device_id"] == device and info.rank == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls.clear()
    assert distributed.setup("auto")[1] == torch.device("cpu") and calls["backend"] == "gloo"


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path):
    """Passes of 2 accumulated 2 at a time = passes of 4 (a model without batch statistics); the
    epoch's last, shorter group steps on the mean of its passes, as a last, smaller batch would."""
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    weights = []
    for accumulate, cuts in ((1, (0, 4, 6)), (2, (0, 2, 4, 6))):
        torch.manual_seed(0)
        model = nn.Linear(5, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loop = Loop(epochs=1, seed=0, best=str(tmp_path / f"b{accumulate}"), last=str(tmp_path / f"l{accumulate}"),
                    log=str(tmp_path / f"log{accumulate}"), accumulate=accumulate, progress=False)
        fit(loop, model, optimizer, info=distributed.Dist(), device=torch.device("cpu"),
            batches=lambda epoch, cuts=cuts: ((x[a:b], y[a:b]) for a, b in pairwise(cuts)),
            step=lambda m, b, epoch: (((m(b[0]) - b[1]) ** 2).mean(), {}),
            validate=lambda epoch, row: {"val_mAP": 0.5}, keep=lambda epoch, score, model=model: model.state_dict())
        weights.append(model.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_deterministic_mode_switches_torch_to_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        distributed.deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
