"""`KVServer`: serves pulls of this worker's KV blocks to other workers.

One thread accepts; each connection gets a `ServerSession` on its own thread.
For each pull the provider maps the logical range to physical block ids; the
session gathers those blocks (C++ op, GIL released) into a shared-memory ring
(shm) or a staging buffer streamed over TCP, or hands their ids to a pvm
client that reads them out of this process itself; it waits for the client's
ack, then reports `on_complete`. Nothing a client does can stop the server.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

import torch

from llumigrate.errors import ConfigError
from llumigrate.netutil import is_loopback
from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import gather_blocks
from llumigrate.transfer.api import CompleteCallback, Provider, PullRequest
from llumigrate.transfer.channel import Channel
from llumigrate.transfer.session import ServerSession
from llumigrate.transfer.shm import Segment

logger = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class ServerConfig:
    """Tunables of a KVServer; validated on construction."""

    token: str | None = None
    num_threads: int = 1              # gather threads per pull (0 = torch's count)
    chunk_bytes: int = 4 << 20        # bytes gathered per chunk (>= 1 block)
    max_segment_bytes: int = 256 << 20  # per-connection shm ring cap (>= 2 chunks)
    io_timeout_s: float = 10.0        # any single wait on the peer mid-pull
    idle_timeout_s: float = 600.0     # an idle connection is closed after this

    def __post_init__(self) -> None:
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0 (0 = torch's thread count), got {self.num_threads}")
        if self.chunk_bytes < 1 or self.max_segment_bytes < 1:
            raise ConfigError("chunk_bytes and max_segment_bytes must be >= 1")
        if not (self.io_timeout_s > 0 and self.idle_timeout_s > 0):
            raise ConfigError("io_timeout_s and idle_timeout_s must be > 0")


class KVServer:
    """Serves `layers` ([num_blocks, *block_shape] each, CPU) to KVClients.

    Binding a non-loopback host requires a token (ConfigError otherwise).
    `address` is valid after `start()`. `close()` stops accepting, ends every
    connection, unlinks every shared-memory segment it created; idempotent.
    """

    def __init__(self, layers: list[torch.Tensor], provider: Provider, *, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None, on_complete: CompleteCallback | None = None,
                 num_threads: int = 1, chunk_bytes: int = 4 << 20, max_segment_bytes: int = 256 << 20,
                 io_timeout_s: float = 10.0, idle_timeout_s: float = 600.0) -> None:
        if not token and not is_loopback(host):
            raise ConfigError(f"a KV server bound to {host!r} needs a token; bind 127.0.0.1 or set one")
        self.config = ServerConfig(token, num_threads, chunk_bytes, max_segment_bytes, io_timeout_s,
                                   idle_timeout_s)
        self.layers = list(layers)
        self.layout = _checked_layout(self.layers)
        self.num_blocks = int(self.layers[0].shape[0])
        self.provider, self.on_complete = provider, on_complete
        self.host, self.port = host, port
        self.closed = False
        self._lock = threading.Lock()
        self._sessions: dict[ServerSession, threading.Thread] = {}
        self._segments: set[Segment] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients connect to; a wildcard host reads as this hostname."""
        if self._address is None:
            raise RuntimeError("KVServer.address is known after start()")
        return self._address

    def start(self) -> None:
        """Bind and start accepting. Raises OSError when the bind fails."""
        if self._listener is not None or self.closed:
            raise RuntimeError("KVServer.start() called twice or after close()")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=64)
        self._listener.settimeout(1.0)  # the accept loop re-checks `closed` this often
        port = self._listener.getsockname()[1]
        self._address = (socket.gethostname() if self.host in _WILDCARDS else self.host, port)
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"llumigrate-kv-accept-{port}")
        self._accept_thread.start()

    def close(self, join_timeout_s: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            sessions = dict(self._sessions)
            segments = list(self._segments)
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        for session in sessions:
            session.stop()
        for seg in segments:  # sessions stuck in a provider unlink theirs late
            seg.unlink()
        if self._accept_thread is not None:
            self._accept_thread.join(join_timeout_s)
        for thread in sessions.values():
            thread.join(join_timeout_s)

    # -- used by sessions --------------------------------------------------------
    def complete(self, req: PullRequest, ok: bool) -> None:
        """Report a granted pull's outcome to `on_complete`; never raises."""
        if self.on_complete is None:
            return
        try:
            self.on_complete(req, ok)
        except Exception:
            logger.exception("on_complete failed for pull of %r", req.key)

    def remember_segment(self, seg: Segment) -> None:
        with self._lock:
            self._segments.add(seg)
            closed = self.closed
        if closed:
            seg.unlink()

    def forget_segment(self, seg: Segment) -> None:
        with self._lock:
            self._segments.discard(seg)

    def num_connections(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- internals ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.closed:
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if not self.closed:
                    logger.error("KV server accept failed: %s", e)
                    threading.Event().wait(0.1)
                continue
            session = ServerSession(self, Channel(sock, f"{peer[0]}:{peer[1]}"))
            thread = threading.Thread(target=self._run_session, args=(session,), daemon=True,
                                      name=f"llumigrate-kv-conn-{peer[1]}")
            with self._lock:
                if self.closed:
                    session.chan.close()
                    return
                self._sessions[session] = thread
            thread.start()

    def _run_session(self, session: ServerSession) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(session, None)


def _checked_layout(layers: list[torch.Tensor]) -> KVLayout:
    """The layers' layout; ConfigError when the copy ops cannot use them."""
    try:
        layout = KVLayout.from_layers(layers)
        gather_blocks(layers, [], torch.empty(0, dtype=torch.uint8))  # runs the op's layout checks
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"KV layers unusable for transfer: {e}") from e
    return layout
