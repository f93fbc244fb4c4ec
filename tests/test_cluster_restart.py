"""Restarting lost local instances: the pure policy, and `Cluster`'s restart
loop over fake agents (the real-engine case is in tests/test_serve.py)."""

from __future__ import annotations

import asyncio

import pytest

from llumigrate.controller.cluster import Cluster
from llumigrate.controller.listener import ClusterListener
from llumigrate.controller.restart import CrashRecord, RestartPolicy
from llumigrate.errors import ConfigError, InstanceStartFailed


def test_backoff_doubles_up_to_its_cap():
    p = RestartPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert [p.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    with pytest.raises(ConfigError):
        RestartPolicy(backoff_s=2.0, max_backoff_s=1.0)
    with pytest.raises(ConfigError):
        RestartPolicy(max_failed_starts=0)


def test_crashes_are_forgotten_once_up_long_enough():
    p = RestartPolicy(stable_s=100.0, max_failed_starts=2)
    r = CrashRecord()
    r.on_up(0.0)
    assert r.on_lost(10.0, p) == 1
    r.on_up(11.0)
    assert r.on_lost(50.0, p) == 2          # up 39 s: a streak
    assert r.on_failed_start(p) is False and r.crashes == 3
    assert r.on_failed_start(p) is True     # two failed starts in a row: give up
    r.on_up(60.0)
    assert r.failed_starts == 0
    assert r.on_lost(200.0, p) == 1         # up 140 s: the streak is over


class FakeAgent:
    """What `Cluster` uses of an `Instance` it started."""

    def __init__(self, instance_id: str, generation: int) -> None:
        self.instance_id, self.generation = instance_id, generation
        self.up, self.draining, self.removed = True, False, False
        self.process = object()          # a local agent
        self.info: dict = {"generation": generation}
        self.closed = False

    async def connect(self, on_event, on_lost, token=None) -> None:
        self.on_lost = on_lost

    async def close(self, timeout: float = 30.0) -> None:
        self.closed, self.up = True, False

    async def release_shm(self, wait_s: float = 10.0) -> list[str]:
        return []


class Recorder(ClusterListener):
    def __init__(self) -> None:
        self.ups: list[tuple[str, int]] = []
        self.downs: list[tuple[str, str]] = []

    def on_instance_up(self, instance_id, info):
        self.ups.append((instance_id, info["generation"]))

    def on_instance_down(self, instance_id, reason):
        self.downs.append((instance_id, reason))


def _cluster(fail_starts: int = 0, first_ok: bool = False,
             **policy) -> tuple[Cluster, Recorder, list[int]]:
    """A cluster whose agent starts fail the first `fail_starts` times
    (`first_ok`: not counting the first one, spawn's, which always works)."""
    rec = Recorder()
    c = Cluster("unused-model", 0, listener=rec,
                restart=RestartPolicy(backoff_s=0.01, max_backoff_s=0.04, **policy))
    starts: list[int] = []

    async def start_agent(instance_id, env):
        starts.append(len(starts))
        if len(starts) <= fail_starts:
            raise InstanceStartFailed(instance_id, "exit status 1", "ValueError: no room", "/x/i0.log")
        return FakeAgent(instance_id, len(starts))
    c._start_agent = _first_ok(start_agent) if first_ok else start_agent  # type: ignore[method-assign]
    return c, rec, starts


def _first_ok(start_agent):
    calls = []

    async def wrapped(instance_id, env):
        calls.append(1)
        if len(calls) == 1:
            return FakeAgent(instance_id, 0)
        return await start_agent(instance_id, env)
    return wrapped


async def _lose_once(c: Cluster) -> FakeAgent:
    """Spawn i0, lose it, and let its restart run its course."""
    first = await c.spawn("i0")
    c._on_lost(first, "connection lost")
    await _settle(c)
    return first


async def _settle(c: Cluster) -> None:
    for _ in range(200):
        if not c._tasks:
            return
        await asyncio.sleep(0.01)


def test_a_lost_local_instance_comes_back_under_its_id():
    async def go():
        c, rec, starts = _cluster()
        return c, rec, await _lose_once(c)
    c, rec, first = asyncio.run(go())
    assert first.closed                              # reaped, its shared memory released
    assert c.instances["i0"] is not first and c.instances["i0"].up
    assert rec.ups == [("i0", 1), ("i0", 2)] and rec.downs == [("i0", "connection lost")]


def test_a_start_that_keeps_failing_is_given_up_and_said():
    async def go():
        c, rec, starts = _cluster(fail_starts=10, first_ok=True, max_failed_starts=3)
        await _lose_once(c)
        return c, rec, starts
    c, rec, starts = asyncio.run(go())
    assert len(starts) == 3                          # three failed restarts, then no more
    assert c.instances["i0"].up is False
    assert rec.downs[-1] == ("i0", "not restarted: ValueError: no room")


def test_starts_that_fail_are_retried_until_one_works():
    async def go():
        c, rec, starts = _cluster(fail_starts=2, first_ok=True)
        await _lose_once(c)
        return c, rec, starts
    c, rec, starts = asyncio.run(go())
    assert len(starts) == 3                          # two failed restarts, then one that works
    assert c.instances["i0"].up and rec.ups == [("i0", 0), ("i0", 3)]


@pytest.mark.parametrize("case", ["draining", "remote", "no_policy",
                                  "drained_meanwhile", "removed_meanwhile"])
def test_what_is_not_restarted(case):
    """A draining or remote instance, or none without a policy; nor one that
    is drained or removed while its restart waits out the backoff."""
    async def go():
        c, rec, starts = _cluster()
        c.restart = None if case == "no_policy" else RestartPolicy(backoff_s=0.2)
        first = await c.spawn("i0")
        first.draining = case == "draining"
        if case == "remote":
            first.process = None
        c._on_lost(first, "connection lost")
        await asyncio.sleep(0.05)                    # the restart is waiting now
        if case == "drained_meanwhile":
            c.drain("i0")
        if case == "removed_meanwhile":
            await c.remove_instance("i0")
        await _settle(c)
        return c, starts
    c, starts = asyncio.run(go())
    assert starts == [0]
    assert "i0" not in c.instances or c.instances["i0"].up is False


def test_closing_during_a_restart_closes_the_agent_it_started():
    started: list[FakeAgent] = []

    class SlowToConnect(FakeAgent):
        async def connect(self, on_event, on_lost, token=None) -> None:
            await asyncio.sleep(10)

    async def go():
        c, rec, starts = _cluster()
        first = await c.spawn("i0")

        async def start_agent(instance_id, env):
            started.append(SlowToConnect(instance_id, 2))
            return started[-1]
        c._start_agent = start_agent  # type: ignore[method-assign]
        c._on_lost(first, "connection lost")
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.01)
        await c.close()
        return c
    c = asyncio.run(go())
    assert len(started) == 1 and started[0].closed
    assert c.instances["i0"].generation == 1          # the lost one, never replaced
