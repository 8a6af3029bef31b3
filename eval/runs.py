"""Run folders as ``evaluate`` sees them: phase 2's :class:`~policy.run_folder.RunFolder` plus how a
run is named in a table."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

from extract.errors import UserError
from policy.methods import METHODS, check_config
from policy.run_folder import CONFIG, RunError, RunFolder

__all__ = ["Run", "RunError", "find_runs", "load_run"]


@dataclass
class Run(RunFolder):
    @property
    def conventions(self) -> list[str]:
        """The method's ``CONVENTIONS`` fields this run set away from the paper's reading (the
        official code's options), as ``key=value``; empty: the paper's reading throughout."""
        cls = METHODS.get(self.method)
        if cls is None:
            return []
        defaults = cls.Config()
        return [f"{k}={self.config[k]}" for k in cls.Config.CONVENTIONS
                if k in self.config and self.config[k] != getattr(defaults, k)]

    @property
    def features(self) -> str:
        """How the run read the features: ``l2`` (per-frame L2 normalised) or ``none`` (raw)."""
        return self.config["normalise"]

    @property
    def label(self) -> str:
        """Display name with what distinguishes this run from the method's defaults, the official
        code's conventions it used included."""
        cls = METHODS.get(self.method)
        base = cls.label(self.config) if cls else self.method  # a method no longer registered: its name
        convention = "; ".join(self.conventions)
        if not convention:
            return base
        return f"{base[:-1]}; {convention})" if base.endswith(")") else f"{base} ({convention})"


def load_run(path: str) -> Run:
    return Run.load(path)


def find_runs(paths: list[str], skipped: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
              ) -> list[Run]:
    """Every finished run folder at or below ``paths``, in path order. A folder holding a
    ``config.json`` that is not a finished, consistent run (still training, killed, mixed, damaged,
    non-finite, a config out of range) is left out with one line to ``skipped``."""
    found = []
    for top in paths:
        if not os.path.exists(top):
            raise RunError(f"{top} does not exist")
        for folder, _, files in sorted(os.walk(top)):
            if CONFIG not in files:
                continue
            try:
                run = load_run(folder)
                cls = METHODS.get(run.method)
                if cls is not None:
                    check_config(run.typed_config(cls.Config))
            except UserError as err:  # RunError, or check_config's ConfigError naming the field
                skipped(f"skipped {folder}: {err}")
                continue
            found.append(run)
    return found
