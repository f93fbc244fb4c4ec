"""`ClusterListener`: what the `Cluster` tells the layer above it (the global
scheduler's event bus and metrics, the stress harness). Every method is a
no-op here; override what you need. Called on the cluster's event loop; a
listener must not block and must not raise (errors are logged and dropped)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llumigrate.controller.coordinator import MigrationResult
    from llumigrate.controller.request import RequestHandle


class ClusterListener:
    def on_instance_up(self, instance_id: str, info: dict) -> None:
        """An instance joined and serves; `info` is its agent's `info` answer
        (block_size, block_bytes, num_layers, max_model_len, load, ...)."""

    def on_instance_down(self, instance_id: str, reason: str) -> None:
        """An instance was lost or left."""

    def on_load(self, instance_id: str, load: dict) -> None:
        """An instance pushed a load report (see `engine.runtime.Load`)."""

    def on_stats(self, instance_id: str, stats: object) -> None:
        """An instance's engine reported a step's scheduler stats (vLLM's SchedulerStats)."""

    def on_dispatch(self, handle: RequestHandle, instance_id: str) -> None:
        """A new request was sent to an instance."""

    def on_migration_stage(self, request_id: str, source: str, destination: str, stage: str) -> None:
        """A migration entered a protocol step (reserve, precopy, stop, commit, release)."""

    def on_migration_refused(self, request_id: str, reason: str) -> None:
        """A migration of `request_id` was refused before it started: its state
        cannot be carried exactly (`reason`, one fixed sentence per cause)."""

    def on_migration_done(self, result: MigrationResult) -> None:
        """A migration ended (committed or aborted)."""

    def on_failover(self, handle: RequestHandle, source: str, destination: str) -> None:
        """A request of a lost instance is being replayed on another one."""

    def on_finished(self, handle: RequestHandle) -> None:
        """A request finished (any reason)."""
