"""`ServeObserver`: the cluster's listener in `llumigrate serve`. Turns what
the cluster reports into control-API events (`control.events`) and Prometheus
metrics (`serve.metrics`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llumigrate.control import events as ev
from llumigrate.control.events import EventBus
from llumigrate.controller.coordinator import MigrationResult
from llumigrate.controller.listener import ClusterListener
from llumigrate.controller.request import RequestHandle
from llumigrate.serve.metrics import Metrics

LOAD_FIGURES = ("free_blocks", "num_blocks", "num_running", "num_waiting", "kv_cache_usage", "num_preempted")


class ServeObserver(ClusterListener):
    def __init__(self, bus: EventBus, metrics: Metrics) -> None:
        self.bus, self.metrics = bus, metrics
        # Why a migration was started (the policy's reason), by request id;
        # migrations nobody registered are "manual" (the control API, tests).
        self.reasons: dict[str, str] = {}
        self.block_bytes: dict[str, int] = {}   # instance -> bytes of one block, all layers
        # Where instances' scheduler stats go (vLLM's stat loggers, through the frontend's client).
        self.stats_sink: Callable[[str, Any], None] | None = None

    def on_stats(self, instance_id: str, stats: Any) -> None:
        if self.stats_sink is not None:
            self.stats_sink(instance_id, stats)

    def on_instance_up(self, instance_id: str, info: dict) -> None:
        self.block_bytes[instance_id] = int(info.get("block_bytes", 0)) * int(info.get("num_layers", 1))
        self.bus.emit(ev.INSTANCE_UP, instance_id=instance_id)
        self.metrics.set_instance(instance_id, up=1, draining=0)

    def on_instance_down(self, instance_id: str, reason: str) -> None:
        self.bus.emit(ev.INSTANCE_DOWN, instance_id=instance_id, reason=reason)
        self.metrics.set_instance(instance_id, up=0)

    def on_load(self, instance_id: str, load: dict) -> None:
        self.metrics.set_instance(instance_id, **{k: float(load[k]) for k in LOAD_FIGURES if k in load})

    def on_loop_lag(self, seconds: float) -> None:
        """The scheduler's round woke `seconds` later than it asked to."""
        self.metrics.observe_loop_lag(seconds)

    def on_dispatch(self, handle: RequestHandle, instance_id: str) -> None:
        self.bus.emit(ev.DISPATCH, request_id=handle.request_id, instance_id=instance_id,
                      priority=str(handle.priority))
        self.metrics.observe_dispatch(instance_id)

    def on_migration_stage(self, request_id: str, source: str, destination: str, stage: str) -> None:
        self.bus.emit(ev.MIGRATION_STAGE, request_id=request_id, instance_id=source,
                      destination_id=destination, stage=stage)

    def on_migration_refused(self, request_id: str, reason: str) -> None:
        self.reasons.pop(request_id, None)
        self.metrics.observe_refusal(reason)

    def on_migration_done(self, result: MigrationResult) -> None:
        reason = self.reasons.pop(result.request_id, "manual")
        outcome = "committed" if result.committed else "aborted"
        downtime_ms = f"{1000 * result.downtime_s:.1f}" if result.downtime_s is not None else ""
        self.bus.emit(ev.MIGRATION_DONE, request_id=result.request_id, instance_id=result.source,
                      destination_id=result.destination, state=result.state, reason=result.reason,
                      policy=reason, downtime_ms=downtime_ms, total_ms=f"{1000 * result.total_s:.1f}")
        num_bytes = None
        if result.committed and result.destination in self.block_bytes:
            num_bytes = self.block_bytes[result.destination] * (sum(result.blocks_per_stage) + 1)
        self.metrics.observe_migration(outcome, reason, result.phase_s, num_bytes,
                                       result.downtime_s if result.committed else None)

    def on_failover(self, handle: RequestHandle, source: str, destination: str) -> None:
        self.bus.emit(ev.DISPATCH, request_id=handle.request_id, instance_id=destination,
                      failover_from=source)
        self.metrics.observe_dispatch(destination)
