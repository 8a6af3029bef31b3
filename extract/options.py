"""``--set key=value`` for the commands whose options are one config dataclass."""
from __future__ import annotations

import dataclasses
import typing

import click


def apply_overrides(cfg, pairs: tuple[str, ...]) -> list[str]:
    """``key=value`` strings onto the config dataclass, typed by its fields; returns the keys set."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    keys = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise click.UsageError(f"--set {pair}: expected key=value with key in {', '.join(sorted(fields))}")
        kind = hints[key]
        if kind is bool:
            parsed = value.lower() in ("1", "true", "yes", "on")
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise click.UsageError(f"--set {pair}: {value!r} is not a {kind.__name__}") from None
        setattr(cfg, key, parsed)
        keys.append(key)
    return keys
