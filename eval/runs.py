"""Run folders as ``evaluate`` sees them: phase 2's :class:`~policy.run_folder.RunFolder` plus how a
run is named in a table."""
from __future__ import annotations

import os
from dataclasses import dataclass

from policy.methods import METHODS
from policy.run_folder import RunError, RunFolder

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


def find_runs(paths: list[str]) -> list[Run]:
    """Every finished run folder at or below ``paths``, in path order."""
    found = []
    for top in paths:
        if not os.path.exists(top):
            raise RunError(f"{top} does not exist")
        for folder, _, _ in sorted(os.walk(top)):
            if RunFolder.is_finished(folder):
                found.append(load_run(folder))
    return found
