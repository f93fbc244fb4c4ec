"""Fault-injection points of the migration protocol (pure: names and a hook).

The coordinator awaits `hook(point, ctx)` right before it performs each step,
so an injector can act before the step (kill a process, exhaust blocks) or
during it (start a task that acts after a delay while the step runs). The
stress harness (`llumigrate.stress`) is the injector; production runs none.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class FaultPoint(enum.Enum):
    BEFORE_RESERVE = "before_reserve"   # before the destination is asked for room
    PRECOPY = "precopy"                 # as each pre-copy stage starts (ctx.stage)
    STOP = "stop"                       # as the source is stopped (stop-and-copy)
    COMMIT = "commit"                   # as the request is resumed on the destination
    RELEASE = "release"                 # as the source's held blocks are released


@dataclass(frozen=True)
class FaultContext:
    request_id: str
    source: str
    destination: str
    stage: int = 0          # pre-copy stage index (PRECOPY only)


FaultHook = Callable[[FaultPoint, FaultContext], Awaitable[None]]
