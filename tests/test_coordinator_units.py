"""The coordinator against fake agents (no engine): edge cases of its steps."""

from __future__ import annotations

import asyncio

from llumigrate.controller.coordinator import Coordinator
from factories import make_handle, make_output
from llumigrate.errors import RequestNotFound
from llumigrate.migration.protocol import MigrationConfig


class FakeAgent:
    """Answers the coordinator's calls; `stop` refuses like an agent whose
    request has already finished."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id, self.block_size, self.kv_address = instance_id, 16, ("127.0.0.1", 1)
        self.calls: list[str] = []

    async def call(self, method: str, rpc_timeout: float | None = 60.0, **args):
        self.calls.append(method)
        if method == "info":
            return {"load": {"free_blocks": 100}, "max_model_len": 4096}
        if method == "stop":
            raise RequestNotFound(f"no running request {args['rid']!r} on {self.instance_id}")
        return True


def test_a_request_that_finished_before_the_stop_ends_the_migration_without_rollback():
    """A queued request re-dispatched with nothing to pre-copy goes straight
    to the stop; if it finished (or the client aborted it) on the source
    meanwhile, the source refuses the stop. That is the request's end, not a
    failure: no resume, no failover replay, no hop on the destination; the
    source is untracked and any hold of an aborted request released."""
    async def go():
        h = make_handle("r", list(range(40)), {"max_tokens": 8}, 0, "i0")
        src, dst = FakeAgent("i0"), FakeAgent("i1")
        hops: list[str] = []
        coord = Coordinator(h, src, dst, MigrationConfig(recompute=True),
                            on_hop=lambda req, inst, hop: hops.append(inst.instance_id))
        asyncio.get_running_loop().call_later(0.05, h.finish, "length")
        return await coord.run(), src.calls, dst.calls, hops
    result, src_calls, dst_calls, hops = asyncio.run(go())
    assert result.state == "aborted" and "finished on the source" in result.reason
    assert src_calls == ["track", "stop", "untrack", "release"] and dst_calls == ["info"] and hops == []


class RecordingAgent(FakeAgent):
    """Also answers pre-copy stages, and keeps every call's arguments."""

    block_bytes = 4 << 20

    def __init__(self, instance_id: str) -> None:
        super().__init__(instance_id)
        self.args: list[tuple[str, dict]] = []

    async def call(self, method: str, rpc_timeout: float | None = 60.0, **args):
        self.args.append((method, {**args, "rpc_timeout": rpc_timeout}))
        if method == "precopy":
            return {"loaded": carried_load(args)["num_tokens"], "hit": 0}
        return await super().call(method, rpc_timeout, **args)


def test_precopy_stages_are_paced_and_their_deadline_allows_for_it():
    """Pre-copy loads carry the configured rate; the stage's deadline grows by
    the time the paced copy takes (64 blocks of 4 MiB at 128 MiB/s: 2 s)."""
    async def go():
        h = make_handle("r", list(range(64 * 16)), {"max_tokens": 500}, 0, "i0")
        h.append(make_output(h.engine_rid, [7, 8]))
        src, dst = RecordingAgent("i0"), RecordingAgent("i1")
        config = MigrationConfig(max_precopy_stages=1, precopy_rate_mib_s=128, stage_timeout_s=10)
        coord = Coordinator(h, src, dst, config, on_hop=lambda *a: None)
        asyncio.get_running_loop().call_later(0.05, h.finish, "length")
        return await coord.run(), dst.args
    result, dst_args = asyncio.run(go())
    assert "finished on the source" in result.reason
    stages = [a for m, a in dst_args if m == "precopy"]
    assert len(stages) == 1 and carried_load(stages[0])["rate_mib_s"] == 128
    assert carried_load(stages[0])["num_tokens"] == 64 * 16 and not carried_load(stages[0])["final"]
    assert stages[0]["timeout"] == 10 + 2.0 and stages[0]["rpc_timeout"] == 10 + 2.0 + 5


def carried_load(args: dict) -> dict:
    """The load spec of a pre-copy call's carrier request."""
    from llumigrate.engine.params import RequestTag
    from llumigrate.engine.vllm_api import decode_request
    core = decode_request(args["request"])
    tag = RequestTag.from_params(core.sampling_params.extra_args["kv_transfer_params"])
    return tag.load.to_wire()
