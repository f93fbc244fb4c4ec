"""Shape checks on what a client sends, before the backend sees it. Each
raises ConfigError (INVALID_ARGUMENT) naming the field and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from llumigrate.control.events import KINDS
from llumigrate.errors import ConfigError

MAX_ID_LENGTH = 256


def valid_id(field: str, value: str) -> str:
    """`value` if it is a usable id or name: non-empty, at most MAX_ID_LENGTH
    characters, printable, no spaces."""
    if not value:
        raise ConfigError(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ConfigError(f"{field} is {len(value)} characters long; at most {MAX_ID_LENGTH} allowed")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(f"{field} {value!r} has spaces or unprintable characters")
    return value


def valid_names(field: str, values: Iterable[str]) -> list[str]:
    """Each of `values` checked with `valid_id`; no repeats."""
    names = [valid_id(field, v) for v in values]
    if len(set(names)) != len(names):
        raise ConfigError(f"{field} names a policy twice: {names}")
    return names


def valid_thresholds(values: Mapping[str, float]) -> dict[str, float]:
    """Threshold names checked with `valid_id`; values finite."""
    out = {}
    for name, value in values.items():
        valid_id("threshold name", name)
        if not math.isfinite(value):
            raise ConfigError(f"threshold {name} must be a finite number, got {value}")
        out[name] = value
    return out


def valid_kinds(kinds: Iterable[str]) -> list[str]:
    """Event kinds, each one of events.KINDS."""
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown event kind(s) {unknown}; allowed: {', '.join(KINDS)}")
    return kinds
