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
                              kv_params=None, logprobs=None)
        self.llm.errored = True
        raise DeadEngine("EngineCore died")


class FakeConn:
    def __init__(self) -> None:
        self.events: list[dict] = []

    async def push(self, event: str, **fields) -> None:
        self.events.append({"event": event, **fields})

    push_batched = push


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


def _delta(t: int, logprobs=None):
    return SimpleNamespace(token_ids=[t], finished=False, finish_reason=None, stop_reason=None,
                           kv_params=None, logprobs=logprobs)


class StoppableRuntime:
    """Streams two tokens, then waits; after `stop` (the engine-core-only
    abort) it streams `after_stop` (the step the abort did not reach);
    `abort` cuts the stream the way AsyncLLM's does (the generator is
    cancelled)."""

    def __init__(self, after_stop: tuple = ()) -> None:
        self.llm = SimpleNamespace(errored=False)
        self.after_stop = after_stop
        self.stopped = asyncio.Event()
        self.aborted = asyncio.Event()

    async def generate(self, rid, prompt, sp, priority):
        for t in (5, 6):
            yield _delta(t)
        await self.stopped.wait()
        for d in self.after_stop:
            yield d
        await self.aborted.wait()
        raise asyncio.CancelledError

    async def stop(self, rid):
        self.stopped.set()
        return True

    async def abort(self, rid):
        self.aborted.set()

    async def rpc(self, method, *args):
        assert method == "llumigrate_sealed"
        return None  # never held: the engine finished the request instead


async def _streaming_agent(rt, notify) -> tuple[Agent, FakeConn]:
    """An agent streaming request r#0 (prompt 1 2 3) once its first two tokens came."""
    agent, conn = Agent("i0", rt, notify), FakeConn()
    req = _Req("r#0", conn)
    agent.reqs["r#0"] = req
    req.task = asyncio.ensure_future(agent._stream(req, [1, 2, 3], None, 0))
    while req.num_tokens < 2:
        await asyncio.sleep(0.01)
    return agent, conn


def test_request_finishing_in_the_step_its_stop_lands_gets_its_last_tokens_and_finish():
    """The stop's abort and the request's own end (max_tokens) land in one
    engine step: the engine reports the real finish with every token; the
    agent delivers the tokens the abort kept from the stream and the finish,
    and tells the controller there is nothing to migrate."""
    from llumigrate.engine.notify import NotifyListener

    async def go():
        notify = NotifyListener()
        agent, conn = await _streaming_agent(StoppableRuntime(), notify)
        # What the scheduler half pushes for a tracked request that finished
        # for real: the prompt, every output token, and the reason.
        notify._deliver({"kind": "held", "key": "r#0", "tokens": [1, 2, 3, 5, 6, 7, 8],
                         "num_prompt_tokens": 3, "finished": "length", "stop_reason": None})
        res = await agent.rpc_stop(conn, "r#0", timeout=2)
        await notify.close()
        return res, conn.events
    res, events = asyncio.run(go())
    assert res == {"finished": "length"}
    outs = [e for e in events if e["event"] == "out"]
    assert [t for e in outs for t in e["tokens"]] == [5, 6, 7, 8]
    assert outs[-1]["finished"] and outs[-1]["reason"] == "length"
    assert not any(e["finished"] for e in outs[:-1])


def test_stop_delivers_the_last_steps_tokens_with_logprobs_before_its_reply():
    """The stop aborts in the engine core only: the step it did not reach
    still streams its token (with logprobs); the agent sends it to the client
    before the sealed reply, so nothing is left to recover without logprobs."""
    from llumigrate.engine.notify import NotifyListener

    async def go():
        notify = NotifyListener()
        lp = [[7, -0.5, 1], [9, -1.5, 2]]
        rt = StoppableRuntime(after_stop=(_delta(7, [lp]),))
        agent, conn = await _streaming_agent(rt, notify)
        stop = asyncio.ensure_future(agent.rpc_stop(conn, "r#0", timeout=2))
        await rt.stopped.wait()
        notify._deliver({"kind": "held", "key": "r#0", "tokens": [1, 2, 3, 5, 6, 7],
                         "num_prompt_tokens": 3, "num_computed_tokens": 5, "num_blocks": 1})
        res = await stop
        await notify.close()
        return res, conn.events, rt, lp
    res, events, rt, lp = asyncio.run(go())
    assert res["sealed"]["tokens"] == [1, 2, 3, 5, 6, 7]
    assert rt.aborted.is_set()  # the stream was ended after it caught up
    outs = [e for e in events if e["event"] == "out"]
    assert [t for e in outs for t in e["tokens"]] == [5, 6, 7]
    assert outs[-1]["logprobs"] == [lp] and not any(e["finished"] for e in outs)
