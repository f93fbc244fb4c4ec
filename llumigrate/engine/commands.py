"""Agent -> scheduler commands over a private UNIX socket (the reverse of
`notify`): what must reach the EngineCore's scheduler between two of its
steps, not at the next step boundary a `collective_rpc` would wait for.

- `stop` {key}: finish tracked request `key` once its next token is sampled
  (`SchedulerSide.cap`); replies {"capped": bool} (False: not running there,
  so the agent aborts it instead).

The scheduler side serves the socket from a thread; each request frame (a
4-byte big-endian length and a msgpack map, as `notify` frames) gets one
reply frame. The socket sits in the agent's 0700 notify directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable

import msgpack

from llumigrate.engine.notify import FRAME_HEADER, MAX_NOTIFY_FRAME

logger = logging.getLogger(__name__)


def _frame(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return FRAME_HEADER.pack(len(body)) + body


class CommandServer:
    """Engine side: serves `handler(msg) -> reply` on `path` from a daemon thread."""

    def __init__(self, path: str, handler: Callable[[dict], dict]) -> None:
        self.path, self._handler = path, handler
        if os.path.exists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(4)
        threading.Thread(target=self._accept, daemon=True, name="llumigrate-commands").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="llumigrate-commands-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    header = _recv_exactly(conn, FRAME_HEADER.size)
                    if header is None:
                        return
                    (size,) = FRAME_HEADER.unpack(header)
                    body = _recv_exactly(conn, size) if size <= MAX_NOTIFY_FRAME else None
                    if body is None:
                        return
                    msg = msgpack.unpackb(body, raw=False)
                    try:
                        reply = self._handler(msg) if isinstance(msg, dict) else {"error": "not a map"}
                    except Exception as e:  # a bad command never kills the engine's thread
                        logger.exception("llumigrate command %r failed", msg)
                        reply = {"error": str(e)}
                    conn.sendall(_frame(reply))
            except OSError:
                return


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class CommandClient:
    """Agent side. `call` returns the reply, or None when the engine cannot
    be reached (the caller falls back); it never raises for that."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def call(self, msg: dict, timeout: float = 1.0) -> dict | None:
        async with self._lock:
            try:
                return await asyncio.wait_for(self._call(msg), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                logger.warning("engine command %s failed: %s", msg.get("kind"), e)
                self._close()
                return None

    async def _call(self, msg: dict) -> dict:
        if self._conn is None:
            self._conn = await asyncio.open_unix_connection(self.path)
        reader, writer = self._conn
        writer.write(_frame(msg))
        await writer.drain()
        (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
        if size > MAX_NOTIFY_FRAME:
            raise OSError(f"command reply of {size} bytes")
        reply = msgpack.unpackb(await reader.readexactly(size), raw=False)
        return reply if isinstance(reply, dict) else {}

    def _close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def close(self) -> None:
        self._close()
