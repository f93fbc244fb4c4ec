"""Length-prefixed msgpack RPC over asyncio streams (agent <-> controller).

Connections open with a mutual challenge-response on the shared token
(HMAC-SHA256 of each side's random nonce): the token never crosses the wire.
Frames: 4-byte big-endian length, then a msgpack map. Calls are
`{"id", "method", "args"}`; replies `{"id", "ok", "result" | "error", "kind"}`;
server pushes are `{"event", ...}`; pushes queued with `push_batched` within
one event-loop turn travel as one `{"event": "batch", "events": [...]}` frame
(one per engine step instead of one per request), unpacked by the client.
msgpack only decodes plain data, so nothing from the wire is ever unpickled.
A handler exception becomes an error reply; it never closes the connection or
the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from llumigrate import errors
from llumigrate.netutil import is_loopback

logger = logging.getLogger(__name__)

MAX_FRAME = 64 << 20
_HEADER = struct.Struct(">I")

Handler = Callable[..., Awaitable[Any]]


class RpcError(errors.LlumigrateError):
    """The remote handler raised; `kind` is its error class name."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


async def read_frame(reader: asyncio.StreamReader) -> dict:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise errors.TransferError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    msg = msgpack.unpackb(await reader.readexactly(size), raw=False, strict_map_key=False)
    if not isinstance(msg, dict):
        raise errors.TransferError("frame is not a map")
    return msg


def encode_frame(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class RpcServer:
    """Serves `handlers[method](conn, **args)`; `conn.push(event)` sends events."""

    def __init__(self, handlers: dict[str, Handler], token: str | None = None) -> None:
        self.handlers = handlers
        self.token = token
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self.on_disconnect: Callable[[Connection], None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        if self.token is None and not is_loopback(host):
            raise errors.ConfigError(f"binding {host} needs a token (loopback is the default)")
        self._server = await asyncio.start_server(self._serve, host, port)
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        try:
            # Mutual challenge-response: neither side sends the token itself,
            # and each proves it holds it (a rogue agent learns nothing).
            hello = await asyncio.wait_for(read_frame(reader), 10)
            nonce = secrets.token_bytes(16)
            await conn.send({"nonce": nonce, "proof": _proof(self.token, b"server", hello.get("nonce"))})
            answer = await asyncio.wait_for(read_frame(reader), 10)
            if self.token is not None and not hmac.compare_digest(
                    _proof(self.token, b"client", nonce) or b"", _as_bytes(answer.get("proof"))):
                await conn.send({"hello": False, "error": "bad token"})
                return
            await conn.send({"hello": True})
            self.connections.add(conn)
            while True:
                msg = await read_frame(reader)
                asyncio.get_running_loop().create_task(self._dispatch(conn, msg))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except errors.TransferError as e:
            logger.warning("dropping RPC connection: %s", e)
        finally:
            self.connections.discard(conn)
            conn.close()
            if self.on_disconnect is not None:
                self.on_disconnect(conn)

    async def _dispatch(self, conn: Connection, msg: dict) -> None:
        call_id = msg.get("id")
        method = msg.get("method")
        handler = self.handlers.get(method) if isinstance(method, str) else None
        try:
            if handler is None:
                raise errors.LlumigrateError(f"unknown method {method!r}")
            args = msg.get("args") or {}
            if not isinstance(args, dict):
                raise errors.LlumigrateError("args must be a map")
            result = await handler(conn, **args)
            reply = {"id": call_id, "ok": True, "result": result}
        except Exception as e:  # every failure is a reply, never a dead server
            if not isinstance(e, (errors.LlumigrateError, ValueError, TypeError)):
                logger.exception("RPC %s failed", method)
            reply = {"id": call_id, "ok": False, "error": str(e), "kind": type(e).__name__}
        await conn.send(reply)


# Batched pushes wait for the peer once this much is buffered unsent.
BATCH_HIGH_WATER = 1 << 20


class Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._lock = asyncio.Lock()
        self._batch: list[dict] = []
        self.closed = False

    async def send(self, msg: dict) -> None:
        if self.closed:
            return
        try:
            async with self._lock:
                self._flush()  # earlier batched pushes go first: order is kept
                self.writer.write(encode_frame(msg))
                await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.close()

    async def push(self, event: str, **fields: Any) -> None:
        await self.send({"event": event, **fields})

    async def push_batched(self, event: str, **fields: Any) -> None:
        """Queue a push; every push queued in this event-loop turn goes out
        in one frame at the start of the next (or before any later `send`)."""
        if self.closed:
            return
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append({"event": event, **fields})
        transport = self.writer.transport
        if transport is not None and transport.get_write_buffer_size() > BATCH_HIGH_WATER:
            try:
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                self.close()

    def _flush(self) -> None:
        if not self._batch or self.closed:
            self._batch.clear()
            return
        batch, self._batch = self._batch, []
        msg = batch[0] if len(batch) == 1 else {"event": "batch", "events": batch}
        try:
            self.writer.write(encode_frame(msg))
        except (ConnectionError, RuntimeError):
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class RpcClient:
    """One connection to an RpcServer; `call()` awaits replies, `on_event`
    receives pushes in order. Connection loss fails pending calls with
    InstanceLost and calls `on_lost`."""

    def __init__(self, on_event: Callable[[dict], None] | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.on_event = on_event
        self.on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._conn: Connection | None = None
        self._reader_task: asyncio.Task | None = None
        self.lost = False

    async def connect(self, host: str, port: int, token: str | None = None,
                      timeout: float = 10.0) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self._conn = Connection(writer)
        nonce = secrets.token_bytes(16)
        await self._conn.send({"nonce": nonce})
        challenge = await asyncio.wait_for(read_frame(reader), timeout)
        if token is not None and not hmac.compare_digest(
                _proof(token, b"server", nonce) or b"", _as_bytes(challenge.get("proof"))):
            self._conn.close()
            raise errors.ConfigError(f"agent at {host}:{port} could not prove it holds the cluster token")
        await self._conn.send({"proof": _proof(token, b"client", challenge.get("nonce"))})
        hello = await asyncio.wait_for(read_frame(reader), timeout)
        if not hello.get("hello"):
            self._conn.close()
            raise errors.ConfigError(f"agent refused connection: {hello.get('error')}")
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def call(self, method: str, rpc_timeout: float | None = 60.0, **args: Any) -> Any:
        if self.lost or self._conn is None:
            raise errors.InstanceLost(f"connection lost before {method}")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        await self._conn.send({"id": call_id, "method": method, "args": args})
        try:
            reply = await asyncio.wait_for(fut, rpc_timeout)
        finally:
            self._pending.pop(call_id, None)
        if not reply.get("ok"):
            raise _remote_error(str(reply.get("error")), str(reply.get("kind", "")))
        return reply.get("result")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await read_frame(reader)
                if "event" in msg:
                    if self.on_event is not None:
                        events = msg.get("events") if msg["event"] == "batch" else [msg]
                        for event in events if isinstance(events, list) else ():
                            if isinstance(event, dict):
                                self.on_event(event)
                    continue
                fut = self._pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError, errors.TransferError):
            pass
        finally:
            self.lost = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(errors.InstanceLost("agent connection lost"))
            if self.on_lost is not None:
                self.on_lost()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else b""


def _proof(token: str | None, role: bytes, nonce: Any) -> bytes | None:
    """HMAC-SHA256 of the peer's nonce, keyed by the token (None without one)."""
    if token is None or not isinstance(nonce, bytes) or len(nonce) < 16:
        return None
    return hmac.new(token.encode(), role + nonce, hashlib.sha256).digest()


def _remote_error(message: str, kind: str) -> Exception:
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.LlumigrateError) and cls is not errors.MigrationAborted:
        try:
            return cls(message)
        except TypeError:
            pass
    return RpcError(message, kind)
