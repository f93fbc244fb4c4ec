"""Pure parts of the stress harness: config, workload, fault schedule and
injector, invariant checks (planted defects included), report. No engines."""

from __future__ import annotations

import asyncio

import pytest

from llumigrate.errors import ConfigError
from llumigrate.migration.faults import FaultContext, FaultPoint
from llumigrate.scheduler import SchedulerConfig
from llumigrate.stress.collect import plant_duplicate
from llumigrate.stress.config import FAULT_KINDS, StressConfig
from llumigrate.stress.faults import APPLICABLE, KILLS, FaultInjector, FaultSchedule
from llumigrate.stress.invariants import InstanceFacts, RequestFacts, check_all, check_request
from llumigrate.stress.report import abort_class, percentile
from llumigrate.stress.workload import MAX_SEEDED_PROMPT, make_workload


def make_facts(**kw) -> RequestFacts:
    out = [5, 6, 7, 8]
    base = dict(request_id="stress-0", kind="greedy", max_tokens=4, streaming=True, output=list(out),
                streamed=list(out), final_deltas=1, finish_count=1, finish_reason="length",
                reference=list(out))
    return RequestFacts(**{**base, **kw})


# -- config and workload -----------------------------------------------------------
def test_config_validates():
    StressConfig()
    for bad in (dict(num_instances=1), dict(fault_rate=2.0), dict(faults=("nope",)),
                dict(num_requests=0, duration_s=0), dict(plant_defect="x"), dict(min_survivors=3)):
        with pytest.raises(ConfigError):
            StressConfig(**bad)
    assert StressConfig().survivors == 2 and StressConfig(num_instances=2).survivors == 1
    assert StressConfig(num_instances=4, min_survivors=1).survivors == 1


def test_workload_is_seeded_and_mixed():
    a, b = make_workload(3, 200), make_workload(3, 200)
    assert a == b and make_workload(4, 200) != a
    assert make_workload(3, 50) == a[:50]
    assert {s.kind for s in a} == {"greedy", "seeded", "random"}
    assert {s.streaming for s in a} == {True, False} and len({s.priority for s in a}) > 1
    # vLLM's priorities: both normal (the default 0) and high at the scheduler's default threshold
    assert {SchedulerConfig().is_high(s.priority) for s in a} == {True, False}
    assert all(len(s.prompt) <= MAX_SEEDED_PROMPT for s in a if s.kind == "seeded")
    assert min(len(s.prompt) for s in a) < 200 < max(len(s.prompt) for s in a)
    assert all(("seed" in s.sampling) == (s.kind == "seeded") for s in a)


# -- fault schedule ----------------------------------------------------------------
def test_schedule_is_seeded_and_covers_every_kind_first_kills_last():
    s1, s2 = FaultSchedule(7, FAULT_KINDS, 1.0), FaultSchedule(7, FAULT_KINDS, 1.0)
    first = [s1.draw() for _ in range(len(FAULT_KINDS))]
    assert first == [s2.draw() for _ in range(len(FAULT_KINDS))]
    assert first != [FaultSchedule(8, FAULT_KINDS, 1.0).draw() for _ in range(len(FAULT_KINDS))]
    assert {f.kind for f in first} == set(FAULT_KINDS)
    assert all(f.kind in KILLS for f in first[-len(KILLS):])
    assert all(f.point in APPLICABLE[f.kind] for f in first)


def test_schedule_holds_kills_back_and_retries_put_back_faults():
    s = FaultSchedule(1, ("kill_source", "abort_client"), 1.0)
    f = s.draw(allow_kill=False)
    assert f is not None and f.kind == "abort_client"
    assert s.draw(allow_kill=False) is None   # the kill waits
    kill = s.draw(allow_kill=True)
    assert kill is not None and kill.kind == "kill_source"
    s.put_back(f)
    assert s.draw(allow_kill=False) == f
    assert FaultSchedule(1, FAULT_KINDS, 0.0).draw() is None


class FakeActions:
    def __init__(self, can_kill: bool = True) -> None:
        self.calls: list[tuple] = []
        self._can_kill = can_kill

    def can_kill(self) -> bool:
        return self._can_kill

    async def kill(self, instance_id, engine_only):
        self.calls.append(("kill", instance_id, engine_only))

    async def arm_transfer(self, request_id, instance_id, kind):
        self.calls.append(("arm", instance_id, kind))

    async def abort_request(self, request_id):
        self.calls.append(("abort", request_id))

    async def exhaust(self, request_id, instance_id):
        self.calls.append(("exhaust", instance_id))


def _migrate(inj: FaultInjector, rid: str, points: list[FaultPoint]) -> None:
    async def go():
        for p in points:
            await inj(p, FaultContext(rid, "a", "b", 0))
        await asyncio.sleep(0.15)  # delayed faults
        await inj.finished(rid, "done")
    asyncio.run(go())


def test_injector_fires_each_kind_at_its_point_against_the_right_instance():
    actions = FakeActions()
    inj = FaultInjector(FaultSchedule(5, FAULT_KINDS, 1.0), actions)
    steps = [FaultPoint.BEFORE_RESERVE, FaultPoint.PRECOPY, FaultPoint.STOP, FaultPoint.COMMIT]
    for k in range(40):
        _migrate(inj, f"r{k}", steps)
    kinds = {r.kind for r in inj.fired()}
    assert kinds == set(FAULT_KINDS)
    assert ("kill", "b", False) in actions.calls and ("kill", "a", True) in actions.calls
    assert ("arm", "b", "drop") in actions.calls and ("arm", "b", "stall") in actions.calls
    assert ("exhaust", "b") in actions.calls
    for r in inj.fired():
        assert FaultPoint(r.step) in APPLICABLE[r.kind] and r.outcome == "done"


def test_injector_puts_back_faults_that_never_fired():
    inj = FaultInjector(FaultSchedule(5, ("abort_client",), 1.0), FakeActions())
    _migrate(inj, "r0", [FaultPoint.BEFORE_RESERVE])   # ended before its point (maybe)
    fired = len(inj.fired())
    for k in range(1, 12):
        _migrate(inj, f"r{k}", [FaultPoint.BEFORE_RESERVE, FaultPoint.PRECOPY, FaultPoint.STOP,
                                FaultPoint.COMMIT])
    assert len(inj.fired()) == fired + 11
    inj.enabled = False
    _migrate(inj, "x", [FaultPoint.BEFORE_RESERVE, FaultPoint.STOP])
    assert len(inj.fired()) == fired + 11


# -- invariants ----------------------------------------------------------------------
def test_clean_facts_pass():
    assert check_all([make_facts(), make_facts(kind="random", reference=None, streaming=False)],
                     [InstanceFacts("i0", 100, 100)], failover=True) == []


@pytest.mark.parametrize("change,check", [
    (dict(finish_count=2), "completed_once"),
    (dict(finish_count=0), "completed_once"),
    (dict(final_deltas=2), "completed_once"),
    (dict(streamed=[5, 6, 6, 7, 8]), "stream_exact"),       # a repeated token
    (dict(streamed=[5, 7, 8]), "stream_exact"),             # a lost token
    (dict(output=[5, 6, 7], streamed=[5, 6, 7]), "stream_exact"),
    (dict(output=[5, 6, 7, 9], streamed=[5, 6, 7, 9]), "reference"),
    (dict(finish_reason="abort"), "finish_reason"),
    (dict(finish_reason="error", error="instance lost"), "finish_reason"),
    (dict(reference=None), "reference"),
])
def test_each_violation_is_caught(change, check):
    assert check in {v.check for v in check_request(make_facts(**change), failover=True)}


def test_allowed_ends():
    aborted = make_facts(finish_reason="abort", client_aborted=True, output=[5, 6], streamed=[5, 6])
    assert check_request(aborted, failover=True) == []
    diverged = make_facts(finish_reason="abort", client_aborted=True, output=[5, 9], streamed=[5, 9])
    assert {v.check for v in check_request(diverged, failover=True)} == {"reference"}
    lost = make_facts(finish_reason="error", error="instance i1 lost", output=[5], streamed=[5])
    assert check_request(lost, failover=False) == []
    assert check_request(make_facts(finish_reason="error", error=None, output=[5], streamed=[5]),
                         failover=False)


def test_host_and_block_violations():
    vs = check_all([], [InstanceFacts("i0", 100, 99, ["k#0"]), InstanceFacts("i1", 100, None)],
                   failover=True, leaked_segments=["llumigrate-1-00"], orphans=[42],
                   missing_faults=["drop_transfer"], hung=["stress-3"])
    assert {v.check for v in vs} == {"free_blocks", "shm_segments", "orphan_processes",
                                     "fault_coverage", "completed_once"}
    assert "k#0" in next(v.detail for v in vs if v.subject == "i0")


def test_planted_duplicate_is_caught():
    facts = [make_facts(), make_facts(request_id="stress-1", streaming=False, streamed=[])]
    assert plant_duplicate(facts) == "stress-0"
    assert {v.check for v in check_all(facts, [], failover=True)} == {"stream_exact"}
    quiet = [make_facts(streaming=False, streamed=[])]
    plant_duplicate(quiet)
    assert {v.check for v in check_all(quiet, [], failover=True)} == {"stream_exact", "reference"}


# -- report --------------------------------------------------------------------------
def test_report_helpers():
    assert percentile([], 0.5) is None and percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert abort_class("i2 has 0 free blocks; request needs 9") == "destination_full"
    assert abort_class("pre-copy load failed (error) (during precopy)") == "kv_load_failed"
    assert abort_class("client aborted the request") == "client_abort"
    assert abort_class("agent connection lost") == "instance_lost"
    assert abort_class("???") == "other"
