"""The agent's msgpack RPC: mutual token proof, typed error replies, a server
that survives bad clients. Real sockets on loopback, no engine."""

from __future__ import annotations

import asyncio

import pytest

from llumigrate import errors
from llumigrate.agent.rpc import RpcClient, RpcServer, encode_frame


def _server(token: str | None) -> RpcServer:
    async def echo(conn, value):
        return value

    async def boom(conn):
        raise errors.RequestNotFound("no such request")

    async def crash(conn):
        raise RuntimeError("a bug")
    return RpcServer({"echo": echo, "boom": boom, "crash": crash}, token=token)


async def _with_server(token, fn):
    server = _server(token)
    host, port = await server.start("127.0.0.1", 0)
    try:
        return await fn(host, port)
    finally:
        await server.close()


def test_right_token_connects_and_calls():
    async def go(host, port):
        c = RpcClient()
        await c.connect(host, port, token="s3cret")
        try:
            return await c.call("echo", value={"a": [1, 2]})
        finally:
            await c.close()
    assert asyncio.run(_with_server("s3cret", go)) == {"a": [1, 2]}


@pytest.mark.parametrize("server_token,client_token,match", [
    ("s3cret", "wrong", "could not prove"),  # the client checks the server first
    ("s3cret", None, "refused"),
    (None, "s3cret", "could not prove"),   # an agent without the token is not trusted
])
def test_token_mismatch_is_refused_either_way(server_token, client_token, match):
    async def go(host, port):
        with pytest.raises(errors.ConfigError, match=match):
            await RpcClient().connect(host, port, token=client_token)
    asyncio.run(_with_server(server_token, go))


def test_errors_are_replies_and_the_server_goes_on():
    async def go(host, port):
        # garbage first: the server must drop that client only
        _, w = await asyncio.open_connection(host, port)
        w.write(encode_frame({"nonce": b"short"}) + b"\x00\x00\x00\x05junk!")
        await w.drain()
        w.close()
        c = RpcClient()
        await c.connect(host, port)
        out = []
        for method in ("boom", "crash", "nope"):
            try:
                await c.call(method)
            except Exception as e:  # noqa: BLE001 - the types are what we check
                out.append(type(e).__name__)
        out.append(await c.call("echo", value=7))
        await c.close()
        return out
    assert asyncio.run(_with_server(None, go)) == ["RequestNotFound", "RpcError", "LlumigrateError", 7]


def test_batched_pushes_share_a_frame_and_stay_ordered_before_the_reply():
    """Pushes queued in one loop turn travel as one frame; a reply sent after
    them arrives after them; the client hands each event on, in order."""
    frames: list[dict] = []

    async def burst(conn, n):
        for i in range(n):
            await conn.push_batched("out", i=i)
        return "done"

    async def go():
        server = RpcServer({"burst": burst})
        host, port = await server.start("127.0.0.1", 0)
        seen: list = []
        import llumigrate.agent.rpc as rpc
        real = rpc.read_frame

        async def spy(reader):
            msg = await real(reader)
            frames.append(msg)
            return msg
        rpc.read_frame = spy
        c = RpcClient(on_event=lambda e: seen.append(e["i"]))
        try:
            await c.connect(host, port)
            assert await c.call("burst", n=5) == "done"
            seen_at_reply = list(seen)
            await c.call("burst", n=1)
        finally:
            rpc.read_frame = real
            await c.close()
            await server.close()
        return seen_at_reply, seen
    at_reply, seen = asyncio.run(go())
    assert at_reply == [0, 1, 2, 3, 4]
    assert seen == [0, 1, 2, 3, 4, 0]
    batch = [f for f in frames if f.get("event") == "batch"]
    assert len(batch) == 1 and [e["i"] for e in batch[0]["events"]] == [0, 1, 2, 3, 4]
    assert {"event": "out", "i": 0} in frames  # a lone push goes out as itself
