"""timm's image models as backbones: names, preprocessing, weights (random, local files, none offline),
FLOPs with attention, and the whole chain (extract, LiteEval with a ViT as its fine model, recognize)."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import run_cli
from extract.backbones import WeightsUnavailable, create_backbone, parse_name
from extract.cache import Cache
from extract.cli import main as extract_features
from extract.flops import backbone_flops, priced
from policy.recognize import decode_videos, load, recognise
from policy.run_folder import RunFolder

timm = pytest.importorskip("timm")

VIT, CNN = "timm:test_vit.r160_in1k", "timm:test_convnext.r160_in1k"  # timm's tiny test models (64-d features)


def test_names_take_the_default_tag_and_refuse_what_cannot_run_in_one_line():
    assert parse_name("timm:test_vit@160") == (VIT, 160)
    assert parse_name(f"{CNN}@84") == (CNN, 84)  # a CNN takes any resolution
    for name, message in [("timm:test_vit@100", "must be a multiple of 16 (e.g. 96 or 112)"),
                          ("timm:no_such_model@224", "timm has no model 'no_such_model'"),
                          ("timm:test_vit.no_such_tag@160", "no_such_tag")]:
        with pytest.raises(ValueError, match=r"\(e\.g\. 96|no_such") as err:
            parse_name(name)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_the_feature_is_the_pooled_pre_logits_embedding_with_the_models_preprocessing():
    backbone = create_backbone(f"{VIT}@160", weights="none")
    model = backbone.module.model
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(backbone.module(x), model.forward_head(model.forward_features(x), pre_logits=True))
    assert backbone.dim == 64 and backbone.module(x).shape == (2, 64)
    cfg = model.pretrained_cfg
    assert (backbone.arch.mean, backbone.arch.std, backbone.arch.interpolation) == (
        tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])
    assert not any(p.requires_grad for p in backbone.module.parameters())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_local_state_dict_is_loaded_with_its_head_dropped(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("test_vit.r160_in1k", img_size=112)  # its 1000-class head too
    path = str(tmp_path / f"vit{suffix}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    backbone = create_backbone(f"{VIT}@112", weights=path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(backbone.module(x), source.forward_head(source.forward_features(x.clone()), pre_logits=True))
    assert backbone.weights.startswith("file:") and "sha256=" in backbone.weights
    (tmp_path / "damaged.safetensors").write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(WeightsUnavailable, match="is not a state dict that can be read") as err:
        create_backbone(f"{VIT}@112", weights=str(tmp_path / "damaged.safetensors"))
    assert "\n" not in str(err.value)
    partial = {k: v for k, v in state.items() if k.startswith("blocks.0.")}  # right shapes, most of it missing
    for name, bad in [("shapes", {"blocks.0.attn.qkv.weight": torch.zeros(3)}), ("partial", partial), ("empty", {})]:
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(WeightsUnavailable, match="do not fit timm:test_vit.r160_in1k@112|holds no weights") as err:
            create_backbone(f"{VIT}@112", weights=str(tmp_path / f"{name}.pt"))  # never partly random weights
        assert "\n" not in str(err.value)


def test_offline_without_weights_names_what_to_download(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone(f"{VIT}@160")  # imagenet: the tag's pretrained weights, never random ones silently
    message = str(err.value)
    assert "https://huggingface.co/timm/test_vit.r160_in1k" in message and "model.safetensors" in message
    assert "--weights PATH" in message and "\n" not in message


def test_flops_count_attention_and_the_meta_pricing_matches():
    """A ViT's GMACs are its linear layers', its patch embedding's and attention's two products (QK^T and
    AV: 2 N^2 D per block), counted by the same counter as every backbone."""
    backbone = create_backbone(f"{VIT}@160", weights="none")
    model = backbone.module.model
    tokens = (160 // 16) ** 2 + model.num_prefix_tokens
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    patch = model.patch_embed.proj
    embed = patch.out_channels * patch.in_channels * 16 * 16 * (160 // 16) ** 2
    attention = len(model.blocks) * 2 * tokens ** 2 * model.embed_dim
    entry = backbone_flops(backbone)
    assert entry.gflops * 1e9 == pytest.approx(linear * tokens + embed + attention, rel=1e-9)
    assert priced(f"{VIT}@160") == entry  # on the meta device: the same row, no weights


def test_list_backbones_prices_timm_models_and_says_what_it_cannot():
    def listed(pattern: str) -> str:
        result = CliRunner().invoke(extract_features, ["--list-backbones", pattern])
        assert result.exit_code == 0, result.output
        return result.output

    rows = {line.split()[0]: line for line in listed("timm:test_vi*@160").splitlines()[1:]}
    assert f"{VIT}@160" in rows and float(rows[f"{VIT}@160"].split()[1]) == pytest.approx(
        priced(f"{VIT}@160").gflops, abs=1e-3)
    assert "must be a multiple of 16" in listed(f"{VIT}@100")
    assert "efficientnet_lite0@224" in (out := listed("efficientnet_lite*")) and " 1280 " in out


def test_extract_liteeval_with_a_vit_and_recognize_reproduce_the_run(demo_root, tmp_path):
    cache, run = str(tmp_path / "timm.h5"), tmp_path / "liteeval"
    common = ["--dataset", "demo", "--video-root", demo_root, "--num-frames", "6", "--out", cache, "--workers", "1",
              "--no-progress"]
    run_cli("extract.cli", *common, "--backbone", f"{CNN}@112", "--weights", "none")  # random init
    torch.manual_seed(2)
    save_file(timm.create_model("test_vit.r160_in1k", img_size=160).state_dict(), str(tmp_path / "vit.safetensors"))
    run_cli("extract.cli", *common, "--backbone", f"{VIT}@160", "--weights", str(tmp_path / "vit.safetensors"))
    run_cli("policy.cli", "--method", "liteeval", "--features", cache, "--set", f"coarse={CNN}@112", "--set",
            f"fine={VIT}@160", "--set", "hidden_coarse=16", "--set", "hidden_fine=16", "--epochs", "2",
            "--batch-size", "4", "--out", str(run), "--no-progress")
    folder = RunFolder.load(str(run))
    with Cache(folder.cache) as c:
        assert set(c.weights) == {f"{CNN}@112", f"{VIT}@160"} and c.weights[f"{CNN}@112"].startswith("none")
        row = {v: i for i, v in enumerate(c.ids)}
        videos = [c.video_path(row[v]) for v in folder.video_id]
    loaded = load(str(run), torch.device("cpu"), frames_per_pass=8)
    decoded = list(decode_videos(videos, loaded.sampling, loaded.decoder, workers=0))
    results = [r for start in range(0, len(videos), 4) for r in recognise(loaded, decoded[start:start + 4])]
    for i, r in enumerate(results):  # the evaluation's batches of 4: the run's numbers exactly
        assert r["actions"] == folder.actions[i][: r["frames"]].tolist()
        assert r["gflops"] == float(folder.gflops[i])
        np.testing.assert_allclose([s for _, s in r["top5"]], np.sort(folder.scores[i])[::-1][:5], rtol=1e-5,
                                   atol=1e-6)


def test_finetune_backbone_takes_a_timm_name_and_extract_features_loads_its_file(two_classes, tmp_path):
    out = tmp_path / "ft.pt"
    run_cli("extract.finetune", "--dataset", "list", "--video-root", str(two_classes), "--backbone", f"{CNN}@112",
            "--out", str(out), "--epochs", "1", "--set", "init=none", "--set", "segments=2", "--batch-size", "4",
            "--workers", "0", "--no-progress")
    features = {}
    for weights in ("none", str(out)):
        cache = tmp_path / f"{len(features)}.h5"
        run_cli("extract.cli", "--dataset", "list", "--video-root", str(two_classes), "--num-frames", "2", "--out",
                str(cache), "--backbone", f"{CNN}@112", "--weights", weights, "--workers", "0", "--no-progress")
        with Cache(cache) as c:
            features[weights] = c.features(f"{CNN}@112")[:].astype(np.float32)
    assert np.abs(features["none"] - features[str(out)]).max() > 1e-3  # the finetuned weights were loaded
