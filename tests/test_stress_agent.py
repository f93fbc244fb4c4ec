"""An agent whose engine died goes down instead of failing each request
(so controllers fail its requests over). Fake runtime, no engine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from llumigrate.agent.server import Agent, _Req


class DeadEngine(Exception):
    pass


class FakeRuntime:
    def __init__(self) -> None:
        self.llm = SimpleNamespace(errored=False)

    async def generate(self, rid, prompt, sp, priority):
        yield SimpleNamespace(token_ids=[7], finished=False, finish_reason=None, stop_reason=None,
                              kv_params=None)
        self.llm.errored = True
        raise DeadEngine("EngineCore died")


class FakeConn:
    def __init__(self) -> None:
        self.events: list[dict] = []

    async def push(self, event: str, **fields) -> None:
        self.events.append({"event": event, **fields})


def test_request_lost_with_its_engine_is_not_reported_failed_and_agent_goes_down():
    async def go():
        agent = Agent("i0", FakeRuntime())
        conn = FakeConn()
        req = _Req("r#0", conn)
        await agent._stream(req, [1, 2, 3], None, 0)
        return agent, conn, req
    agent, conn, req = asyncio.run(go())
    assert [e["tokens"] for e in conn.events] == [[7]]       # no "error" end pushed
    assert agent.engine_dead and agent.shutdown_event.is_set() and req.finished


def test_watchdog_notices_a_dead_engine():
    async def go():
        rt = FakeRuntime()
        agent = Agent("i0", rt)
        watch = asyncio.ensure_future(agent._watch_engine())
        await asyncio.sleep(0.05)
        assert not agent.shutdown_event.is_set()
        rt.llm.errored = True
        await asyncio.wait_for(watch, 2)
        return agent
    agent = asyncio.run(go())
    assert agent.engine_dead and agent.shutdown_event.is_set()
