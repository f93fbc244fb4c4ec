"""vLLM's own OpenAI-compatible server, run by `llumigrate serve` over the
cluster: vLLM's `AsyncLLM` (over `ClusterEngineClient`) and vLLM's FastAPI
app, served by uvicorn on a socket bound before the engines start.

Every route, request field and response is vLLM's; llumigrate adds its own
metrics to vLLM's `/metrics` and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from llumigrate.controller.cluster import Cluster
from llumigrate.engine.vllm_api import (build_vllm_app, engine_args_from_namespace, frontend_config,
                                        make_frontend_llm, make_http_server)
from llumigrate.errors import ConfigError
from llumigrate.serve.engine_client import ClusterEngineClient
from llumigrate.serve.scheduler import GlobalScheduler

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), taken before anything
    slow starts, so that a port in use fails fast with a clear error and
    nothing started meanwhile can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


class VllmServer:
    """vLLM's AsyncLLM over engine-core client `client` and vLLM's app,
    served on `sock` (one frontend process's server)."""

    def __init__(self, args: argparse.Namespace, client: Any) -> None:
        self.args, self.client = args, client
        self.llm: Any = None
        self.server: Any = None
        self._task: asyncio.Task | None = None

    async def start(self, sock: socket.socket, instance_infos: list[dict],
                    remove_lora: Callable[[int], Awaitable[Any]]) -> None:
        config = frontend_config(engine_args_from_namespace(self.args))
        adopt_instance_figures(config, instance_infos)
        self.llm = make_frontend_llm(config, self.client, log_stats=not self.args.disable_log_stats,
                                     log_requests=bool(self.args.enable_log_requests))
        app = await build_vllm_app(self.llm, self.args)
        forget_unloaded_loras(app.state, remove_lora)
        self.server = make_http_server(app, self.args)
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                await self._task  # raises why it could not start
                raise ConfigError(f"HTTP server on {self.args.host}:{self.args.port} did not start")
            await asyncio.sleep(0.05)

    @property
    def port(self) -> int | None:
        if self.server is None or not self.server.servers:
            return None
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def wait_stopped(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            await self.wait_stopped()
        if self.llm is not None:
            self.llm.shutdown()


class Frontend(VllmServer):
    """The serve process's own frontend: over `ClusterEngineClient`."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, scheduler: GlobalScheduler) -> None:
        super().__init__(args, None)
        self.cluster, self.scheduler = cluster, scheduler

    async def start(self, sock: socket.socket) -> None:  # type: ignore[override]
        """Build vLLM's frontend over the instances now up, and serve."""
        indexes = {iid: n for n, iid in enumerate(self.cluster.instances)}
        self.client = ClusterEngineClient(self.cluster, self.scheduler, indexes)
        await super().start(sock, [i.info for i in self.cluster.instances.values() if i.up],
                            self.cluster.remove_lora)


def adopt_instance_figures(config: Any, infos: list[dict]) -> None:
    """What the engines settled on at startup (as vLLM's frontend adopts its
    engine's ready message): the shortest max_model_len, the blocks of all."""
    if not infos:
        return
    model = config.model_config
    model.max_model_len = min([model.max_model_len] + [int(i["max_model_len"]) for i in infos])
    config.cache_config.num_gpu_blocks = sum(int(i.get("num_gpu_blocks", 0)) for i in infos)
    config.cache_config.block_size = int(infos[0]["block_size"])


def forget_unloaded_loras(state: Any, remove_lora: Callable[[int], Awaitable[Any]]) -> None:
    """vLLM's /v1/unload_lora_adapter forgets an adapter in the frontend only
    (it never calls `remove_lora`): remove it from the cluster too, or every
    instance that joins later loads it (and fails to join once its files are
    gone)."""
    models = getattr(state, "openai_serving_models", None)
    if models is None:
        return
    unload = models.unload_lora_adapter

    async def unload_and_forget(request: Any, *args: Any, **kwargs: Any) -> Any:
        lora = models.lora_requests.get(request.lora_name)
        result = await unload(request, *args, **kwargs)
        if lora is not None and request.lora_name not in models.lora_requests:
            await remove_lora(lora.lora_int_id)
        return result
    models.unload_lora_adapter = unload_and_forget
