"""A long-running cluster forgets old finished requests: it keeps the latest
`retain_finished` of them findable and nothing more (fake agents)."""

from __future__ import annotations

import asyncio

import pytest
from factories import make_core, make_output
from test_cluster_failover import FakeInstance

from llumigrate.controller.cluster import Cluster
from llumigrate.engine.vllm_api import EngineCoreOutputs, encode
from llumigrate.errors import ConfigError, RequestNotFound


def _out(c: Cluster, engine_rid: str, tokens: list[int], reason: str | None = None) -> None:
    """An agent's output event for engine request `engine_rid`."""
    frame = EngineCoreOutputs(outputs=[make_output(engine_rid, tokens, reason)])
    c._on_event(c.instances["i0"], {"event": "out", "data": encode(frame)})


def _finish(c: Cluster, rid: str) -> None:
    """The engine's last output event for `rid`'s current hop."""
    _out(c, c.requests[rid].engine_rid, [7], "length")


async def _submit(c: Cluster, prompt: list[int], max_tokens: int, request_id: str, **kw):
    return await c.submit_core(make_core(request_id, prompt, {"max_tokens": max_tokens}), **kw)


def test_only_the_latest_finished_requests_are_kept():
    async def go():
        c = Cluster("unused-model", 0, retain_finished=3)
        c.instances = {"i0": FakeInstance("i0", True)}
        finished_order = []
        c.listener.on_finished = lambda h: finished_order.append(h.request_id)
        handles = [await _submit(c, [1, 2, 3], 1, f"r{k}") for k in range(6)]
        for k in (0, 1, 2, 3, 4):
            _finish(c, f"r{k}")
        return c, handles, finished_order
    c, handles, finished_order = asyncio.run(go())
    assert finished_order == ["r0", "r1", "r2", "r3", "r4"]      # the listener hears every finish
    assert sorted(c.requests) == ["r2", "r3", "r4", "r5"]          # 3 finished kept, r5 runs
    assert c.get_request("r2").finished and not c.get_request("r5").finished
    with pytest.raises(RequestNotFound):
        c.get_request("r0")
    assert set(c._routes) == {handles[5].engine_rid}              # only the running hop is routed
    assert all(h.finished and h.output_token_ids == [7] for h in handles[:5])  # callers keep theirs


def test_a_forgotten_id_may_be_used_again_and_is_not_dropped_twice():
    async def go():
        c = Cluster("unused-model", 0, retain_finished=1)
        c.instances = {"i0": FakeInstance("i0", True)}
        await _submit(c, [1], 1, "a")
        _finish(c, "a")
        await _submit(c, [1], 1, "b")
        _finish(c, "b")                       # forgets the first "a"
        again = await _submit(c, [1], 1, "a")
        _finish(c, "a")                       # forgets "b"; the new "a" is the one kept
        return c, again
    c, again = asyncio.run(go())
    assert list(c.requests) == ["a"] and c.requests["a"] is again


def test_retention_must_not_be_negative():
    with pytest.raises(ConfigError, match="retain_finished"):
        Cluster("unused-model", 0, retain_finished=-1)


def test_a_moved_request_leaves_no_route_behind():
    """Each hop (a migration, failover or rollback) routes its own engine
    request id; the hop it replaces is routed no longer (its events are
    stale), so a request that moved is forgotten as wholly as one that did not."""
    async def go():
        c = Cluster("unused-model", 0, retain_finished=0)
        c.instances = {"i0": FakeInstance("i0", True), "i1": FakeInstance("i1", True)}
        h = await _submit(c, [1, 2], 4, "m", instance="i0")
        first = h.engine_rid
        c._set_hop(h, c.instances["i1"], 1)
        routed = set(c._routes)
        _out(c, first, [5])  # stale: ignored
        _finish(c, "m")
        return c, h, first, routed
    c, h, first, routed = asyncio.run(go())
    assert routed == {h.engine_rid} and first != h.engine_rid
    assert h.output_token_ids == [7] and h.instance_id == "i1"
    assert c.requests == {} and c._routes == {} and c._hop_tokens == {}
