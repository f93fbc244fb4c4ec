"""The gRPC control API over a fake backend: every verb, bad input of each
kind, backend failures, event streams, token auth and the generated code."""

from __future__ import annotations

import asyncio
import logging
import math
import threading

import grpc
import pytest
from fake_control_backend import call, make_instances, make_self_signed, serving, wait_until

from llumigrate.control import codegen
from llumigrate.control.events import (
    DISPATCH,
    DRAIN,
    INSTANCE_JOINED,
    INSTANCE_LEFT,
    MIGRATION_DONE,
    MIGRATION_STAGE,
    Event,
    EventBus,
)
from llumigrate.control.server import ControlServerConfig
from llumigrate.control.v1 import control_pb2 as pb
from llumigrate.errors import ConfigError, InstanceLost, MigrationAborted

Code = grpc.StatusCode


@pytest.fixture
def served(loop):
    with serving(loop) as s:
        yield s


def rpc_error(address: str, fn, token: str | None = None) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        call(address, fn, token)
    return e.value.code(), e.value.details()


# -- every verb ------------------------------------------------------------------------
def test_health_and_instances(served):
    health = call(served.address, lambda c: c.health())
    assert (health.status, health.num_instances, health.num_instances_up) == ("serving", 3, 3)
    instances = call(served.address, lambda c: c.list_instances())
    assert [i.id for i in instances] == ["i0", "i1", "i2"]
    i1 = call(served.address, lambda c: c.get_instance("i1"))
    assert (i1.address, i1.num_blocks, i1.free_blocks, i1.block_size) == ("127.0.0.1:6001", 100, 70, 16)
    assert i1.up and not i1.draining and math.isclose(i1.kv_cache_usage, 0.3)


def test_list_requests(served):
    assert [r.id for r in call(served.address, lambda c: c.list_requests())] == ["r0", "r1"]
    on_i0 = call(served.address, lambda c: c.list_requests("i0", include_finished=True))
    assert [(r.id, r.state) for r in on_i0] == [("r0", "running"), ("r2", "finished")]
    r0 = on_i0[0]
    assert (r0.instance_id, r0.num_prompt_tokens, r0.num_output_tokens, r0.num_migrations) == ("i0", 300, 20, 0)


def test_migrate_to_a_destination(served):
    r = call(served.address, lambda c: c.migrate("r0", "i1"))
    assert (r.request_id, r.source, r.destination, r.state, r.committed) == ("r0", "i0", "i1", "done", True)
    assert list(r.blocks_per_stage) == [18] and r.stages == 1 and r.context_tokens == 320
    assert math.isclose(r.downtime_ms, 4.0) and math.isclose(r.total_ms, 250.0)
    assert math.isclose(r.phase_ms["precopy"], 200.0)
    moved = call(served.address, lambda c: c.list_requests("i1"))
    assert {(q.id, q.num_migrations) for q in moved} == {("r0", 1), ("r1", 0)}


def test_migrate_without_destination_lets_the_policy_pick(served):
    assert call(served.address, lambda c: c.migrate("r1")).destination == "i0"


def test_aborted_migration_is_a_result_not_an_error(served):
    served.backend.abort_next = True
    r = call(served.address, lambda c: c.migrate("r0", "i1"))
    assert (r.state, r.committed, r.reason, r.abort_stage) == ("aborted", False, "destination full", "precopy")
    assert not r.HasField("downtime_ms")


def test_drain_and_undrain(served):
    assert call(served.address, lambda c: c.drain("i1")).draining
    code, msg = rpc_error(served.address, lambda c: c.migrate("r0", "i1"))
    assert code == Code.FAILED_PRECONDITION and "draining" in msg
    assert not call(served.address, lambda c: c.undrain("i1")).draining
    assert call(served.address, lambda c: c.migrate("r0", "i1")).committed


def test_get_and_set_policy(served):
    p = call(served.address, lambda c: c.get_policy())
    assert (p.dispatch, list(p.migration)) == ("balanced", ["defrag"])
    assert dict(p.thresholds) == {"migrate_out_freeness": 0.1}
    assert list(p.available_dispatch) == ["balanced", "round_robin"]
    p = call(served.address, lambda c: c.set_policy(dispatch="round_robin", thresholds={"migrate_in_freeness": 0.5}))
    assert p.dispatch == "round_robin" and list(p.migration) == ["defrag"]
    assert dict(p.thresholds) == {"migrate_out_freeness": 0.1, "migrate_in_freeness": 0.5}
    p = call(served.address, lambda c: c.set_policy(migration=[]))  # set and empty: none enabled
    assert list(p.migration) == [] and p.dispatch == "round_robin"


def test_register_and_deregister_instance(served):
    i3 = call(served.address, lambda c: c.register_instance("i3", "10.0.0.7", 7000))
    assert (i3.id, i3.address, i3.up, i3.draining, i3.free_blocks) == ("i3", "10.0.0.7:7000", True, False, 100)
    assert call(served.address, lambda c: c.register_instance("i4", "::1", 7001)).address == "[::1]:7001"
    assert [i.id for i in call(served.address, lambda c: c.list_instances())] == ["i0", "i1", "i2", "i3", "i4"]
    gone = call(served.address, lambda c: c.deregister_instance("i0", timeout_s=5))
    assert (gone.id, gone.draining, gone.num_running) == ("i0", True, 0)  # as it was when removed
    assert rpc_error(served.address, lambda c: c.get_instance("i0"))[0] == Code.NOT_FOUND
    moved = served.backend.requests["r0"]  # its running request migrated before it left
    assert (moved.instance_id, moved.num_migrations) == ("i1", 1)
    assert call(served.address, lambda c: c.deregister_instance("i4")).id == "i4"  # the default timeout


def test_deregister_that_cannot_empty_in_time_leaves_it_draining(served):
    call(served.address, lambda c: c.drain("i1"))
    call(served.address, lambda c: c.drain("i2"))  # r0 on i0 has nowhere to go
    code, message = rpc_error(served.address, lambda c: c.deregister_instance("i0", timeout_s=0.5))
    assert code == Code.DEADLINE_EXCEEDED and "stays draining" in message
    assert call(served.address, lambda c: c.get_instance("i0")).draining
    assert served.backend.requests["r0"].instance_id == "i0"


def test_register_takes_over_the_id_of_a_down_instance(served):
    served.backend._set_instance("i2", up=False)
    i2 = call(served.address, lambda c: c.register_instance("i2", "node-7.example", 7000))
    assert (i2.address, i2.up) == ("node-7.example:7000", True)


def test_unreachable_agent_is_unavailable_and_not_registered(served):
    served.backend.unreachable.add("10.0.0.8:7000")
    code, message = rpc_error(served.address, lambda c: c.register_instance("i3", "10.0.0.8", 7000))
    assert code == Code.UNAVAILABLE and "cannot reach" in message
    assert "i3" not in served.backend.instances


# -- bad input -------------------------------------------------------------------------
BAD_INPUT = [
    (lambda c: c.get_instance(""), Code.INVALID_ARGUMENT, "instance_id must not be empty"),
    (lambda c: c.get_instance("nope"), Code.NOT_FOUND, "no instance 'nope'"),
    (lambda c: c.list_requests(""), Code.INVALID_ARGUMENT, "instance_id"),
    (lambda c: c.list_requests("nope"), Code.NOT_FOUND, "no instance"),
    (lambda c: c.migrate(""), Code.INVALID_ARGUMENT, "request_id must not be empty"),
    (lambda c: c.migrate("a b"), Code.INVALID_ARGUMENT, "spaces"),
    (lambda c: c.migrate("x" * 300), Code.INVALID_ARGUMENT, "at most 256"),
    (lambda c: c.migrate("nope"), Code.NOT_FOUND, "no request 'nope'"),
    (lambda c: c.migrate("r0", "nope"), Code.NOT_FOUND, "no instance 'nope'"),
    (lambda c: c.migrate("r0", ""), Code.INVALID_ARGUMENT, "destination must not be empty"),
    (lambda c: c.migrate("r0", "i0"), Code.FAILED_PRECONDITION, "current instance"),
    (lambda c: c.migrate("r2", "i1"), Code.FAILED_PRECONDITION, "finished"),
    (lambda c: c.drain(""), Code.INVALID_ARGUMENT, "instance_id"),
    (lambda c: c.drain("nope"), Code.NOT_FOUND, "no instance"),
    (lambda c: c.undrain("nope"), Code.NOT_FOUND, "no instance"),
    (lambda c: c.set_policy(dispatch="nope"), Code.INVALID_ARGUMENT, "allowed"),
    (lambda c: c.set_policy(dispatch=""), Code.INVALID_ARGUMENT, "dispatch must not be empty"),
    (lambda c: c.set_policy(migration=["nope"]), Code.INVALID_ARGUMENT, "unknown migration"),
    (lambda c: c.set_policy(migration=["defrag", "defrag"]), Code.INVALID_ARGUMENT, "twice"),
    (lambda c: c.set_policy(thresholds={"migrate_in_freeness": math.nan}), Code.INVALID_ARGUMENT, "finite"),
    (lambda c: c.set_policy(thresholds={"migrate_in_freeness": 7.0}), Code.INVALID_ARGUMENT, "[0, 1]"),
    (lambda c: c.set_policy(thresholds={"nope": 0.5}), Code.INVALID_ARGUMENT, "nope"),
    (lambda c: anext(c.watch_events(["nope"])), Code.INVALID_ARGUMENT, "unknown event kind"),
    (lambda c: c.register_instance("", "10.0.0.7", 7000), Code.INVALID_ARGUMENT, "instance_id must not be empty"),
    (lambda c: c.register_instance("i 9", "10.0.0.7", 7000), Code.INVALID_ARGUMENT, "spaces"),
    (lambda c: c.register_instance("i9", "", 7000), Code.INVALID_ARGUMENT, "host must not be empty"),
    (lambda c: c.register_instance("i9", "node:7000", 7000), Code.INVALID_ARGUMENT, "give the port separately"),
    (lambda c: c.register_instance("i9", "[::1]", 7000), Code.INVALID_ARGUMENT, "not a host name"),
    (lambda c: c.register_instance("i9", "a b", 7000), Code.INVALID_ARGUMENT, "not a host name"),
    (lambda c: c.register_instance("i9", "-node", 7000), Code.INVALID_ARGUMENT, "not a host name"),
    (lambda c: c.register_instance("i9", "n" * 254, 7000), Code.INVALID_ARGUMENT, "at most 253"),
    (lambda c: c.register_instance("i9", "10.0.0.7", 0), Code.INVALID_ARGUMENT, "port must be in 1..65535"),
    (lambda c: c.register_instance("i9", "10.0.0.7", -1), Code.INVALID_ARGUMENT, "port must be in 1..65535"),
    (lambda c: c.register_instance("i9", "10.0.0.7", 65536), Code.INVALID_ARGUMENT, "port must be in 1..65535"),
    (lambda c: c.register_instance("i9", "node.invalid", 7000), Code.INVALID_ARGUMENT, "does not resolve"),
    (lambda c: c.register_instance("i1", "10.0.0.7", 7000), Code.FAILED_PRECONDITION, "in use by a live instance"),
    (lambda c: c.deregister_instance(""), Code.INVALID_ARGUMENT, "instance_id must not be empty"),
    (lambda c: c.deregister_instance("nope"), Code.NOT_FOUND, "no instance 'nope'"),
    (lambda c: c.deregister_instance("i0", 0), Code.INVALID_ARGUMENT, "timeout_s must be > 0"),
    (lambda c: c.deregister_instance("i0", -1), Code.INVALID_ARGUMENT, "timeout_s must be > 0"),
    (lambda c: c.deregister_instance("i0", math.nan), Code.INVALID_ARGUMENT, "timeout_s must be > 0"),
    (lambda c: c.deregister_instance("i0", math.inf), Code.INVALID_ARGUMENT, "at most 3600"),
    (lambda c: c.deregister_instance("i0", 3601), Code.INVALID_ARGUMENT, "at most 3600"),
]


@pytest.mark.parametrize("fn,code,message", BAD_INPUT)
def test_bad_input_gets_a_clear_status(served, fn, code, message):
    got_code, got_message = rpc_error(served.address, fn)
    assert got_code == code and message in got_message, got_message
    assert call(served.address, lambda c: c.health()).status == "serving"


def test_bad_policy_changes_nothing(served):
    before = served.backend.policy
    rpc_error(served.address, lambda c: c.set_policy(dispatch="round_robin", migration=["nope"]))
    assert served.backend.policy == before


@pytest.mark.parametrize("exc,code", [
    (InstanceLost("instance i1 is down"), Code.UNAVAILABLE),
    (MigrationAborted("peer gone", "precopy"), Code.ABORTED),
    (asyncio.TimeoutError(), Code.DEADLINE_EXCEEDED),
    (TimeoutError("still running"), Code.DEADLINE_EXCEEDED),
    (RuntimeError("a bug with a secret"), Code.INTERNAL),
    (KeyError("a bare KeyError is a bug, not NOT_FOUND"), Code.INTERNAL),
])
def test_backend_failures_map_to_codes_and_the_server_goes_on(served, exc, code, caplog):
    served.backend.fail_next = exc
    with caplog.at_level(logging.ERROR, logger="llumigrate.control.status"):
        got, message = rpc_error(served.address, lambda c: c.list_instances())
    assert got == code
    if code == Code.INTERNAL:
        assert "secret" not in message and type(exc).__name__ in message
        assert any("ListInstances" in r.getMessage() for r in caplog.records)
    assert len(call(served.address, lambda c: c.list_instances())) == 3


def test_garbage_and_unknown_methods_do_not_hurt_the_server(served):
    async def go():
        async with grpc.aio.insecure_channel(served.address) as ch:
            for method in ("/llumigrate.v1.Control/Migrate", "/llumigrate.v1.Control/Nope"):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ch.unary_unary(method)(b"\xff\xff\xff\x00garbage", timeout=10)
                # grpc answers UNKNOWN (undecodable request) or UNIMPLEMENTED itself
                assert e.value.code() in (Code.UNKNOWN, Code.UNIMPLEMENTED)
    asyncio.run(go())
    assert call(served.address, lambda c: c.health()).status == "serving"


# -- events ----------------------------------------------------------------------------
def test_watch_events_streams_what_the_backend_publishes(served):
    bus = served.backend.bus

    async def go(c):
        stream = c.watch_events()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(wait_until, lambda: bus.num_subscribers == 1)
        bus.emit(DISPATCH, "r9", "i2", priority=1)  # from a thread other than the server's loop
        await c.migrate("r0", "i1")
        events = [await first] + [await anext(stream) for _ in range(2)]
        await stream.aclose()
        return events

    events = call(served.address, go)
    assert [(e.kind, e.request_id, e.instance_id, e.destination_id) for e in events] == [
        (DISPATCH, "r9", "i2", ""), (MIGRATION_STAGE, "r0", "i0", "i1"), (MIGRATION_DONE, "r0", "i0", "i1")]
    assert [e.seq for e in events] == [1, 2, 3] and all(e.dropped == 0 for e in events)
    assert dict(events[0].detail) == {"priority": "1"} and events[2].detail["state"] == "done"
    wait_until(lambda: bus.num_subscribers == 0)  # a client that goes away unsubscribes


def test_watch_events_filters_kinds(served):
    bus = served.backend.bus

    async def go(c):
        stream = c.watch_events([DRAIN])
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(wait_until, lambda: bus.num_subscribers == 1)
        bus.emit(DISPATCH, "r9", "i2")
        await c.drain("i2")
        return await first

    event = call(served.address, go)
    assert (event.kind, event.instance_id, event.seq) == (DRAIN, "i2", 2)


def test_membership_events(served):
    bus = served.backend.bus

    async def go(c):
        stream = c.watch_events([INSTANCE_JOINED, INSTANCE_LEFT])
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(wait_until, lambda: bus.num_subscribers == 1)
        await c.register_instance("i3", "10.0.0.7", 7000)
        await c.deregister_instance("i3")  # also publishes a drain, filtered out here
        return [await first, await anext(stream)]

    events = call(served.address, go)
    assert [(e.kind, e.instance_id, e.detail["address"]) for e in events] == [
        (INSTANCE_JOINED, "i3", "10.0.0.7:7000"), (INSTANCE_LEFT, "i3", "10.0.0.7:7000")]


def test_slow_watcher_drops_oldest_and_is_told(loop):
    with serving(loop, event_queue_size=4) as served:
        bus = served.backend.bus

        async def go(c):
            stream = c.watch_events()
            first = asyncio.ensure_future(anext(stream))
            await asyncio.to_thread(wait_until, lambda: bus.num_subscribers == 1)
            # NOTE: all 50 in one callback on the server's loop: its stream cannot run in between.
            loop.loop.call_soon_threadsafe(lambda: [bus.emit(DISPATCH, f"r{n}") for n in range(50)])
            return [await first] + [await anext(stream) for _ in range(3)]

        events = call(served.address, go)
    assert [(e.seq, e.dropped) for e in events] == [(47, 46), (48, 0), (49, 0), (50, 0)]


def test_event_bus_drops_oldest_and_never_blocks():
    async def go():
        bus = EventBus()
        sub = bus.subscribe(maxsize=3)
        for n in range(10):
            bus.publish(Event(DISPATCH, f"r{n}"))
        got = [await anext(sub) for _ in range(3)]
        waiter = asyncio.ensure_future(anext(sub))
        threading.Thread(target=bus.emit, args=(DRAIN, "", "i0")).start()  # wakes it from another thread
        got.append(await asyncio.wait_for(waiter, 10))
        bus.close()
        rest = [e async for e in sub]
        return got, rest, bus.num_subscribers

    got, rest, subscribers = asyncio.run(go())
    assert [(e.request_id, e.seq, e.dropped) for e in got[:3]] == [("r7", 8, 7), ("r8", 9, 0), ("r9", 10, 0)]
    assert (got[3].kind, got[3].seq, rest, subscribers) == (DRAIN, 11, [], 0)


# -- auth and binding ------------------------------------------------------------------
def test_non_loopback_bind_refuses_clients_without_the_token(loop):
    with serving(loop, address="0.0.0.0:0", token="s3cret") as served:
        for token in (None, "wrong", "s3cret-and-more"):
            code, message = rpc_error(served.address, lambda c: c.list_instances(), token)
            assert code == Code.UNAUTHENTICATED and "token" in message
        code, _ = rpc_error(served.address, lambda c: anext(c.watch_events()))
        assert code == Code.UNAUTHENTICATED
        assert len(call(served.address, lambda c: c.list_instances(), "s3cret")) == 3
        assert call(served.address, lambda c: c.migrate("r0", "i1"), "s3cret").committed


def test_registering_an_agent_needs_the_token(loop):
    """The security-critical verbs: a rogue agent must not join, nor a live
    instance be pulled out, without the token."""
    with serving(loop, address="0.0.0.0:0", token="s3cret") as served:
        for token in (None, "wrong"):
            for fn in (lambda c: c.register_instance("rogue", "10.6.6.6", 7000),
                       lambda c: c.register_instance("i0", "10.6.6.6", 7000),
                       lambda c: c.deregister_instance("i0")):
                code, message = rpc_error(served.address, fn, token)
                assert code == Code.UNAUTHENTICATED and "token" in message
        assert sorted(served.backend.instances) == ["i0", "i1", "i2"]
        assert served.backend.instances["i0"] == make_instances()["i0"]
        assert call(served.address, lambda c: c.register_instance("i3", "10.0.0.7", 7000), "s3cret").up
        assert call(served.address, lambda c: c.deregister_instance("i3"), "s3cret").id == "i3"


def test_every_rpc_needs_the_token(loop):
    """Each method of the service, the ones added later included, is refused
    without the token before its handler runs."""
    service = pb.DESCRIPTOR.services_by_name["Control"]

    async def go(address):
        codes = {}
        async with grpc.aio.insecure_channel(address) as ch:
            for m in service.methods:
                request = getattr(pb, m.input_type.name)()
                kind = ch.unary_stream if m.server_streaming else ch.unary_unary
                rpc = kind(f"/{service.full_name}/{m.name}", request_serializer=type(request).SerializeToString)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    call = rpc(request, timeout=10)
                    await (call.read() if m.server_streaming else call)
                codes[m.name] = e.value.code()
        return codes

    with serving(loop, address="0.0.0.0:0", token="s3cret") as served:
        codes = asyncio.run(go(served.address))
    assert {"RegisterInstance", "DeregisterInstance", "WatchEvents"} <= set(codes)
    assert set(codes.values()) == {Code.UNAUTHENTICATED}, codes


@pytest.mark.parametrize("config,message", [
    ({"address": "0.0.0.0:0"}, "needs a token"),
    ({"address": "[::]:0"}, "needs a token"),
    ({"address": "10.1.2.3:50151"}, "needs a token"),
    ({"address": "127.0.0.1:0", "token": ""}, "must not be empty"),
    ({"address": "127.0.0.1"}, "HOST:PORT"),
    ({"address": "127.0.0.1:99999"}, "HOST:PORT"),
    ({"tls_cert": "/nonexistent.pem"}, "both"),
    ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "does not exist"),
    ({"event_queue_size": 0}, "event_queue_size"),
])
def test_bad_server_config_raises(config, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        ControlServerConfig(**config)


def test_loopback_binds_need_no_token():
    for address in ("127.0.0.1:50151", "localhost:0", "[::1]:0", "127.0.0.5:1"):
        ControlServerConfig(address)


def test_tls_with_token(loop, tmp_path):
    cert, key = make_self_signed(tmp_path)
    with serving(loop, address="0.0.0.0:0", token="t", tls_cert=str(cert), tls_key=str(key)) as served:
        address = served.address.replace("127.0.0.1", "localhost")
        assert call(address, lambda c: c.health(), "t", tls_ca=str(cert)).status == "serving"
        code, _ = rpc_error(address, lambda c: c.health())  # plaintext client, TLS server
        assert code == Code.UNAVAILABLE


# -- generated code --------------------------------------------------------------------
def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")  # scripts/bootstrap.sh installs it
    codegen.generate(tmp_path)
    for name in codegen.FILES:
        fresh = codegen.normalized((tmp_path / name).read_text())
        committed = codegen.normalized((codegen.OUT_DIR / name).read_text())
        assert fresh == committed, f"{name} is stale: run `python -m llumigrate.control.codegen`"
