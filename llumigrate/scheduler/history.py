"""`MigrationHistory`: when and from where each request last migrated.

Pure data for the anti-ping-pong rules: a request is not moved again within
`cooldown_s` of its last migration, nor back to the instance it left within
`no_return_s`. Immutable: `record` and `forget` return a new history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class MigrationRecord:
    at: float          # scheduler clock when the migration started
    source: str
    destination: str


@dataclass(frozen=True)
class MigrationHistory:
    records: Mapping[str, MigrationRecord] = field(default_factory=lambda: MappingProxyType({}))

    def record(self, request_id: str, source: str, destination: str, at: float) -> MigrationHistory:
        """The history after `request_id` started migrating at `at`."""
        return self._with({**self.records, request_id: MigrationRecord(at, source, destination)})

    def forget(self, *request_ids: str) -> MigrationHistory:
        """The history without finished requests."""
        return self._with({k: v for k, v in self.records.items() if k not in request_ids})

    def prune(self, now: float, horizon_s: float) -> MigrationHistory:
        """The history without records older than `horizon_s` (they constrain nothing)."""
        return self._with({k: v for k, v in self.records.items() if now - v.at < horizon_s})

    def cooling(self, request_id: str, now: float, cooldown_s: float) -> bool:
        """Whether the request migrated less than `cooldown_s` ago."""
        rec = self.records.get(request_id)
        return rec is not None and now - rec.at < cooldown_s

    def returning(self, request_id: str, destination: str, now: float, no_return_s: float) -> bool:
        """Whether moving the request to `destination` sends it straight back."""
        rec = self.records.get(request_id)
        return rec is not None and rec.source == destination and now - rec.at < no_return_s

    @staticmethod
    def _with(records: dict[str, MigrationRecord]) -> MigrationHistory:
        return MigrationHistory(MappingProxyType(records))
