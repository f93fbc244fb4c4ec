"""`Channel`: one connected TCP socket carrying control frames and raw KV
bytes, every operation under a timeout. Every failure (timeout, reset, EOF,
malformed frame) surfaces as TransferError naming the peer."""

from __future__ import annotations

import os
import socket
from typing import TypeVar

from llumigrate.errors import TransferError, TransferRefused
from llumigrate.kv.layout import KVLayout
from llumigrate.transfer.wire import (
    MAX_FRAME,
    VERSION,
    Accept,
    Challenge,
    Hello,
    Message,
    Refuse,
    WireError,
    decode,
    host_id,
    mac,
)

M = TypeVar("M", bound=Message)


class Channel:
    """Not thread-safe: one thread drives a channel at a time."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self._header = bytearray(4)
        self._timeout: float | None = None

    def _set_timeout(self, timeout: float) -> None:
        timeout = max(timeout, 1e-3)
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    @classmethod
    def connect(cls, address: tuple[str, int], timeout: float) -> Channel:
        """Connect to `address`; raises TransferError when it cannot."""
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except OSError as e:
            raise TransferError(f"cannot connect to KV server {address[0]}:{address[1]}: {e}") from e
        return cls(sock, f"{address[0]}:{address[1]}")

    def send(self, msg: Message, timeout: float) -> None:
        self.send_bytes(msg.encode(), timeout, msg.TYPE)

    def send_bytes(self, data: bytes | memoryview, timeout: float, what: str = "KV bytes") -> None:
        try:
            self._set_timeout(timeout)
            self.sock.sendall(data)
        except TimeoutError:
            raise TransferError(f"timed out after {timeout:.1f}s sending {what} to {self.peer}") from None
        except OSError as e:
            raise TransferError(f"sending {what} to {self.peer} failed: {e}") from e

    def recv(self, timeout: float, expect: type[M]) -> M:
        """Next message, which must be an instance of `expect`."""
        msg = self.recv_any(timeout, expect)
        assert isinstance(msg, expect)
        return msg

    def recv_any(self, timeout: float, *expect: type[Message]) -> Message:
        """Next message, which must be an instance of one of `expect`.
        `timeout` bounds each wait for more bytes."""
        view = memoryview(self._header)
        self.recv_into(view, timeout, "a frame header")
        size = int.from_bytes(self._header, "big")
        if size > MAX_FRAME:
            raise TransferError(f"{self.peer} sent a {size}-byte control frame (max {MAX_FRAME})")
        body = bytearray(size)
        self.recv_into(memoryview(body), timeout, "a frame")
        try:
            msg = decode(body)
        except WireError as e:
            raise TransferError(f"bad frame from {self.peer}: {e}") from None
        if not isinstance(msg, expect):
            raise TransferError(f"unexpected {msg.TYPE!r} frame from {self.peer}")
        return msg

    def recv_into(self, view: memoryview, timeout: float, what: str = "KV bytes") -> None:
        """Fill `view` exactly; `timeout` bounds each wait for more bytes."""
        got, n = 0, len(view)
        try:
            self._set_timeout(timeout)
            while got < n:
                k = self.sock.recv_into(view[got:], n - got)
                if k == 0:
                    raise TransferError(f"{self.peer} closed the connection while we waited for {what}")
                got += k
        except TimeoutError:
            raise TransferError(f"timed out after {timeout:.1f}s waiting for {what} from {self.peer}") from None
        except OSError as e:
            raise TransferError(f"receiving {what} from {self.peer} failed: {e}") from e

    def is_stale(self) -> bool:
        """True when the peer already closed (or sent unsolicited bytes):
        an idle pooled connection in that state must not be reused."""
        try:
            self.sock.settimeout(0.0)
            self._timeout = None  # the next operation sets its own again
            self.sock.recv(1, socket.MSG_PEEK)
            return True  # EOF (b"") or bytes nobody asked for
        except BlockingIOError:
            return False
        except OSError:
            return True

    def shutdown(self) -> None:
        """Wake a thread blocked on this channel (it then sees EOF)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def client_hello(chan: Channel, io_timeout_s: float, token: str | None, layout: KVLayout,
                 transport: str) -> tuple[Accept, int]:
    """A KV client's side of the handshake up to the server's verdict:
    answer its challenge (protocol version, HMAC of the nonce, our layout and
    the `transport` we ask for). Returns the server's Accept and its pid;
    raises TransferRefused when it refuses us, TransferError on a version
    mismatch."""
    ch = chan.recv(io_timeout_s, Challenge)
    if ch.version != VERSION:
        raise TransferError(f"KV server {chan.peer} speaks protocol v{ch.version}, we speak v{VERSION}")
    chan.send(Hello(VERSION, mac(token, ch.nonce), layout.to_wire(), transport, host_id(), os.getpid()),
              io_timeout_s)
    reply = chan.recv_any(io_timeout_s, Accept, Refuse)
    if isinstance(reply, Refuse):
        raise TransferRefused(f"KV server {chan.peer} refused the connection: {reply.reason}")
    assert isinstance(reply, Accept)
    return reply, ch.pid
