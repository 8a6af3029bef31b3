"""Registries refuse duplicates; a new method is one new file under policy/methods/."""
import json
import os
import textwrap

import pytest

from conftest import TOY_FLOPS, run_cli
from eval.reports import register_report
from extract.backbones import ARCHS, register_arch
from extract.datasets import register_dataset
from policy.methods import METHODS, Method, check_config, register_method


def test_every_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="registered twice"):
        register_arch(ARCHS["resnet18"])
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset("demo")(lambda *args: None)
    with pytest.raises(ValueError, match="registered twice"):
        register_report("table1")(lambda runs, opts: None)
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type("Again", (Method,), {"name": "uniform"}))
    assert METHODS["uniform"].__name__ == "Uniform"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_s_defaults_pass_check_config(name):
    """The ranges check_config holds every config field to (policy/methods/base.py RANGES) admit every
    method's defaults, resolved for both kinds of cache."""
    cls = METHODS[name]
    for sampling in ({"num_frames": 16}, {"fps": 1.0, "max_frames": 129}):
        check_config(cls.resolve(cls.Config(method=name), TOY_FLOPS, sampling))


TOY = '''
"""A toy method for a test: a linear classifier on the first frame's fine features."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from extract.training import soft_cross_entropy

from policy.methods.base import Ablation, Inference, Method, TrainConfig, register_method
from policy.ops import numpy
from policy.run_folder import ActionCodes


@dataclass
class FirstFrameConfig(TrainConfig):
    dropout: float = 0.0


@register_method
class FirstFrame(Method):
    name = "{name}"
    display = "First frame"
    Config = FirstFrameConfig
    spends_per_frame = True
    ablations = (Ablation("{name}-dropout", "First frame by dropout", {{"p": "dropout"}}, ("--set dropout=0.5",)),)

    @property
    def codes(self) -> ActionCodes:
        return ActionCodes(legend={{-1: "no frame", 7: "first frame"}}, marks={{7: "1"}}, visited=(7,),
                           expensive=(7,))

    @classmethod
    def label(cls, config: dict) -> str:
        return f"{{cls.display}} ({{config['fine']}})"

    def build(self) -> nn.Module:
        return nn.Linear(self.dims[self.cfg.fine], self.num_classes)

    def loss(self, model, batch, epoch):
        logits = model(batch.features[self.cfg.fine][:, 0])
        return soft_cross_entropy(logits, batch.labels).mean(), {{}}

    def infer(self, model, batch):
        probs = numpy(model(batch.features[self.cfg.fine][:, 0]).softmax(-1))
        cost = np.full((len(probs), 1), self.flops[self.cfg.fine])
        return Inference(scores=probs, step_scores=probs[:, None], actions=np.full((len(probs), 1), 7),
                         step_gflops=cost)
'''


def test_a_new_method_is_one_new_file(demo_cache, tmp_path):
    """Written to a folder of its own (FRAMEGATE_METHODS), not into the package: a killed test leaves nothing there."""
    name = f"toy-first-frame-{os.getpid()}"
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "toy.py").write_text(textwrap.dedent(TOY.format(name=name)))
    env = {"FRAMEGATE_METHODS": str(tmp_path / "methods")}
    run = tmp_path / "runs" / "toy"
    proc = run_cli("policy.cli", "--method", name, "--features", demo_cache, "--out", str(run), "--epochs", "2",
                   "--no-progress", env=env)
    assert "mAP" in proc.stdout
    reports = {report: json.loads(run_cli("eval.cli", "--report", report, "--runs", str(tmp_path / "runs"),
                                          "--format", "json", env=env).stdout)
               for report in ("table1", "usage", f"{name}-dropout")}
    row = reports["table1"]["rows"][0]
    assert row["method"] == "First frame (efficientnet_lite0@224)" and row["frames/V"] == 1.0
    metrics = json.load(open(run / "metrics.json"))
    assert row["GFLOPs/V"] == pytest.approx(metrics["gflops_per_video"])
    assert metrics["fine_usage"] == 1.0 and metrics["action_usage"] == {"first frame": 1.0}  # its own codes
    usage = reports["usage"]["rows"]
    assert usage and all(r["method"] == row["method"] and r["mean"] == 1.0 for r in usage)
    assert reports[f"{name}-dropout"]["rows"][0]["p"] == 0.0  # its own ablation table
