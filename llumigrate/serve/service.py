"""`Service`: everything `llumigrate serve` runs, on one event loop.

    cluster (N agents) -> observer (events + metrics) -> GlobalScheduler
    -> OpenAI HTTP frontend (ClusterGenerateBackend)
    -> gRPC control API (ClusterControlBackend)

`start()` brings the instances up first (nothing is served before they
are), then the scheduler loop, the control API and the HTTP endpoint;
`stop()` takes them down in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llumigrate.control.events import EventBus
from llumigrate.control.server import DEFAULT_ADDRESS, ControlServer, ControlServerConfig
from llumigrate.controller.cluster import RETAIN_FINISHED, Cluster
from llumigrate.controller.restart import RestartPolicy
from llumigrate.errors import ConfigError
from llumigrate.frontend.app import build_app
from llumigrate.frontend.metrics import Metrics
from llumigrate.frontend.server import bind_socket, bound_port, make_server
from llumigrate.migration.protocol import MigrationConfig
from llumigrate.netutil import is_loopback
from llumigrate.scheduler import DEFAULT_INTERVAL_S, SchedulerConfig
from llumigrate.serve.control_backend import ClusterControlBackend
from llumigrate.serve.generate_backend import ClusterGenerateBackend
from llumigrate.serve.observer import ServeObserver
from llumigrate.serve.scheduler import GlobalScheduler

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServeConfig:
    model: str
    num_instances: int = 2
    engine_args: tuple[str, ...] = ()
    served_model_name: str | None = None
    host: str = "127.0.0.1"          # OpenAI endpoint
    port: int = 8000
    api_key: str | None = None       # required off loopback
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

    def __post_init__(self) -> None:
        if self.num_instances < 0:
            raise ConfigError(f"num_instances must be >= 0, got {self.num_instances}")
        if self.retain_finished < 0:
            raise ConfigError(f"retain_finished must be >= 0, got {self.retain_finished}")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(f"serving HTTP on {self.host} needs --api-key "
                              "(only loopback is served without one)")


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
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
        self.http = None
        self.http_port: int | None = None
        self.control_port: int | None = None
        self._http_task = None

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
            first = next(iter(self.cluster.instances.values()), None)
            max_len = int(first.info["max_model_len"]) if first else 0
            backend = ClusterGenerateBackend(
                self.cluster, self.scheduler, model_name=self.config.served_model_name or self.config.model,
                model_path=self.config.model, max_model_len=max_len)
            app = build_app(backend, self.metrics, api_key=self.config.api_key)
            self.http = make_server(app, self.config.host, self.config.port, self.config.log_level)
        except BaseException:
            sock.close()
            raise
        self._http_task = asyncio.get_running_loop().create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self._http_task.done():
                await self._http_task  # raises why it could not start
                raise ConfigError(f"HTTP server on {self.config.host}:{self.config.port} did not start")
            await asyncio.sleep(0.05)
        self.http_port = bound_port(self.http)
        return self

    async def stop(self) -> None:
        if self.http is not None:
            self.http.should_exit = True
            if self._http_task is not None:
                await self._http_task
        await self.control.stop()
        await self.scheduler.stop()
        await self.cluster.close()
        self.bus.close()

    @property
    def run_dir(self) -> Path:
        return self.cluster.run_dir
