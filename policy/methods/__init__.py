"""The methods ``train-policy`` trains: one module per method family in this package, each
registering its methods in ``METHODS`` when the package is imported. A new method is one new
module here, or in a folder of your own listed in ``FRAMEGATE_METHODS`` (folders separated by
``:``, every ``*.py`` there imported after the package's own); nothing else names it (see
:mod:`policy.methods.base` for what a method declares)."""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import pkgutil
import sys

from .base import (
    CHOICES,
    METHODS,
    Inference,
    Method,
    TrainConfig,
    check_config,
    register_method,
    resolve_auto,
)

__all__ = ["CHOICES", "METHODS", "Inference", "Method", "TrainConfig", "check_config", "register_method",
           "resolve_auto"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
for _folder in filter(None, os.environ.get("FRAMEGATE_METHODS", "").split(os.pathsep)):
    for _path in sorted(glob.glob(os.path.join(_folder, "*.py"))):
        _name = f"framegate_methods_{os.path.splitext(os.path.basename(_path))[0]}"
        _spec = importlib.util.spec_from_file_location(_name, _path)
        sys.modules[_name] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules[_name])
