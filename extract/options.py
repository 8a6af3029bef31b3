"""``--set key=value`` for the commands whose options are one config dataclass."""
from __future__ import annotations

import dataclasses
import typing

import click

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_value(kind: type, value: str) -> object:
    """``value`` as the field type ``kind``: bool (1/true/yes/on or 0/false/no/off, any case), int
    (digits only: ``1e9`` and ``2.5`` are refused), float, str, or a tuple of one of those written
    as a comma list (``tuple[int, ...]``: ``1,2,4``). Anything else is a ValueError saying what is
    allowed."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(parse_value(item, part.strip()) for part in value.split(",") if part.strip())
    if kind is bool:
        word = value.strip().lower()
        if word not in TRUE + FALSE:
            raise ValueError(f"{value!r} is not a bool: write one of {'/'.join(TRUE)} or {'/'.join(FALSE)}")
        return word in TRUE
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an int: write a whole number in digits (1000000000, not 1e9)") from None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a {getattr(kind, '__name__', kind)}") from None


def apply_overrides(cfg, pairs: tuple[str, ...]) -> list[str]:
    """``key=value`` strings onto the config dataclass, typed by its fields (:func:`parse_value`);
    returns the keys set."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    keys = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise click.UsageError(f"--set {pair}: expected key=value with key in {', '.join(sorted(fields))}")
        kind = hints[key]
        try:
            parsed = parse_value(kind, value)
        except ValueError as err:
            raise click.UsageError(f"--set {pair}: {err}") from None
        setattr(cfg, key, parsed)
        keys.append(key)
    return keys
