"""When a lost local instance is started again under its id: `RestartPolicy`
(exponential backoff; giving up after starts that fail in a row) and the
per-instance `CrashRecord` it is applied to. Pure: `Cluster` does the waiting
and the starting. An instance that starts and later crashes again is
restarted again (at most every `max_backoff_s` while it keeps crashing):
only starts that fail count towards giving up."""

from __future__ import annotations

from dataclasses import dataclass

from llumigrate.errors import ConfigError


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0        # wait before the first restart of a crash streak
    max_backoff_s: float = 60.0   # the wait doubles with each crash in a row, up to this
    max_failed_starts: int = 5    # starts that fail in a row before giving up on the instance
    stable_s: float = 300.0       # up this long, and the crashes before are forgotten

    def __post_init__(self) -> None:
        if not (0 < self.backoff_s <= self.max_backoff_s):
            raise ConfigError(f"need 0 < backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}")
        if self.max_failed_starts < 1 or self.stable_s < 0:
            raise ConfigError("max_failed_starts must be >= 1 and stable_s >= 0")

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restarting after the `crashes`-th crash in a row."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, crashes - 1))


@dataclass
class CrashRecord:
    """One instance id's recent crashes (losses and failed starts, in a row)."""
    crashes: int = 0
    failed_starts: int = 0
    up_since: float | None = None

    def on_up(self, now: float) -> None:
        self.up_since, self.failed_starts = now, 0

    def on_lost(self, now: float, policy: RestartPolicy) -> int:
        """The instance was lost: the crashes in a row, this one included."""
        if self.up_since is not None and now - self.up_since >= policy.stable_s:
            self.crashes = 0
        self.up_since = None
        self.crashes += 1
        return self.crashes

    def on_failed_start(self, policy: RestartPolicy) -> bool:
        """A restart failed: whether to give up on the instance."""
        self.crashes += 1
        self.failed_starts += 1
        return self.failed_starts >= policy.max_failed_starts
