"""The methods ``train-policy`` trains: one module per method family in this package, each
registering its methods in ``METHODS`` when the package is imported. A new method is one new
module here; nothing else names it (see :mod:`policy.methods.base` for what a method declares)."""
from __future__ import annotations

import importlib
import pkgutil

from .base import (CHOICES, METHODS, Inference, Method, TrainConfig, check_config, register_method, resolve_auto,
                   spread_frames)

__all__ = ["CHOICES", "METHODS", "Inference", "Method", "TrainConfig", "check_config", "register_method",
           "resolve_auto", "spread_frames"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
