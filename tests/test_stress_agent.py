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


def _delta(t: int, logprobs=None, finished: str | None = None):
    return SimpleNamespace(token_ids=[t], finished=finished is not None, finish_reason=finished,
                           stop_reason=None, kv_params=None, logprobs=logprobs)


class StoppableRuntime:
    """Streams two tokens, then waits; once stopped (the scheduler's cap via
    `FakeCommands`, or the engine-core-only abort) it streams `after_stop`
    (the step the stop did not reach; with a cap, its last delta ends the
    request as "length"); `abort` cuts the stream the way AsyncLLM's does
    (the generator is cancelled)."""

    def __init__(self, after_stop: tuple = ()) -> None:
        self.llm = SimpleNamespace(errored=False)
        self.after_stop = after_stop
        self.stopped = asyncio.Event()
        self.aborted = asyncio.Event()
        self.engine_aborts = 0

    async def generate(self, rid, prompt, sp, priority):
        for t in (5, 6):
            yield _delta(t)
        await self.stopped.wait()
        for d in self.after_stop:
            yield d
            if d.finished:
                return
        await self.aborted.wait()
        raise asyncio.CancelledError

    async def abort_in_engine_core(self, rid):
        self.engine_aborts += 1
        self.stopped.set()
        return True

    async def abort(self, rid):
        self.aborted.set()

    async def rpc(self, method, *args):
        assert method == "llumigrate_sealed"
        return None  # never held: the engine finished the request instead


class FakeCommands:
    """The scheduler's `stop` command: caps (and so ends the stream) when `works`."""

    def __init__(self, rt: StoppableRuntime, works: bool = True, ends: bool = True) -> None:
        self.rt, self.works, self.ends = rt, works, ends
        self.calls: list[dict] = []

    async def call(self, msg, timeout=1.0):
        self.calls.append(msg)
        if self.works and self.ends:
            self.rt.stopped.set()
        return {"capped": self.works}


async def _streaming_agent(rt, notify, commands=None) -> tuple[Agent, FakeConn]:
    """An agent streaming request r#0 (prompt 1 2 3) once its first two tokens came."""
    agent, conn = Agent("i0", rt, notify, commands), FakeConn()
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


HELD = {"kind": "held", "key": "r#0", "tokens": [1, 2, 3, 5, 6, 7], "num_prompt_tokens": 3,
        "num_computed_tokens": 5, "num_blocks": 1}


def _stop_with(rt, commands, held: dict | None, *, after_stop_wait: bool = True):
    """Run a stop of r#0 against `rt` and `commands`; the engine pushes `held`
    once the stream reached the stop's step. Returns (reply, out events, rt)."""
    from llumigrate.engine.notify import NotifyListener

    async def go():
        notify = NotifyListener()
        agent, conn = await _streaming_agent(rt, notify, commands)
        stop = asyncio.ensure_future(agent.rpc_stop(conn, "r#0", timeout=2))
        if after_stop_wait:
            await rt.stopped.wait()
        if held is not None:
            notify._deliver(dict(held))
        res = await stop
        await notify.close()
        return res, [e for e in conn.events if e["event"] == "out"]
    return asyncio.run(go())


def test_capped_stop_ends_at_a_step_and_its_length_end_is_not_passed_on():
    """With the scheduler's cap the request ends as "length" at the next step;
    the seal says it was the stop: the client gets the token, not the end."""
    lp = [[7, -0.5, 1]]
    rt = StoppableRuntime(after_stop=(_delta(7, [lp], finished="length"),))
    commands = FakeCommands(rt)
    res, outs = _stop_with(rt, commands, HELD)
    assert commands.calls == [{"kind": "stop", "key": "r#0"}] and rt.engine_aborts == 0
    assert res["sealed"]["tokens"] == [1, 2, 3, 5, 6, 7]
    assert [t for e in outs for t in e["tokens"]] == [5, 6, 7] and outs[-1]["logprobs"] == [lp]
    assert not any(e["finished"] for e in outs) and not rt.aborted.is_set()


def test_capped_stop_that_met_a_real_length_end_passes_it_on():
    rt = StoppableRuntime(after_stop=(_delta(7, finished="length"),))
    res, outs = _stop_with(rt, FakeCommands(rt), {**HELD, "finished": "length", "stop_reason": None})
    assert res == {"finished": "length"}
    assert [t for e in outs for t in e["tokens"]] == [5, 6, 7]
    assert outs[-1]["finished"] and outs[-1]["reason"] == "length"


def test_uncapped_stop_aborts_in_the_engine_core():
    """Not running there (the command says so): abort instead."""
    rt = StoppableRuntime(after_stop=(_delta(7),))
    commands = FakeCommands(rt, works=False)
    res, outs = _stop_with(rt, commands, HELD)
    assert rt.engine_aborts == 1 and rt.aborted.is_set() and "sealed" in res
    assert [t for e in outs for t in e["tokens"]] == [5, 6, 7]


def test_capped_stop_that_does_not_end_falls_back_to_an_abort(monkeypatch):
    """Capped but never reaching its step (vLLM preempted it): after
    STOP_AT_STEP_S the agent aborts it in the engine core."""
    import llumigrate.agent.source as source
    monkeypatch.setattr(source, "STOP_AT_STEP_S", 0.2)
    rt = StoppableRuntime()
    res, outs = _stop_with(rt, FakeCommands(rt, ends=False), {**HELD, "tokens": [1, 2, 3, 5, 6]})
    assert rt.engine_aborts == 1 and res["sealed"]["tokens"] == [1, 2, 3, 5, 6]
    assert [t for e in outs for t in e["tokens"]] == [5, 6]
