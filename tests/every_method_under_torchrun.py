"""Run under ``torchrun`` by ``tests/test_distributed.py``: every registered method trains in one
process group (one launch, not one per method), each with a feature budget per node that one copy
fits and two do not, so the ranks must stream. Usage: CACHE OUT_DIR."""
import sys

import torch.distributed as dist

from policy.data import CachedFeatures
from policy.methods import METHODS
from policy.methods.arnet import ARNetConfig
from policy.train import train

SMALL = {"hidden": 16, "hidden_coarse": 16, "hidden_fine": 32, "warmup_epochs": 1, "joint_epochs": 1,
         "finetune_epochs": 1}

cache, out = sys.argv[1:3]
dist.init_process_group("gloo")
probe = CachedFeatures(cache, [], memory_budget=0)
for name in sorted(METHODS):
    cls = METHODS[name]
    fields = cls.Config.__dataclass_fields__
    staged = issubclass(cls.Config, ARNetConfig)  # AR-Net's family trains for its stages' epochs
    cfg = cls.Config(method=name, features=cache, out=f"{out}/{name}", batch_size=3,
                     **({} if staged else {"epochs": 1}), **{k: v for k, v in SMALL.items() if k in fields})
    size = sum(probe.cache.features(n).size * 2 for n in cls.needs(cls.resolve(cfg, probe.flops, probe.sampling)))
    cfg.memory_budget_gb = 1.5 * size / 2**30
    train(cfg, progress=False)
dist.destroy_process_group()
