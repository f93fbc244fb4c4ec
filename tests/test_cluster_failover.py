"""Failover picks another instance when the first one it tries fails too
(two instances going down at once, as under the stress test). Fake agents."""

from __future__ import annotations

import asyncio

import pytest

from llumigrate.controller.cluster import Cluster
from factories import added, make_core, make_handle, make_output
from llumigrate.errors import ConfigError, InstanceLost


class FakeInstance:
    def __init__(self, instance_id: str, works: bool) -> None:
        self.instance_id, self.works = instance_id, works
        self.up, self.draining, self.removed = True, False, False
        self.calls: list[tuple[str, dict]] = []

    async def call(self, method: str, rpc_timeout: float | None = 60.0, **args):
        self.calls.append((method, args))
        if not self.works:
            raise InstanceLost(f"instance {self.instance_id} is going down")
        return {"rid": args.get("rid")}

    async def release_shm(self, wait_s: float = 10.0) -> list[str]:
        return []


def test_failover_tries_the_next_instance_when_one_fails():
    async def go():
        c = Cluster("unused-model", 0)
        c.instances = {"i0": FakeInstance("i0", True), "i1": FakeInstance("i1", False),
                       "i2": FakeInstance("i2", True)}
        c.instances["i0"].up = False      # the instance the request was lost with
        h = make_handle("r", [5, 6, 7], {"temperature": 0.0, "max_tokens": 8}, 0, "i0")
        h.output_token_ids = [9, 9]
        c.requests["r"] = h
        # i1 has fewest requests and the lowest id among the live ones: tried first.
        ok = await c._failover(h)
        return ok, h, c.instances
    ok, h, insts = asyncio.run(go())
    assert ok and h.instance_id == "i2"
    first = insts["i1"].calls[0]
    assert first[0] == "add" and insts["i1"].calls[-1][0] == "abort"
    [(core, tag)] = added(insts["i2"].calls)
    # The same request, its streamed tokens restored as outputs (not folded into the prompt).
    assert core.prompt_token_ids == [5, 6, 7] and core.request_id == h.engine_rid == tag.key
    assert list(tag.output_tokens) == [9, 9] and core.sampling_params.max_tokens == 8


def test_failover_gives_up_when_no_instance_takes_it():
    async def go():
        c = Cluster("unused-model", 0)
        c.instances = {"i0": FakeInstance("i0", True), "i1": FakeInstance("i1", False)}
        c.instances["i0"].up = False
        h = make_handle("r", [5, 6, 7], {"temperature": 0.0, "max_tokens": 8}, 0, "i0")
        c.requests["r"] = h
        return await c._failover(h)
    assert asyncio.run(go()) is False


def test_failover_falls_back_to_its_own_instance_when_it_is_the_only_one_up():
    """A rollback whose resumed hop found its hold gone (the destination's
    final pull had freed it) while every other instance was down: replay on
    the source itself rather than fail the stream (the CI stress failure
    'the resumed request failed on the source')."""
    async def go():
        c = Cluster("unused-model", 0)
        c.instances = {"i0": FakeInstance("i0", True), "i1": FakeInstance("i1", True),
                       "i2": FakeInstance("i2", True)}
        c.instances["i1"].up = c.instances["i2"].up = False
        h = make_handle("r", [5, 6, 7], {"temperature": 0.0, "max_tokens": 8}, 0, "i0")
        h.output_token_ids = [9]
        c.requests["r"] = h
        return await c._failover(h), h, c.instances
    ok, h, insts = asyncio.run(go())
    assert ok and h.instance_id == "i0" and h.num_failovers == 1
    [(core, tag)] = added(insts["i0"].calls)
    assert core.prompt_token_ids == [5, 6, 7] and list(tag.output_tokens) == [9]
    assert not insts["i1"].calls and not insts["i2"].calls


def test_failover_tries_its_own_instance_once_and_only_last():
    async def go():
        c = Cluster("unused-model", 0)
        c.instances = {"i0": FakeInstance("i0", False), "i1": FakeInstance("i1", False)}
        h = make_handle("r", [5, 6, 7], {"temperature": 0.0, "max_tokens": 8}, 0, "i0")
        c.requests["r"] = h
        return await c._failover(h), c.instances
    ok, insts = asyncio.run(go())
    assert ok is False
    assert [m for m, _ in insts["i1"].calls] == ["add", "abort"]
    assert [m for m, _ in insts["i0"].calls] == ["add", "abort"]


def test_rollback_resume_keeps_tokens_the_client_has_beyond_the_seal():
    """The stopped hop was a seeded failover replay that had not caught up
    with what the client already had: resuming from the seal reproduces those
    tokens, which the agent checks and does not send again (`skip`), and none
    is dropped from the record (the CI stress violation: 2 tokens missing
    mid-stream)."""
    from types import SimpleNamespace

    from llumigrate.controller.rollback import RollbackSteps
    from llumigrate.engine.params import SealedRequest

    class Resume(RollbackSteps):
        def _load(self, src_key, num_tokens, *, final):
            return None

    async def go():
        h = make_handle("r", [1, 2, 3], {"temperature": 1.0, "seed": 7, "max_tokens": 8}, 0, "i0")
        h.output_token_ids = [10, 11, 12, 13]
        src = FakeInstance("i0", True)
        r = Resume()
        r.req, r.src, r.dst, r.old_rid = h, src, FakeInstance("i1", True), "r"
        r.m = SimpleNamespace(timeout_for=lambda: 2.0)
        r.sealed = SealedRequest("r", [1, 2, 3, 10, 11], 3, 4, 1, None)
        r.on_hop = lambda req, inst, hop: setattr(req, "hop", hop)
        asyncio.get_running_loop().call_later(  # the resumed hop's first new token (after the skipped)
            0.05, lambda: h.append(make_output(h.engine_rid, [14])))
        await r._resume_on_source()
        return h, src
    h, src = asyncio.run(go())
    [(core, tag)] = added(src.calls)
    assert core.prompt_token_ids == [1, 2, 3] and list(tag.output_tokens) == [10, 11]
    assert core.sampling_params.max_tokens == 8
    assert [a for m, a in src.calls if m == "add"][0]["skip"] == [12, 13]
    assert h.output_token_ids == [10, 11, 12, 13, 14]


def test_an_instance_lost_during_submit_leaves_the_request_to_the_submitter():
    """The instance dies while its generate call is in flight: the call fails
    and the caller may submit again (the stress runner does). Failover must
    not also take over the first handle: one request id finished twice (a
    CI stress violation). A call that succeeded before the loss is failed
    over once the call returns."""
    class Dying(FakeInstance):
        def __init__(self, instance_id: str, cluster: Cluster, fail_call: bool) -> None:
            super().__init__(instance_id, True)
            self.cluster, self.fail_call = cluster, fail_call

        async def call(self, method: str, rpc_timeout: float | None = 60.0, **args):
            if method == "add" and self.up:
                self.cluster._on_lost(self, "connection lost")
                if self.fail_call:
                    raise InstanceLost("connection lost before add")
            return await super().call(method, rpc_timeout, **args)

    async def go(fail_call: bool):
        c = Cluster("unused-model", 0)
        failovers: list[str] = []
        c.listener.on_failover = lambda h, src, dst: failovers.append(dst)
        c.instances = {"i0": Dying("i0", c, fail_call), "i1": FakeInstance("i1", True)}
        try:
            h = await c.submit_core(make_core("r", [1, 2, 3], {"max_tokens": 4}), instance="i0")
        except InstanceLost:
            h = None
        await asyncio.sleep(0.05)
        return h, failovers, dict(c.requests)
    h, failovers, requests = asyncio.run(go(fail_call=True))
    assert h is None and failovers == [] and requests == {}
    h, failovers, requests = asyncio.run(go(fail_call=False))
    assert h is not None and failovers == ["i1"] and h.instance_id == "i1" and requests == {"r": h}


def test_a_request_whose_instances_keep_dying_is_replayed_at_most_max_failovers_times():
    """A request may be what kills its engine (a poison request): replayed
    without end it would take down every instance in turn. With
    max_failovers=1 it is replayed once; when that instance dies too, it
    fails with a clear error and is not sent anywhere else."""
    async def go():
        c = Cluster("unused-model", 0, max_failovers=1)
        c.instances = {i: FakeInstance(i, True) for i in ("i0", "i1", "i2")}
        h = make_handle("r", [5, 6, 7], {"temperature": 0.0, "max_tokens": 8}, 0, "i0")
        c.requests["r"] = h
        c.instances["i0"].up = False
        c._lost_request(h, "instance i0 lost")
        await asyncio.sleep(0.05)
        first_hop = h.instance_id
        c.instances[first_hop].up = False
        c._lost_request(h, f"instance {first_hop} lost")
        await asyncio.sleep(0.05)
        again = await c._failover(h)   # the migration path's failover is held to it too
        return c, h, first_hop, again
    c, h, first_hop, again = asyncio.run(go())
    assert first_hop != "i0" and h.num_failovers == 1
    assert h.finished and h.finish_reason == "error" and "not replayed again" in h.error
    assert again is False
    others = [i for i in ("i1", "i2") if i != first_hop]
    assert not added(c.instances[others[0]].calls)
    with pytest.raises(ConfigError):
        Cluster("unused-model", 0, max_failovers=-1)
