"""Prometheus metrics of a llumigrate deployment, on a registry of their own
(not prometheus_client's global one, so several can coexist in one process).

Every name starts with `llumigrate_`. The controller feeds instance figures,
dispatches and migrations; the HTTP frontend feeds per-request figures.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.requests = Counter("llumigrate_requests", "Finished HTTP requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("llumigrate_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("llumigrate_generation_tokens", "Output tokens of finished requests.",
                                         registry=r)
        self.ttft = Histogram("llumigrate_request_ttft_seconds", "Time to first token, from arrival.",
                              buckets=_REQUEST_SECONDS, registry=r)
        self.e2e = Histogram("llumigrate_request_e2e_seconds", "Arrival to last token.",
                             buckets=_REQUEST_SECONDS, registry=r)

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

    # -- fed by the frontend -----------------------------------------------------------
    def observe_request(self, finish_reason: str, ttft_s: float | None, e2e_s: float,
                        num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
