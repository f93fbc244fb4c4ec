"""Seeded fault schedule and the injector the coordinator awaits at each step.

`FaultSchedule` is pure: from a seed it draws the sequence of faults (kind,
protocol point, delay), every configured kind once first (in a seeded order),
then at random. `FaultInjector` is the coordinator's `FaultHook`: it plans
one fault per migration, fires it when that migration reaches the planned
point (at once, or after `delay_s` while the step runs), and puts a fault that
could not fire back at the head of the schedule (the migration ended earlier,
a kill would leave fewer than two instances, a transfer fault found no pull).
What a fault *does* is the `FaultActions` of the runner.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Protocol

from llumigrate.migration.faults import FaultContext, FaultPoint
from llumigrate.stress.config import FAULT_KINDS

logger = logging.getLogger(__name__)

_ALL_STEPS = (FaultPoint.BEFORE_RESERVE, FaultPoint.PRECOPY, FaultPoint.STOP, FaultPoint.COMMIT)
# Where each kind of fault can strike.
APPLICABLE: dict[str, tuple[FaultPoint, ...]] = {
    "kill_source": _ALL_STEPS,
    "kill_source_engine": _ALL_STEPS,
    "kill_destination": _ALL_STEPS,
    "drop_transfer": (FaultPoint.PRECOPY, FaultPoint.COMMIT),    # a pull runs in these steps
    "stall_transfer": (FaultPoint.PRECOPY, FaultPoint.COMMIT),
    "abort_client": _ALL_STEPS,
    "exhaust_destination": (FaultPoint.BEFORE_RESERVE,),        # checked at the reserve
}
KILLS = frozenset({"kill_source", "kill_source_engine", "kill_destination"})
DELAYED = KILLS | {"abort_client"}      # these may also strike while the step runs
DELAYS_S = (0.0, 0.0, 0.02, 0.1)
assert set(APPLICABLE) == set(FAULT_KINDS)


@dataclass(frozen=True)
class Fault:
    kind: str
    point: FaultPoint
    delay_s: float = 0.0    # 0: before the step; > 0: this long after it started


@dataclass
class FaultRecord:
    """One fault that fired."""

    kind: str
    step: str               # FaultPoint value
    stage: int
    request_id: str
    source: str
    destination: str
    delay_s: float
    outcome: str = ""       # the migration's end state and reason
    fired: bool = True      # False when a transfer fault found no pull to break


class FaultSchedule:
    """The seeded sequence of faults. `draw()` is called once per migration."""

    def __init__(self, seed: int, kinds: tuple[str, ...] = FAULT_KINDS, rate: float = 0.5) -> None:
        self.rng = random.Random(f"faults-{seed}")
        self.kinds, self.rate = tuple(kinds), rate
        # Every kind once first; kills last, as each costs an instance.
        others = [k for k in self.kinds if k not in KILLS]
        kills = [k for k in self.kinds if k in KILLS]
        self.rng.shuffle(others)
        self.rng.shuffle(kills)
        self._first = others + kills
        self._retry: list[Fault] = []

    def draw(self, allow_kill: bool = True) -> Fault | None:
        """The fault for the next migration, or None (no fault this time).
        Faults put back come first; a kill only when `allow_kill`."""
        for k, fault in enumerate(self._retry):
            if allow_kill or fault.kind not in KILLS:
                return self._retry.pop(k)
        if not self.kinds or self.rng.random() >= self.rate:
            return None
        kind = self._first.pop(0) if self._first else self.rng.choice(self.kinds)
        delay = self.rng.choice(DELAYS_S) if kind in DELAYED else 0.0
        fault = Fault(kind, self.rng.choice(APPLICABLE[kind]), delay)
        if kind in KILLS and not allow_kill:
            self._retry.append(fault)
            return None
        return fault

    def put_back(self, fault: Fault) -> None:
        """A fault that could not fire: it goes to the next migration."""
        self._retry.append(fault)


class FaultActions(Protocol):
    """What the runner does for each fault kind (see `runner.py`)."""

    def can_kill(self) -> bool: ...
    async def kill(self, instance_id: str, engine_only: bool) -> None: ...
    async def arm_transfer(self, request_id: str, instance_id: str, kind: str) -> None: ...
    async def abort_request(self, request_id: str) -> None: ...
    async def exhaust(self, request_id: str, instance_id: str) -> None: ...


@dataclass
class _Planned:
    fault: Fault | None
    record: FaultRecord | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


class FaultInjector:
    """The coordinator's fault hook. `enabled` off: nothing fires."""

    def __init__(self, schedule: FaultSchedule, actions: FaultActions) -> None:
        self.schedule, self.actions = schedule, actions
        self.enabled = True
        self.records: list[FaultRecord] = []
        self._plans: dict[str, _Planned] = {}     # request id -> its migration's fault

    async def __call__(self, point: FaultPoint, ctx: FaultContext) -> None:
        if point is FaultPoint.BEFORE_RESERVE:
            fault = self.schedule.draw(self.actions.can_kill()) if self.enabled else None
            self._plans[ctx.request_id] = _Planned(fault)
        plan = self._plans.get(ctx.request_id)
        if plan is None or plan.fault is None or plan.record is not None or not self.enabled:
            return
        fault = plan.fault
        if fault.point is not point or (fault.kind in KILLS and not self.actions.can_kill()):
            return
        plan.record = FaultRecord(fault.kind, point.value, ctx.stage, ctx.request_id, ctx.source,
                                  ctx.destination, fault.delay_s)
        self.records.append(plan.record)
        logger.info("fault %s at %s (stage %d) of %s %s->%s", fault.kind, point.value, ctx.stage,
                    ctx.request_id, ctx.source, ctx.destination)
        if fault.delay_s > 0:
            plan.tasks.append(asyncio.ensure_future(self._later(fault, ctx)))
        else:
            await self._act(fault.kind, ctx)

    async def _later(self, fault: Fault, ctx: FaultContext) -> None:
        await asyncio.sleep(fault.delay_s)
        await self._act(fault.kind, ctx)

    async def _act(self, kind: str, ctx: FaultContext) -> None:
        try:
            if kind in KILLS:
                victim = ctx.destination if kind == "kill_destination" else ctx.source
                await self.actions.kill(victim, engine_only=kind == "kill_source_engine")
            elif kind in ("drop_transfer", "stall_transfer"):
                await self.actions.arm_transfer(ctx.request_id, ctx.destination, kind.split("_")[0])
            elif kind == "abort_client":
                await self.actions.abort_request(ctx.request_id)
            elif kind == "exhaust_destination":
                await self.actions.exhaust(ctx.request_id, ctx.destination)
        except Exception as e:  # the fault's target may already be gone
            logger.info("fault %s on %s: %s", kind, ctx.request_id, e)

    def planned(self, request_id: str) -> FaultRecord | None:
        """The fault that fired in `request_id`'s current migration, if any."""
        plan = self._plans.get(request_id)
        return plan.record if plan else None

    async def finished(self, request_id: str, outcome: str, transfer_fired: bool = True) -> None:
        """The migration of `request_id` ended. A planned fault that never
        fired (or a transfer fault that found no pull) is put back."""
        plan = self._plans.pop(request_id, None)
        if plan is None or plan.fault is None:
            return
        for t in plan.tasks:
            await asyncio.gather(t, return_exceptions=True)
        if plan.record is None:
            self.schedule.put_back(plan.fault)
            return
        plan.record.outcome = outcome
        if not transfer_fired:
            plan.record.fired = False
            self.schedule.put_back(plan.fault)

    def fired(self) -> list[FaultRecord]:
        return [r for r in self.records if r.fired]
