"""Prometheus metrics of a llumigrate deployment, on a registry of their own
(so several can coexist in one process), served on vLLM's `/metrics` beside
vLLM's own serving metrics (`expose`).

Every name starts with `llumigrate_`. The controller feeds instance figures,
dispatches, migrations and refusals; vLLM's metrics (requests, tokens, TTFT,
TPOT, queue and KV figures, per engine) come from vLLM's frontend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.metrics_core import Metric

INSTANCE_FIGURES = {
    "free_blocks": "Free KV-cache blocks.",
    "num_blocks": "Usable KV-cache blocks.",
    "num_running": "Requests running.",
    "num_waiting": "Requests waiting.",
    "kv_cache_usage": "Fraction of KV-cache blocks in use (0..1).",
    "num_preempted": "Requests the engine preempted for lack of KV blocks, since it started.",
    "up": "1 if the instance answers, else 0.",
    "draining": "1 if the instance takes no new requests, else 0.",
}

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REQUEST_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_BYTES = tuple(float(1 << n) for n in range(10, 36, 2))  # 1 KiB .. 16 GiB


class Metrics:
    """Owns the registry and every metric. Methods never raise for a figure
    of an unknown instance: the instance appears on first use."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instance = {name: Gauge(f"llumigrate_instance_{name}", doc, ["instance"], registry=r)
                         for name, doc in INSTANCE_FIGURES.items()}
        self.dispatches = Counter("llumigrate_dispatches", "Requests dispatched to an instance.",
                                  ["instance"], registry=r)
        self.migrations = Counter("llumigrate_migrations", "Migrations by outcome and reason.",
                                  ["outcome", "reason"], registry=r)
        self.migration_stage = Histogram("llumigrate_migration_stage_seconds", "Time in each migration stage.",
                                         ["stage"], buckets=_SECONDS, registry=r)
        self.migration_bytes = Histogram("llumigrate_migration_bytes", "KV bytes moved by one migration.",
                                         buckets=_BYTES, registry=r)
        self.migration_downtime = Histogram("llumigrate_migration_downtime_seconds",
                                            "Time a migrating request made no progress.",
                                            buckets=_SECONDS, registry=r)
        self.loop_lag = Histogram("llumigrate_event_loop_lag_seconds",
                                  "How late the serving process's event loop woke the scheduler's round "
                                  "(a busy or CPU-starved loop delays every stream and dispatch).",
                                  buckets=_SECONDS, registry=r)
        self.refusals = Counter("llumigrate_migration_refusals",
                                "Migrations refused before they started (the request kept running where "
                                "it was), by reason.", ["reason"], registry=r)
        self._bridge: _Bridge | None = None

    # -- fed by the controller ---------------------------------------------------------
    def set_instance(self, instance_id: str, **figures: float) -> None:
        """Set some of an instance's figures (keys of `INSTANCE_FIGURES`)."""
        unknown = set(figures) - set(INSTANCE_FIGURES)
        if unknown:
            raise ValueError(f"unknown instance figures {sorted(unknown)}; allowed: {list(INSTANCE_FIGURES)}")
        for name, value in figures.items():
            self.instance[name].labels(instance_id).set(float(value))

    def remove_instance(self, instance_id: str) -> None:
        """Drop an instance's gauges (it left the cluster)."""
        for gauge in self.instance.values():
            try:
                gauge.remove(instance_id)
            except KeyError:
                pass

    def observe_dispatch(self, instance_id: str) -> None:
        self.dispatches.labels(instance_id).inc()

    def observe_migration(self, outcome: str, reason: str, phase_s: dict[str, float] | None = None,
                          num_bytes: int | None = None, downtime_s: float | None = None) -> None:
        """One migration ended. `outcome`: e.g. "committed", "aborted", "refused";
        `reason`: why it started (or failed); `phase_s`: seconds per stage name."""
        self.migrations.labels(outcome, reason).inc()
        for stage, seconds in (phase_s or {}).items():
            self.migration_stage.labels(stage).observe(seconds)
        if num_bytes is not None:
            self.migration_bytes.observe(num_bytes)
        if downtime_s is not None:
            self.migration_downtime.observe(downtime_s)

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(max(0.0, seconds))

    def observe_refusal(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def expose(self) -> None:
        """Serve these metrics on vLLM's `/metrics` too (prometheus_client's
        global registry, which vLLM's route renders). In prometheus_client's
        multiprocess mode (several frontend processes) every metric is kept in
        the shared files vLLM's route reads already."""
        if self._bridge is None and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            self._bridge = _Bridge(self.registry)
            REGISTRY.register(self._bridge)

    def unexpose(self) -> None:
        if self._bridge is not None:
            REGISTRY.unregister(self._bridge)
            self._bridge = None


class _Bridge:
    """A collector that yields another registry's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())

    def describe(self) -> list[Metric]:
        return []
