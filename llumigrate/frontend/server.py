"""Running the app with uvicorn."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

from llumigrate.errors import ConfigError


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app` (port 0: any free port; read it from
    `bound_port` once `server.started`). Serve with `await server.serve()`,
    stop with `server.should_exit = True`."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30,
                            lifespan="off")
    return uvicorn.Server(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), for `server.serve(sockets=[...])`:
    taken before anything slow starts, so that a port in use fails fast with
    a clear error and nothing started meanwhile can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on."""
    return int(server.servers[0].sockets[0].getsockname()[1])


async def serve_http(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` on the running loop until cancelled (the backend must live
    on the same loop)."""
    server = make_server(app, host, port, log_level)
    try:
        await server.serve()
    except asyncio.CancelledError:
        server.should_exit = True
        raise
