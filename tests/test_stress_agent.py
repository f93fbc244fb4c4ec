"""The agent against a fake engine core (no engine): an agent whose engine
died goes down instead of failing each request (so controllers fail its
requests over), and the source side of a stop delivers exactly the engine's
outputs up to the stop, withholding only the stop's own end."""

from __future__ import annotations

import asyncio

import numpy as np
from factories import make_output

from llumigrate.agent.server import Agent, _Req
from llumigrate.engine.vllm_api import EngineCoreOutputs, decode_outputs


class DeadEngine(Exception):
    pass


class FakeRuntime:
    """Outputs come from `queue` (an exception there: the engine died)."""

    def __init__(self) -> None:
        self.errored = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aborted: list[str] = []

    def emit(self, *outputs) -> None:
        self.queue.put_nowait(EngineCoreOutputs(outputs=list(outputs)))

    async def outputs(self) -> EngineCoreOutputs:
        item = await self.queue.get()
        if isinstance(item, Exception):
            self.errored = True
            raise item
        return item

    async def abort(self, ids) -> None:
        self.aborted.extend(ids)

    async def rpc(self, method, *args):
        assert method == "llumigrate_sealed"
        return None  # never held: the engine finished the request instead


class FakeConn:
    def __init__(self) -> None:
        self.events: list[dict] = []

    async def push(self, event: str, **fields) -> None:
        self.events.append({"event": event, **fields})

    push_batched = push

    def outputs(self) -> list:
        """Every engine output pushed, in order."""
        return [o for e in self.events if e["event"] == "out" for o in decode_outputs(e["data"]).outputs]


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def _logprobs(token: int, alt: int) -> object:
    from vllm.v1.outputs import LogprobsLists
    return LogprobsLists(np.array([[token, alt]]), np.array([[-0.5, -1.5]], dtype=np.float32), np.array([1]))


def test_request_lost_with_its_engine_is_not_reported_failed_and_agent_goes_down():
    async def go():
        rt = FakeRuntime()
        agent, conn = Agent("i0", rt), FakeConn()
        agent.server.connections.add(conn)
        agent.reqs["r"] = _Req("r", conn)
        rt.emit(make_output("r", [7]))
        rt.queue.put_nowait(DeadEngine("EngineCore died"))
        await asyncio.wait_for(agent._pump_outputs(), 2)
        return agent, conn
    agent, conn = asyncio.run(go())
    outs = conn.outputs()
    assert _tokens(outs) == [7] and not any(o.finish_reason is not None for o in outs)  # no error end
    assert agent.engine_dead and agent.shutdown_event.is_set()


def test_watchdog_notices_a_dead_engine():
    async def go():
        rt = FakeRuntime()
        agent = Agent("i0", rt)
        watch = asyncio.ensure_future(agent._watch_engine())
        await asyncio.sleep(0.05)
        assert not agent.shutdown_event.is_set()
        rt.errored = True
        await asyncio.wait_for(watch, 2)
        return agent
    agent = asyncio.run(go())
    assert agent.engine_dead and agent.shutdown_event.is_set()


class StoppableRuntime(FakeRuntime):
    """Has emitted tokens 5 and 6 of request r; once stopped (the scheduler's
    cap via `FakeCommands`, or an engine-core abort) it emits `after_stop`
    (the step the stop did not reach; with a cap, its last output ends the
    request as "length")."""

    def __init__(self, after_stop: tuple = ()) -> None:
        super().__init__()
        self.after_stop = after_stop
        self.stopped = asyncio.Event()
        self.engine_aborts = 0

    def stop(self) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            if self.after_stop:
                self.emit(*self.after_stop)

    async def abort(self, ids) -> None:
        await super().abort(ids)
        self.engine_aborts += 1
        self.stop()


class FakeCommands:
    """The scheduler's `stop` command: caps (and so ends the request) when `works`."""

    def __init__(self, rt: StoppableRuntime, works: bool = True, ends: bool = True) -> None:
        self.rt, self.works, self.ends = rt, works, ends
        self.calls: list[dict] = []

    async def call(self, msg, timeout=1.0):
        self.calls.append(msg)
        if self.works and self.ends:
            self.rt.stop()
        return {"capped": self.works}


async def _streaming_agent(rt, notify, commands=None) -> tuple[Agent, FakeConn]:
    """An agent running request r (prompt 1 2 3) once its first two tokens came."""
    agent, conn = Agent("i0", rt, notify, commands), FakeConn()
    agent.server.connections.add(conn)
    agent.reqs["r"] = req = _Req("r", conn)
    agent._pump = asyncio.ensure_future(agent._pump_outputs())
    rt.emit(make_output("r", [5]))
    rt.emit(make_output("r", [6]))
    while req.num_tokens < 2:
        await asyncio.sleep(0.01)
    return agent, conn


def test_request_finishing_in_the_step_its_stop_lands_gets_its_last_tokens_and_finish():
    """The stop's abort and the request's own end (max_tokens) land in one
    engine step: the engine reports the real finish with every token; the
    agent delivers the tokens the outputs did not carry and the finish, and
    tells the controller there is nothing to migrate."""
    from llumigrate.engine.notify import NotifyListener

    async def go():
        notify = NotifyListener()
        agent, conn = await _streaming_agent(StoppableRuntime(), notify)
        # What the scheduler half pushes for a tracked request that finished
        # for real: the prompt, every output token, and the reason.
        notify._deliver({"kind": "held", "key": "r", "tokens": [1, 2, 3, 5, 6, 7, 8],
                         "num_prompt_tokens": 3, "finished": "length", "stop_reason": None})
        res = await agent.rpc_stop(conn, "r", timeout=2)
        await notify.close()
        return res, conn.outputs(), agent
    res, outs, agent = asyncio.run(go())
    assert res == {"finished": "length"}
    assert _tokens(outs) == [5, 6, 7, 8]
    assert str(outs[-1].finish_reason) == "length"
    assert not any(o.finish_reason is not None for o in outs[:-1])
    assert "r" not in agent.reqs


def test_stop_delivers_the_last_steps_tokens_with_logprobs_before_its_reply():
    """An engine-core abort lands between steps: the step it did not reach
    still brings its token (with logprobs); the agent sends it to the client
    before the sealed reply, so nothing is left to recover without logprobs."""
    from llumigrate.engine.notify import NotifyListener

    async def go():
        notify = NotifyListener()
        last = make_output("r", [7])
        last.new_logprobs = _logprobs(7, 9)
        rt = StoppableRuntime(after_stop=(last,))
        agent, conn = await _streaming_agent(rt, notify)
        stop = asyncio.ensure_future(agent.rpc_stop(conn, "r", timeout=2))
        await rt.stopped.wait()
        notify._deliver({"kind": "held", "key": "r", "tokens": [1, 2, 3, 5, 6, 7],
                         "num_prompt_tokens": 3, "num_computed_tokens": 5, "num_blocks": 1})
        res = await stop
        await notify.close()
        return res, conn.outputs(), rt
    res, outs, rt = asyncio.run(go())
    assert res["sealed"]["tokens"] == [1, 2, 3, 5, 6, 7] and rt.aborted == ["r"]
    assert _tokens(outs) == [5, 6, 7]
    assert outs[-1].new_logprobs.logprob_token_ids.tolist() == [[7, 9]]
    assert not any(o.finish_reason is not None for o in outs)


HELD = {"kind": "held", "key": "r", "tokens": [1, 2, 3, 5, 6, 7], "num_prompt_tokens": 3,
        "num_computed_tokens": 5, "num_blocks": 1}


def _stop_with(rt, commands, held: dict | None, *, after_stop_wait: bool = True):
    """Run a stop of r against `rt` and `commands`; the engine pushes `held`
    once the outputs reached the stop's step. Returns (reply, outputs)."""
    from llumigrate.engine.notify import NotifyListener

    async def go():
        notify = NotifyListener()
        agent, conn = await _streaming_agent(rt, notify, commands)
        stop = asyncio.ensure_future(agent.rpc_stop(conn, "r", timeout=2))
        if after_stop_wait:
            await rt.stopped.wait()
        if held is not None:
            notify._deliver(dict(held))
        res = await stop
        await notify.close()
        return res, conn.outputs()
    return asyncio.run(go())


def _length_end(token: int, logprobs=None):
    o = make_output("r", [token], "length")
    o.new_logprobs = logprobs
    return o


def test_capped_stop_ends_at_a_step_and_its_length_end_is_not_passed_on():
    """With the scheduler's cap the request ends as "length" at the next step;
    the seal says it was the stop: the client gets the token, not the end."""
    rt = StoppableRuntime(after_stop=(_length_end(7, _logprobs(7, 9)),))
    commands = FakeCommands(rt)
    res, outs = _stop_with(rt, commands, HELD)
    assert commands.calls == [{"kind": "stop", "key": "r"}] and rt.engine_aborts == 0
    assert res["sealed"]["tokens"] == [1, 2, 3, 5, 6, 7] and res["stopped_by"] == "step"
    assert _tokens(outs) == [5, 6, 7] and outs[-1].new_logprobs.logprob_token_ids.tolist() == [[7, 9]]
    assert not any(o.finish_reason is not None for o in outs)


def test_capped_stop_that_met_a_real_length_end_passes_it_on():
    rt = StoppableRuntime(after_stop=(_length_end(7),))
    res, outs = _stop_with(rt, FakeCommands(rt), {**HELD, "finished": "length", "stop_reason": None})
    assert res == {"finished": "length"}
    assert _tokens(outs) == [5, 6, 7] and str(outs[-1].finish_reason) == "length"


def test_uncapped_stop_aborts_in_the_engine_core():
    """Not running there (the command says so): abort instead."""
    rt = StoppableRuntime(after_stop=(make_output("r", [7]),))
    commands = FakeCommands(rt, works=False)
    res, outs = _stop_with(rt, commands, HELD)
    assert rt.engine_aborts == 1 and "sealed" in res and res["stopped_by"] == "abort"
    assert _tokens(outs) == [5, 6, 7]


def test_capped_stop_that_does_not_end_falls_back_to_an_abort(monkeypatch):
    """Capped but never reaching its step (vLLM preempted it): after
    STOP_AT_STEP_S the agent aborts it in the engine core."""
    import llumigrate.agent.source as source
    monkeypatch.setattr(source, "STOP_AT_STEP_S", 0.2)
    rt = StoppableRuntime()
    res, outs = _stop_with(rt, FakeCommands(rt, ends=False), {**HELD, "tokens": [1, 2, 3, 5, 6]})
    assert rt.engine_aborts == 1 and res["sealed"]["tokens"] == [1, 2, 3, 5, 6]
    assert _tokens(outs) == [5, 6]


def test_a_replay_checks_and_drops_the_tokens_its_client_has():
    """A seeded failover replay re-samples what the client already got: the
    agent sends only what follows, and ends a replay that diverges as an error."""
    async def go(replayed: list[list[int]]):
        rt = FakeRuntime()
        agent, conn = Agent("i0", rt), FakeConn()
        agent.server.connections.add(conn)
        agent.reqs["r#1"] = _Req("r#1", conn, skip=[5, 6, 7])
        for tokens in replayed:
            rt.emit(make_output("r#1", tokens))
        await agent._route(await rt.outputs())
        for _ in replayed[1:]:
            await agent._route(await rt.outputs())
        await asyncio.sleep(0)
        return conn.outputs(), rt
    outs, _ = asyncio.run(go([[5, 6], [7, 8, 9]]))
    assert _tokens(outs) == [8, 9]
    outs, rt = asyncio.run(go([[5, 4]]))
    assert _tokens(outs) == [] and str(outs[-1].finish_reason) == "error" and rt.aborted == ["r#1"]


def test_outputs_of_a_frontend_owned_request_go_to_it_under_its_own_id():
    """When a frontend process of the serve owns the stream, it gets the
    outputs (renamed to the request's id, as the hop it moved to is named
    otherwise) and the controller only their tokens."""
    async def go():
        rt = FakeRuntime()
        agent, ctl, front = Agent("i0", rt), FakeConn(), FakeConn()
        front.closed = ctl.closed = False
        agent.server.connections.update({ctl, front})
        await agent.rpc_own(front, "f1")
        agent.reqs["r#2"] = _Req("r#2", ctl, owner=agent.owners["f1"], stream="r")
        rt.emit(make_output("r#2", [4, 5]), make_output("r#2", [6], "length"))
        await agent._route(await rt.outputs())
        return ctl, front
    ctl, front = asyncio.run(go())
    assert [(o.request_id, list(o.new_token_ids)) for o in front.outputs()] == [("r", [4, 5]), ("r", [6])]
    assert [e["items"] for e in ctl.events if e["event"] == "progress"] == \
        [[["r#2", [4, 5], None], ["r#2", [6], "length"]]]
    assert ctl.outputs() == []


def test_a_frontend_puts_a_moved_requests_outputs_in_order():
    """A moved request's first outputs from its new agent may reach the
    frontend process before the last ones from its old agent (another
    connection): their positions put them back in order."""
    from llumigrate.serve.remote_client import StreamOrder
    order = StreamOrder()
    order.start("r")
    got = [o for o, pos in ((make_output("r", [1, 2]), 0), (make_output("r", [5]), 4),
                            (make_output("r", [6], "length"), 5), (make_output("r", [3, 4]), 2))
           for o in order.arrived(o, pos)]
    assert [t for o in got for t in o.new_token_ids] == [1, 2, 3, 4, 5, 6]
    assert str(got[-1].finish_reason) == "length" and "r" not in order.next and "r" not in order.early
    assert order.arrived(make_output("other", [9]), 3)[0].new_token_ids == [9]   # not ordered here
