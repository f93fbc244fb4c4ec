"""Shape checks on what a client sends, before the backend sees it. Each
raises ConfigError (INVALID_ARGUMENT) naming the field and what is allowed."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping

from llumigrate.control.events import KINDS
from llumigrate.errors import ConfigError

MAX_ID_LENGTH = 256
MAX_HOST_LENGTH = 253  # a DNS name's limit
DEFAULT_DEREGISTER_TIMEOUT_S = 120.0
MAX_DEREGISTER_TIMEOUT_S = 3600.0

_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


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


def valid_host(value: str) -> str:
    """`value` if it is a host name (dot-separated labels of letters, digits,
    `-` and `_`) or an IP address, with no port and no brackets."""
    if not value:
        raise ConfigError("host must not be empty")
    if len(value) > MAX_HOST_LENGTH:
        raise ConfigError(f"host is {len(value)} characters long; at most {MAX_HOST_LENGTH} allowed")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not all(_HOST_LABEL.fullmatch(label) for label in value.removesuffix(".").split(".")):
        raise ConfigError(f"host {value!r} is not a host name or IP address (give the port separately)")
    return value


def valid_port(value: int) -> int:
    """`value` if it is a TCP port a client can dial: 1..65535."""
    if not 1 <= value <= 65535:
        raise ConfigError(f"port must be in 1..65535, got {value}")
    return value


def valid_timeout(value: float | None) -> float:
    """A deregistration timeout in seconds: DEFAULT_DEREGISTER_TIMEOUT_S when
    None, else finite, > 0 and at most MAX_DEREGISTER_TIMEOUT_S."""
    if value is None:
        return DEFAULT_DEREGISTER_TIMEOUT_S
    if not (math.isfinite(value) and 0 < value <= MAX_DEREGISTER_TIMEOUT_S):
        raise ConfigError(f"timeout_s must be > 0 and at most {MAX_DEREGISTER_TIMEOUT_S:g} seconds, got {value}")
    return value
