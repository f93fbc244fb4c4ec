"""Engine -> agent notifications over a private UNIX socket.

The connector halves run in vLLM's EngineCore and worker processes, where the
agent can otherwise only reach them by `collective_rpc` polling (each poll
waits for an engine step boundary). Migration milestones that the downtime
depends on are pushed instead, the moment they happen:

- `held`     (scheduler side): a tracked request was stopped; its exact token
             list and computed count, and whether a sampler state follows.
- `held_gen` (worker side): the sampler state of a stopped seeded request.
- `tracked`  (scheduler side): the scheduler will now hold these keys on abort.
- `blocks`   (scheduler side): the block pool's free count changed (also
             while the engine is idle, when vLLM reports no stats).
- `preempted` (scheduler side): the keys of the requests vLLM preempted and
             has not resumed yet (queued again, holding no blocks), head first.

Frames are a 4-byte big-endian length and a msgpack map (never pickle). The
socket lives in a 0700 directory the agent created, so only its own user can
connect. Notifications are an accelerator, not the source of truth: a lost
one costs the agent a fallback poll, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack

from llumigrate.procfs import pid_alive

logger = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">I")
MAX_NOTIFY_FRAME = 16 << 20
MAX_UNCLAIMED = 256


class Notifier:
    """Sender side (engine processes). Thread-safe; connects lazily and
    reconnects after an error. `send` never raises."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    def send(self, kind: str, key: str, **fields: Any) -> None:
        if not self.path:
            return
        body = msgpack.packb({"kind": kind, "key": key, **fields}, use_bin_type=True)
        with self._lock:
            try:
                if self._sock is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(2.0)
                    s.connect(self.path)
                    self._sock = s
                self._sock.sendall(FRAME_HEADER.pack(len(body)) + body)
            except OSError as e:
                if not self._warned:
                    logger.warning("engine notification to %s failed (agent falls back to polling): %s",
                                   self.path, e)
                    self._warned = True
                self.close_locked()

    def close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


DIR_PREFIX = "llumigrate-notify-"
_DIR_NAME = re.compile(rf"^{DIR_PREFIX}(\d+)-")


def remove_stale_dirs(parent: str | None = None) -> list[str]:
    """Remove the private directories that agents killed before they could
    (named after their pid) left in `parent` (default: the temp dir); the
    ones removed. A directory whose agent runs, or of another user, stays."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _DIR_NAME.match(name)
        path = os.path.join(parent, name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class NotifyListener:
    """Receiver side (the agent's event loop). `wait(kind, key)` returns the
    notification's fields; one that arrived before anyone waited is kept (a
    bounded number of them) so no ordering between the two sides matters."""

    def __init__(self) -> None:
        remove_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")  # mode 0700
        self.path = os.path.join(self._dir, "engine.sock")
        self._server: asyncio.base_events.Server | None = None
        self._unclaimed: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._waiters: dict[tuple[str, str], asyncio.Future] = {}
        self._handlers: dict[str, Callable[[dict], None]] = {}

    def sibling_path(self, name: str) -> str:
        """A path beside the socket, in the same private directory."""
        return os.path.join(self._dir, name)

    def on(self, kind: str, handler: Callable[[dict], None]) -> None:
        """Deliver every notification of `kind` to `handler` (not to waiters)."""
        self._handlers[kind] = handler

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def wait(self, kind: str, key: str, timeout: float) -> dict:
        """The fields of notification (`kind`, `key`); TimeoutError if none came."""
        item = self._unclaimed.pop((kind, key), None)
        if item is not None:
            return item
        fut = asyncio.get_running_loop().create_future()
        self._waiters[(kind, key)] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop((kind, key), None)

    def discard(self, kind: str, key: str) -> None:
        self._unclaimed.pop((kind, key), None)

    def _deliver(self, msg: dict) -> None:
        ident = (str(msg.pop("kind", "")), str(msg.pop("key", "")))
        handler = self._handlers.get(ident[0])
        if handler is not None:
            handler(msg)
            return
        fut = self._waiters.get(ident)
        if fut is not None and not fut.done():
            fut.set_result(msg)
            return
        self._unclaimed[ident] = msg
        while len(self._unclaimed) > MAX_UNCLAIMED:
            self._unclaimed.popitem(last=False)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                if size > MAX_NOTIFY_FRAME:
                    logger.warning("dropping engine notification stream: frame of %d bytes", size)
                    return
                msg = msgpack.unpackb(await reader.readexactly(size), raw=False)
                if isinstance(msg, dict):
                    self._deliver(msg)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the engine went away, or the agent is shutting down
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)
