"""FLOPs in the papers' convention: GFLOPs = billions of multiply-accumulates (MACs).

Counted with ``torch.utils.flop_counter``, which sees convolutions and matrix products (as
torchvision's ``_ops``); BatchNorm, activations and pooling are not counted. The counter reports
2 FLOPs per MAC, so we halve it. ``nn.LSTM`` runs as fused ops the counter does not know (``mkldnn_rnn_layer`` on CPU,
``lstm`` elsewhere); we give the counter their formula: the same matrix products an
``nn.LSTMCell`` unrolls to. On CUDA ``nn.LSTM`` runs as cuDNN's RNN, which the counter cannot see at
all: :func:`count_gflops` therefore always prices a CPU copy, whatever device the module is on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbones import Backbone, get_arch, parse_name


def _lstm_flops(input_shape, hx, params, *args, out_shape=None, **kwargs) -> int:
    steps = prod(input_shape[:2])  # batch * time, whatever the layout
    weights = [shape for shape in params if len(shape) == 2]  # w_ih and w_hh of every layer/direction
    return 2 * steps * sum(rows * cols for rows, cols in weights)


def _mkldnn_rnn_layer_flops(input_shape, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    return 2 * prod(input_shape[:2]) * (prod(w_ih) + prod(w_hh))  # one layer, one direction


_RNN_FORMULAS = {torch.ops.aten.lstm: _lstm_flops, torch.ops.aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flops}


def count_gflops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """GMACs of one forward pass of ``module`` on ``inputs`` (their shapes decide, not their values),
    run on the CPU (a module elsewhere is priced as a CPU copy of its shapes), in eval mode without
    gradients so that pricing draws no random numbers (dropout) and updates no statistics (BatchNorm);
    the module's train/eval mode is restored."""
    if any(t.device.type != "cpu" for t in [*module.parameters(), *module.buffers()]):
        module = copy.deepcopy(module).to_empty(device="cpu")
    inputs = tuple(x if x.device.type == "cpu" else torch.zeros_like(x, device="cpu") for x in inputs)
    training = module.training
    module.eval()
    try:
        return _gmacs(module, *inputs)
    finally:
        module.train(training)


def _gmacs(module: nn.Module, *inputs: torch.Tensor) -> float:
    """GMACs the counter sees in one forward pass of ``module`` on ``inputs``, without gradients."""
    with FlopCounterMode(display=False, custom_mapping=_RNN_FORMULAS) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / 2e9


@dataclass(frozen=True)
class FlopsEntry:
    """One row of the cache's ``/flops`` table."""

    name: str  # arch@res
    resolution: int
    gflops: float  # GMACs per frame
    params: int  # parameters of the feature extractor (classifier removed)
    dim: int  # feature dimension


def backbone_flops(backbone: Backbone) -> FlopsEntry:
    """Price one ``arch@res`` feature extractor on a single ``3 x res x res`` frame."""
    res = backbone.resolution
    gflops = count_gflops(backbone.module, torch.zeros(1, 3, res, res))
    params = sum(p.numel() for p in backbone.module.parameters())
    return FlopsEntry(name=backbone.name, resolution=res, gflops=gflops, params=params, dim=backbone.dim)


def priced(name: str) -> FlopsEntry:
    """The ``/flops`` row backbone ``name`` (``arch@res``) would get, priced on the meta device: no weights are
    loaded and no memory is taken, so any model of timm's zoo is priced in a second. (Image backbones have no
    device-specific fused ops the counter could miss there, unlike ``nn.LSTM`` on CUDA: see
    :func:`count_gflops`; ``tests/test_timm.py`` checks that both give the same row.)"""
    arch_name, res = parse_name(name)
    arch = get_arch(arch_name)
    with torch.device("meta"):
        module = arch.create(res, "none")[0].eval().requires_grad_(False)
    gflops = _gmacs(module, torch.empty(1, 3, res, res, device="meta"))
    return FlopsEntry(name=f"{arch.name}@{res}", resolution=res, gflops=gflops,
                      params=sum(p.numel() for p in module.parameters()), dim=arch.dim)
