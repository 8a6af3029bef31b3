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

import torch
from torch import nn

from .backbones import RANDOM_INIT, TIMM, Arch, WeightsUnavailable, _sha256, file_identity, local_file

try:
    import timm
    from timm.models import load_state_dict
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
    """One timm model: ``name`` is ``timm:MODEL.TAG``; ``patch`` its patch size (0: a CNN, any resolution);
    ``sized`` whether it is built for a resolution (``img_size``); ``repo`` its weights' Hugging Face repository."""

    def __init__(self, model: str, *, dim: int, mean, std, interpolation: str, patch: int, sized: bool,
                 repo: str | None, filename: str) -> None:
        super().__init__(name=TIMM + model, dim=dim, head="", build=self._build, imagenet=self._pretrained,
                         mean=tuple(mean), std=tuple(std), interpolation=interpolation)
        for key, value in dict(model=model, patch=patch, sized=sized, repo=repo, filename=filename).items():
            object.__setattr__(self, key, value)  # frozen, as every Arch

    def check(self, resolution: int) -> None:
        if self.patch and resolution % self.patch:
            below, above = resolution // self.patch * self.patch, (resolution // self.patch + 1) * self.patch
            raise ValueError(f"backbone {self.name}@{resolution}: it cuts {self.patch} px patches, so its resolution "
                             f"must be a multiple of {self.patch} (e.g. {below or above} or {above})")

    def _build(self, resolution: int, **kwargs) -> nn.Module:
        sized = {"img_size": resolution} if self.sized else {}
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
        return load_state_dict(path), f"timm:{self.model}:hf-hub:{self.repo}/{self.filename}:sha256={_sha256(path)}"

    def create(self, resolution: int, weights: str) -> tuple[nn.Module, str]:
        if weights == "none":
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return PreLogits(self._build(resolution)), RANDOM_INIT
        if weights == "imagenet":
            state, identity = self._pretrained()
        else:  # safetensors or torch.load(weights_only=True); EMA weights when the checkpoint has them
            state, identity = load_state_dict(local_file(weights)), file_identity(weights)
        if all(k.startswith("model.") for k in state):  # a finetune-backbone file (PreLogits' keys)
            state = {k.removeprefix("model."): v for k, v in state.items()}
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = self._build(resolution, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        except (RuntimeError, KeyError, ValueError) as err:  # missing keys, shapes
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise WeightsUnavailable(f"weights {weights} do not fit {self.name}@{resolution}: {first[:200]}") from None
        return PreLogits(model), identity


@functools.cache
def timm_arch(model: str) -> TimmArch:
    """timm's ``model`` (``MODEL`` or ``MODEL.TAG``; no tag: timm's default one, then named), read from a
    model built on the meta device (no memory, no weights). ValueError in one line when timm is missing or
    has no such model."""
    if timm is None:
        raise ValueError(f"backbone {TIMM}{model} needs timm: pip install -e '.[timm]'")
    if not timm.is_model(model):
        raise ValueError(f"timm has no model {model!r}: `extract-features --list-backbones 'timm:*PART*'` lists them")
    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False, num_classes=0)
    cfg = net.pretrained_cfg
    tagged = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", 0) or 0
    sized = "img_size" in inspect.signature(type(net).__init__).parameters
    interpolation = cfg.get("interpolation", "bilinear")
    return TimmArch(tagged, dim=int(getattr(net, "head_hidden_size", None) or net.num_features),
                    mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                    interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
                    patch=int(patch[0] if isinstance(patch, (tuple, list)) else patch), sized=sized,
                    repo=cfg.get("hf_hub_id"), filename=cfg.get("hf_hub_filename") or "model.safetensors")


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
