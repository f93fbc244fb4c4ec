"""`Service`: everything `llumigrate serve` runs, on one event loop.

    cluster (N agents) -> observer (events + metrics) -> GlobalScheduler
    -> vLLM's OpenAI server (`frontend.py`: AsyncLLM over ClusterEngineClient)
    -> gRPC control API (ClusterControlBackend)

`start()` brings the instances up first (nothing is served before they
are), then the scheduler loop, the control API and the HTTP endpoint;
`stop()` takes them down in reverse order.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from llumigrate.control.events import EventBus
from llumigrate.control.server import DEFAULT_ADDRESS, ControlServer, ControlServerConfig
from llumigrate.controller.cluster import RETAIN_FINISHED, Cluster
from llumigrate.controller.restart import RestartPolicy
from llumigrate.engine.vllm_api import parse_vllm_serve_args
from llumigrate.errors import ConfigError
from llumigrate.migration.protocol import MigrationConfig
from llumigrate.netutil import is_loopback
from llumigrate.scheduler import DEFAULT_INTERVAL_S, SchedulerConfig
from llumigrate.serve.control_backend import ClusterControlBackend
from llumigrate.serve.frontend import Frontend, bind_socket
from llumigrate.serve.processes import FrontendProcesses
from llumigrate.serve.metrics import Metrics
from llumigrate.serve.observer import ServeObserver
from llumigrate.serve.scheduler import GlobalScheduler

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServeConfig:
    model: str
    num_instances: int = 2
    # `vllm serve`'s own arguments (frontend and engine), MODEL and the ones below aside.
    engine_args: tuple[str, ...] = ()
    served_model_name: str | tuple[str, ...] | None = None
    host: str = "127.0.0.1"          # OpenAI endpoint
    port: int = 8000
    api_key: str | tuple[str, ...] | None = None   # vLLM's (one or more); required off loopback (or VLLM_API_KEY)
    control_address: str = DEFAULT_ADDRESS
    token: str | None = None         # control API and agents; required off loopback
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    interval_s: float = DEFAULT_INTERVAL_S
    failover: bool = True
    kv_transport: str = "auto"
    engine_spin_ms: float | None = None  # None: the agents' default (2 ms on CPU hosts)
    retain_finished: int = RETAIN_FINISHED  # finished requests kept listed
    run_dir: str | None = None
    log_level: str = "info"
    restart: RestartPolicy | None = field(default_factory=RestartPolicy)  # None: a lost instance stays down
    max_failovers: int | None = 1    # replays per request when instances die under it (None: no limit)
    api_server_count: int = 1        # frontend processes on the HTTP socket (this one and N - 1 more)

    def __post_init__(self) -> None:
        if self.num_instances < 0:
            raise ConfigError(f"num_instances must be >= 0, got {self.num_instances}")
        if self.retain_finished < 0:
            raise ConfigError(f"retain_finished must be >= 0, got {self.retain_finished}")
        if self.api_server_count < 1:
            raise ConfigError(f"api_server_count must be >= 1, got {self.api_server_count}")
        if self.api_server_count > 1 and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() \
                in ("1", "true"):
            raise ConfigError("VLLM_ALLOW_RUNTIME_LORA_UPDATING cannot be used with api_server_count > 1 "
                              "(as in vLLM: each frontend process keeps its own adapter list)")
        if not is_loopback(self.host) and not (self.api_key or os.environ.get("VLLM_API_KEY")):
            raise ConfigError(f"serving HTTP on {self.host} needs --api-key or VLLM_API_KEY "
                              "(only loopback is served without one)")

    def vllm_args(self) -> argparse.Namespace:
        """The parsed `vllm serve` arguments of the frontend (ConfigError if vLLM refuses them)."""
        names = (self.served_model_name,) if isinstance(self.served_model_name, str) \
            else tuple(self.served_model_name or ())
        keys = (self.api_key,) if isinstance(self.api_key, str) else tuple(self.api_key or ())
        argv = [self.model, *self.engine_args, "--host", self.host, "--port", str(self.port),
                *(["--api-key", *keys] if keys else []),
                *(["--served-model-name", *names] if names else [])]
        return parse_vllm_serve_args(argv)

class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.args = config.vllm_args()
        self.bus = EventBus()
        self.metrics = Metrics()
        self.observer = ServeObserver(self.bus, self.metrics)
        self.cluster = Cluster(config.model, config.num_instances, list(config.engine_args),
                               run_dir=config.run_dir, migration=config.migration,
                               kv_transport=config.kv_transport, token=config.token,
                               failover=config.failover, listener=self.observer,
                               engine_spin_ms=config.engine_spin_ms,
                               retain_finished=config.retain_finished, restart=config.restart,
                               max_failovers=config.max_failovers)
        self.scheduler = GlobalScheduler(self.cluster, config.scheduler, self.observer,
                                         interval_s=config.interval_s)
        self.control = ControlServer(ClusterControlBackend(self.scheduler, self.bus),
                                     ControlServerConfig(config.control_address, config.token))
        self.frontend = Frontend(self.args, self.cluster, self.scheduler)
        self.frontends = FrontendProcesses(config.api_server_count - 1)
        self.control_port: int | None = None

    async def start(self) -> Service:
        # Both listening addresses are taken before the engines start (they
        # take 10-25 s, and open ephemeral ports of their own): an address in
        # use fails at once, and no engine's socket can take a chosen port.
        # `stop` lets go of whatever a failed start took.
        sock = bind_socket(self.config.host, self.config.port)
        try:
            self.control.bind()
            await self.cluster.start()
            self.scheduler.start()
            self.control_port = await self.control.start()
            await self.frontend.start(sock)
            assert self.frontend.client is not None
            await self.frontends.start(sock, self.args, self.frontend.client, self.cluster,
                                       self.config.log_level)
        except BaseException:
            sock.close()
            raise
        self.observer.stats_sink = self.frontend.client.on_stats if self.frontend.client else None
        self.metrics.expose()
        return self

    @property
    def http_port(self) -> int | None:
        return self.frontend.port

    async def stop(self) -> None:
        self.observer.stats_sink = None
        await self.frontends.stop()
        await self.frontend.stop()
        self.metrics.unexpose()
        await self.control.stop()
        await self.scheduler.stop()
        await self.cluster.close()
        self.bus.close()

    @property
    def run_dir(self) -> Path:
        return self.cluster.run_dir
