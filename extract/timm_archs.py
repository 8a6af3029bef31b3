"""timm's image models as backbones (the ``timm`` extra): ``timm:MODEL[.TAG]@RES``.

The feature is the model's pooled pre-logits embedding, ``forward_head(forward_features(x),
pre_logits=True)`` (for CLIP, the image tower before its projection), built with ``num_classes=0``
so that no classifier or projection is kept, priced or loaded. Preprocessing follows the model's
pretrained config: its mean and std, and its interpolation (antialiased) for resizing the 224 crop.
A model with patches (ViT, DINOv2, …) is built for the resolution (``img_size``; timm resamples its
position embedding on load) and takes only multiples of its patch size.

Weights: ``imagenet`` means the tag's pretrained weights, from the Hugging Face cache or hub;
``PATH`` a local state dict or ``.safetensors`` (a ``finetune-backbone`` file too); ``none`` a
random init. Every file is loaded by timm's own loader (``weights_only=True``), through the model's
filter (CLIP's key names, position embeddings) and its classifier dropped.
"""
from __future__ import annotations

import functools
import inspect
import logging
from unittest import mock

import torch
from torch import nn

from .backbones import RANDOM_INIT, TIMM, Arch, WeightsUnavailable, _sha256, file_identity, local_file

try:
    import timm
    from safetensors.torch import load_file
except ImportError:  # the optional extra
    timm = None


class PreLogits(nn.Module):
    """A timm model's pooled pre-logits embedding ``(B, dim)`` of images ``(B, 3, H, W)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class TimmArch(Arch):
    """One timm model: ``name`` is ``timm:MODEL.TAG``; ``cls`` its class; ``patch`` the size of its non-overlapping
    patches (0: none, any resolution); ``sized`` whether it is built for a resolution (``img_size``); ``repo`` its
    weights' Hugging Face repository."""

    def __init__(self, model: str, *, cls: type, dim: int, mean, std, interpolation: str, patch: int, sized: bool,
                 repo: str | None, filename: str) -> None:
        super().__init__(name=TIMM + model, dim=dim, head="", build=self._build, imagenet=self._pretrained,
                         mean=tuple(mean), std=tuple(std), interpolation=interpolation)
        for key, value in dict(model=model, cls=cls, patch=patch, sized=sized, repo=repo, filename=filename).items():
            object.__setattr__(self, key, value)  # frozen, as every Arch

    def check(self, resolution: int) -> None:
        if self.patch and resolution % self.patch:
            below, above = resolution // self.patch * self.patch, (resolution // self.patch + 1) * self.patch
            raise ValueError(f"backbone {self.name}@{resolution}: it cuts {self.patch} px patches, so its resolution "
                             f"must be a multiple of {self.patch} (e.g. {below or above} or {above})")

    def _build(self, resolution: int, **kwargs) -> nn.Module:
        sized = {"img_size": resolution} if self.sized else {}
        with torch.random.fork_rng():
            torch.manual_seed(0)  # --weights none is reproducible
            return timm.create_model(self.model, num_classes=0, **sized, **kwargs)

    def _pretrained(self) -> tuple[dict, str]:
        """The tag's weights from the Hugging Face cache (downloaded when the hub is reachable) and their identity."""
        if not self.repo:
            raise WeightsUnavailable(f"timm has no Hugging Face weights for {self.model}: pass --weights PATH to a "
                                     "local state dict or .safetensors, or --weights none")
        from huggingface_hub import constants, hf_hub_download

        try:
            path = hf_hub_download(self.repo, self.filename)
        except Exception as err:  # offline, no such file, hub errors: one line, never random weights
            raise WeightsUnavailable(
                f"weights of {self.name} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be "
                f"downloaded ({type(err).__name__}): download {self.filename} from https://huggingface.co/{self.repo} "
                "and pass --weights PATH, or pass --weights none") from None
        return _read(path), f"timm:{self.model}:hf-hub:{self.repo}/{self.filename}:sha256={_sha256(path)}"

    def create(self, resolution: int, weights: str) -> tuple[nn.Module, str]:
        if weights == "none":
            return PreLogits(self._build(resolution)), RANDOM_INIT
        if weights == "imagenet":
            state, identity = self._pretrained()
        else:
            state, identity = _read(local_file(weights)), file_identity(weights)
        if not state:  # timm would take an empty one for "none given" and load the hub's instead
            raise WeightsUnavailable(f"{weights} holds no weights for {self.name}")
        if all(k.startswith("model.") for k in state):  # a finetune-backbone file (PreLogits' keys)
            state = {k.removeprefix("model."): v for k, v in state.items()}
        loaded = []  # what timm's loader reports: it loads leniently when it drops the classifier

        def load_state_dict(module, state_dict, strict=True, **kwargs):
            loaded.append(nn.Module.load_state_dict(module, state_dict, strict=False, **kwargs))
            return loaded[-1]

        try:
            with (mock.patch.object(self.cls, "load_state_dict", load_state_dict),
                  mock.patch.object(logging.getLogger("timm.models._builder"), "disabled", True)):  # we check keys
                model = self._build(resolution, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        except (RuntimeError, KeyError, ValueError) as err:  # shapes, keys the model's filter expects
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise WeightsUnavailable(f"weights {weights} do not fit {self.name}@{resolution}: {first[:200]}") from None
        model.pretrained_cfg.pop("state_dict", None)  # not a second copy of the weights for the model's lifetime
        missing = [k for r in loaded for k in r.missing_keys]
        classifier = model.pretrained_cfg.get("classifier") or ()  # e.g. head, or head.linear beside a head.bn
        heads = tuple(c.partition(".")[0] + "." for c in ([classifier] if isinstance(classifier, str) else classifier))
        unexpected = [k for r in loaded for k in r.unexpected_keys if not k.startswith(heads or ("\0",))]
        if not loaded or missing or unexpected:
            raise WeightsUnavailable(f"weights {weights} do not fit {self.name}@{resolution}: {len(missing)} missing "
                                     f"keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        return PreLogits(model), identity


def _read(path: str) -> dict:
    """The state dict in ``path``: ``.safetensors``, or a ``torch.load(weights_only=True)`` checkpoint (its EMA
    weights when it has them; ``module.`` prefixes removed); :class:`WeightsUnavailable` in one line when it
    cannot be read."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, truncated, pickled objects refused by weights_only, another format
        raise WeightsUnavailable(f"{path} is not a state dict that can be read ({type(err).__name__}): download it "
                                 "again, or convert it to .safetensors") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


@functools.cache
def timm_arch(model: str) -> TimmArch:
    """timm's ``model`` (``MODEL`` or ``MODEL.TAG``; no tag: timm's default one, then named), read from a
    model built on the meta device (no memory, no weights). ValueError in one line when timm is missing or
    has no such model."""
    if timm is None:
        raise ValueError(f"backbone {TIMM}{model} needs timm: pip install -e '.[timm]'")
    if not timm.is_model(model):
        raise ValueError(f"timm has no model {model!r}: `extract-features --list-backbones 'timm:*PART*'` lists them")
    try:
        with torch.device("meta"):
            net = timm.create_model(model, pretrained=False, num_classes=0)
    except RuntimeError as err:  # an unknown pretrained tag
        raise ValueError(f"timm: {str(err).splitlines()[0]}") from None
    cfg = net.pretrained_cfg
    tagged = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
    interpolation = cfg.get("interpolation", "bilinear")
    return TimmArch(tagged, cls=type(net), dim=int(getattr(net, "head_hidden_size", None) or net.num_features),
                    mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                    interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
                    patch=_patch(net), sized=_sized(type(net)), repo=cfg.get("hf_hub_id"),
                    filename=cfg.get("hf_hub_filename") or "model.safetensors")


def _patch(net: nn.Module) -> int:
    """The side of ``net``'s non-overlapping patches (a patch embedding whose convolution's stride is its
    kernel, as ViT's and DINOv2's), which a resolution must be a multiple of; 0 when it has none (CNNs,
    overlapping or hybrid embeddings: they take any resolution their strides allow)."""
    proj = getattr(getattr(net, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d) and proj.stride == proj.kernel_size and proj.stride[0] > 1:
        return int(proj.stride[0])
    return 0


def _sized(cls: type) -> bool:
    """Whether models of ``cls`` are built for an input size (``img_size``, in its or a parent's ``__init__``)."""
    return any("img_size" in inspect.signature(c.__init__).parameters for c in cls.__mro__
               if c is not object and "__init__" in vars(c))


# GMACs per frame as timm publishes them, beside ours in --list-backbones: name@res -> (GMACs, source). The
# benchmark CSV's rows name the architecture, not the tag, and count its default classifier too (17.58 =
# ViT-B/16's 17.56 + 0.01 of its 1000-class head + normalisation and softmax); EfficientNet's are 2.6% above
# ours because its profiler also counts the squeeze-and-excitation gating's element-wise products.
_CSV = "timm results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv"
PUBLISHED: dict[str, tuple[float, str]] = {
    "timm:vit_base_patch16_clip_224.openai@224": (17.58, _CSV),
    "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k@224": (17.58, _CSV),
    "timm:vit_small_patch16_224.augreg_in21k_ft_in1k@224": (4.61, _CSV),
    "timm:vit_small_patch14_dinov2.lvd142m@518": (46.76, _CSV),
    "timm:convnext_tiny.fb_in22k@224": (4.47, _CSV),
    "timm:efficientnet_b3.ra2_in1k@288": (1.63, _CSV),
    "timm:efficientnet_b3.ra2_in1k@320": (2.01, _CSV),
    "timm:resnet50.a1_in1k@224": (4.11, _CSV),
}
