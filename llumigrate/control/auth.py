"""Who may call: loopback binds are open; any other bind needs a token, which
every call (streams included) must carry as `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

import grpc

from llumigrate.errors import ConfigError
from llumigrate.netutil import is_loopback  # noqa: F401  (re-exported for control.server)

AUTH_KEY = "authorization"
DENIED = "missing or wrong token (send 'authorization: Bearer <token>' metadata)"


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6host]:port` -> (host, port). ConfigError if malformed."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"address must be HOST:PORT (port 0-65535), got {address!r}")
    return host, int(port)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends with `token` (none without one)."""
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that lacks the token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("the token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if self._authorized(details.invocation_metadata or ()):
            return handler
        return _denying(handler)

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        for key, value in metadata:
            if key == AUTH_KEY:
                got = value if isinstance(value, bytes) else value.encode()
                # NOTE: constant-time compare: no timing hint of the token's prefix.
                return hmac.compare_digest(got, self._expected)
        return False


async def _deny(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_stream(request: object, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield  # makes this an async generator, as a server-streaming handler must be


def _denying(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that refuses the call."""
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, handler.request_deserializer,
                                                   handler.response_serializer)
    deserializer = handler.request_deserializer if handler is not None else None
    return grpc.unary_unary_rpc_method_handler(_deny, deserializer)
