"""The one place where exceptions become gRPC status codes.

Typed errors carry their message to the client; anything else is a server
bug: it is logged with its traceback and the client gets INTERNAL with the
exception's type only, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from llumigrate.errors import (
    ConfigError,
    InstanceLost,
    InstanceNotFound,
    MigrationAborted,
    MigrationRefused,
    RequestNotFound,
    TransferError,
)

logger = logging.getLogger(__name__)

# Checked in order: the first class the exception is an instance of wins.
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (RequestNotFound, grpc.StatusCode.NOT_FOUND),
    (InstanceNotFound, grpc.StatusCode.NOT_FOUND),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (MigrationRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (MigrationAborted, grpc.StatusCode.ABORTED),
    (InstanceLost, grpc.StatusCode.UNAVAILABLE),
    (TransferError, grpc.StatusCode.UNAVAILABLE),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),  # asyncio's is another class before Python 3.11
)


def status_for(exc: Exception, rpc: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message to send for `exc` raised while serving `rpc`."""
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or type(exc).__name__
    logger.error("control API: %s failed unexpectedly", rpc or "a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception, rpc: str = "") -> None:
    """Ends the call with `exc`'s status; raises grpc's abort exception."""
    code, message = status_for(exc, rpc)
    await context.abort(code, message)
