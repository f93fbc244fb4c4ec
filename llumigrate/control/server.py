"""`ControlServer`: the llumigrate.v1.Control gRPC service on a grpc.aio server.

    async with ControlServer(backend, ControlServerConfig("127.0.0.1:50151")) as server:
        await server.wait_for_termination()

Binds 127.0.0.1 by default. A non-loopback bind without a token is a
ConfigError; with a token, every call must carry it. TLS is optional.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from llumigrate.control.auth import TokenInterceptor, is_loopback, split_address
from llumigrate.control.backend import ControlBackend
from llumigrate.control.events import DEFAULT_QUEUE_SIZE
from llumigrate.control.servicer import ControlServicer
from llumigrate.control.v1 import control_pb2_grpc as pb_grpc
from llumigrate.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50151
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"


@dataclass(frozen=True)
class ControlServerConfig:
    """Where and how the control API listens.

    address: HOST:PORT (port 0 picks a free one). Non-loopback needs `token`.
    token: required of every call when set (on loopback binds too).
    tls_cert, tls_key: PEM files; both or neither.
    grace_s: how long `stop` lets calls in flight finish.
    event_queue_size: events a WatchEvents stream may fall behind by before
        the oldest are dropped (the client is told how many).
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 2.0
    event_queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self) -> None:
        host, _ = split_address(self.address)
        if self.token == "":
            raise ConfigError("token must not be empty (leave it unset for none)")
        if not self.token and not is_loopback(host):
            raise ConfigError(f"listening on {self.address} needs a token; "
                              f"only loopback (e.g. {DEFAULT_ADDRESS}) is served without one")
        if self.event_queue_size < 1:
            raise ConfigError(f"event_queue_size must be >= 1, got {self.event_queue_size}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")

    def credentials(self) -> grpc.ServerCredentials | None:
        """Server TLS credentials, or None for plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        pair = (Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())
        return grpc.ssl_server_credentials([pair])


class ControlServer:
    """Serves a ControlBackend. `bind` takes the address (optional: `start`
    binds if it was not); `start` serves and returns the bound port; `stop`
    ends the event streams, then the server."""

    def __init__(self, backend: ControlBackend, config: ControlServerConfig | None = None) -> None:
        self.backend = backend
        self.config = config or ControlServerConfig()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._bound: grpc.aio.Server | None = None   # bound, not serving yet
        self._servicer = ControlServicer(backend, self.config.event_queue_size)

    def bind(self) -> int:
        """Takes the address now, before serving starts (call it on the event
        loop): an address in use fails here, fast, and nothing started
        meanwhile (an engine's own sockets) can take the port. Returns it."""
        if self._bound is not None or self._server is not None:
            assert self.port is not None
            return self.port
        interceptors = [TokenInterceptor(self.config.token)] if self.config.token else []
        server = grpc.aio.server(interceptors=interceptors)
        pb_grpc.add_ControlServicer_to_server(self._servicer, server)
        creds = self.config.credentials()
        try:
            if creds is None:
                port = server.add_insecure_port(self.config.address)
            else:
                port = server.add_secure_port(self.config.address, creds)
        except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
            raise ConfigError(f"cannot listen on {self.config.address}: {e}") from e
        self._bound, self.port = server, port
        return port

    async def start(self) -> int:
        assert self._server is None, "already started"
        port = self.bind()
        server, self._bound = self._bound, None
        assert server is not None
        await server.start()
        self._server = server
        logger.info("control API on %s (port %d, %s, %s)", self.config.address, port,
                    "TLS" if self.config.tls_cert else "plaintext",
                    "token" if self.config.token else "no token")
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops serving (or lets go of a bound address); idempotent. Event
        streams end first; the backend's bus stays open."""
        if self._bound is not None:
            bound, self._bound = self._bound, None
            await bound.stop(None)
        if self._server is None:
            return
        server, self._server = self._server, None
        self._servicer.close_streams()
        await server.stop(self.config.grace_s if grace_s is None else grace_s)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
