"""Dispatch policies: which instance a new request goes to.

Each policy's choice is a pure function of (snapshot, priority, state); the
`Dispatcher` classes only hold that state (the last choice, used to rotate
among equals, and power-of-two's seeded RNG). Only instances that accept work
(`load.accepts_work`) are considered; with none, `NoInstanceAvailable`.

No starvation: whenever several instances are equally good, the choice
rotates among them (the first in id order after the previous choice), so with
every instance idle consecutive dispatches visit every instance in turn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from llumigrate.errors import NoInstanceAvailable
from llumigrate.scheduler.config import SchedulerConfig
from llumigrate.scheduler.load import accepts_work, freeness
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot

_TIE = 1e-9  # freeness values this close are equal


class Dispatcher(Protocol):
    """Picks the instance for each new request.

    `choose` must return the id of an instance of `snapshot` that accepts
    work, or raise `NoInstanceAvailable`; it never returns a down, draining
    or stale instance. The shell applies each choice to its snapshot
    (`ClusterSnapshot.with_dispatch`) before the next call. `priority` is
    the request's vLLM priority (lower is more important; 0 is vLLM's
    default): a high-priority one may use the headroom kept for such
    requests (`load.freeness`).
    """

    def choose(self, snapshot: ClusterSnapshot, priority: int = 0) -> str: ...


def eligible(snapshot: ClusterSnapshot, cfg: SchedulerConfig) -> list[InstanceSnapshot]:
    """Instances that accept work, in id order; raises when there is none."""
    live = sorted((i for i in snapshot.instances if accepts_work(i, cfg, snapshot.now)),
                  key=lambda i: i.instance_id)
    if not live:
        why = ", ".join(f"{i.instance_id} {_why_excluded(i)}" for i in snapshot.instances)
        raise NoInstanceAvailable(f"no instance accepts requests: {why or 'none registered'}")
    return live


def _why_excluded(inst: InstanceSnapshot) -> str:
    return "down" if not inst.up else "draining" if inst.draining else "stale report"


def rotate_after(ids: Sequence[str], last: str | None) -> str:
    """The first of the sorted `ids` after `last`, wrapping around."""
    assert ids
    return next((i for i in ids if last is None or i > last), ids[0])


def least_load(snapshot: ClusterSnapshot, cfg: SchedulerConfig, priority: int,
               last: str | None) -> str:
    """The freest instance for a request of `priority`; ties rotate after `last`."""
    scored = [(freeness(i, cfg, priority), i.instance_id) for i in eligible(snapshot, cfg)]
    best = max(score for score, _ in scored)
    return rotate_after([iid for score, iid in scored if score >= best - _TIE], last)


def round_robin(snapshot: ClusterSnapshot, cfg: SchedulerConfig, last: str | None) -> str:
    """The next eligible instance in id order after `last`; load is ignored."""
    return rotate_after([i.instance_id for i in eligible(snapshot, cfg)], last)


def power_of_two(snapshot: ClusterSnapshot, cfg: SchedulerConfig, priority: int,
                 rng: random.Random) -> str:
    """The freer of two distinct instances sampled with `rng`; on a tie the
    first sampled, so equals are picked at random, never by id."""
    live = eligible(snapshot, cfg)
    if len(live) == 1:
        return live[0].instance_id
    a, b = rng.sample(live, 2)
    return b.instance_id if freeness(b, cfg, priority) > freeness(a, cfg, priority) + _TIE \
        else a.instance_id


def flood(snapshot: ClusterSnapshot, cfg: SchedulerConfig) -> str:
    """Always the first eligible instance in id order (tests: overload one)."""
    return eligible(snapshot, cfg)[0].instance_id


class _Rotating:
    """A dispatcher whose state is its last choice (for `rotate_after`)."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.last: str | None = None


class LeastLoadDispatcher(_Rotating):
    def choose(self, snapshot: ClusterSnapshot, priority: int = 0) -> str:
        self.last = least_load(snapshot, self.cfg, priority, self.last)
        return self.last


class RoundRobinDispatcher(_Rotating):
    def choose(self, snapshot: ClusterSnapshot, priority: int = 0) -> str:
        self.last = round_robin(snapshot, self.cfg, self.last)
        return self.last


class PowerOfTwoDispatcher:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg, self.rng = cfg, random.Random(cfg.seed)

    def choose(self, snapshot: ClusterSnapshot, priority: int = 0) -> str:
        return power_of_two(snapshot, self.cfg, priority, self.rng)


class FloodDispatcher:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg

    def choose(self, snapshot: ClusterSnapshot, priority: int = 0) -> str:
        return flood(snapshot, self.cfg)


_DISPATCHERS = {"least-load": LeastLoadDispatcher, "round-robin": RoundRobinDispatcher,
                "power-of-two": PowerOfTwoDispatcher, "flood": FloodDispatcher}


def make_dispatcher(cfg: SchedulerConfig) -> Dispatcher:
    """The dispatcher `cfg.dispatch_policy` names."""
    return _DISPATCHERS[cfg.dispatch_policy](cfg)
