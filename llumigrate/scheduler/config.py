"""`SchedulerConfig`: every knob of the global scheduler's policies.

Load figures are freeness values (see `load.freeness`): free KV blocks per
running request, so `block_size * freeness` is roughly how many decode steps
an instance can take before it must preempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llumigrate.errors import ConfigError

DISPATCH_POLICIES = ("least-load", "round-robin", "power-of-two", "flood")
MIGRATION_POLICIES = ("drain", "priority", "defrag", "balance")  # the order they run in
# Seconds between migration rounds. A round costs well under a millisecond
# (a snapshot and the policies over ~100 requests), while a queue head that
# another instance could start waits for the next round.
DEFAULT_INTERVAL_S = 0.1


def _all_policies() -> frozenset[str]:
    return frozenset(MIGRATION_POLICIES)


@dataclass(frozen=True)
class SchedulerConfig:
    """Validated on construction; errors list the allowed values.

    Hysteresis: an instance is a migration source below `migrate_out_threshold`
    and a destination above `migrate_in_threshold`; between the two it is
    neither, so a cluster balanced within that gap plans nothing.
    """

    dispatch_policy: str = "least-load"
    # Any iterable of names is accepted; stored as a frozenset.
    migration_policies: frozenset[str] = field(default_factory=_all_policies)
    migrate_out_threshold: float = 1.0
    migrate_in_threshold: float = 4.0
    # Requests with priority <= this are high priority. Priority means what it
    # means in vLLM: lower values are served first, 0 is the default. At -1,
    # only requests sent with a negative priority are high and those at vLLM's
    # default are normal; at 0 or more, requests at the default are high too.
    high_priority_threshold: int = -1
    # Blocks kept free for its high-priority requests on an instance that runs
    # any: normal requests are neither dispatched into it nor left in it.
    high_priority_headroom_blocks: int = 16
    max_migrations_out: int = 1      # per source instance, in flight at once
    max_migrations_in: int = 1       # per destination instance, in flight at once
    max_balance_pairs: int = 4       # source/destination pairs balanced per round
    cooldown_s: float = 10.0         # a migrated request is not moved again this soon
    no_return_s: float = 60.0        # ... nor back to where it came from this soon
    min_remaining_tokens: int = 8    # not worth moving a request this close to its end
    # ... nor one with fewer tokens left than this many times what it is
    # expected to generate while it migrates (its measured decode rate times
    # the cost model's estimate): it would likely finish on its source first,
    # and the copy, and the blocks held for it at the destination, be wasted.
    end_margin: float = 2.0
    # Growth room: blocks the running and queued requests need to generate
    # this many more tokens each (or up to their max_tokens). A queued request
    # is re-dispatched only where it and what is there have all of it; a
    # running request moved to make room may add no more shortfall of it at
    # its destination than it relieves at its source.
    growth_horizon_tokens: int = 256
    # A balance move must relieve at least this many blocks of that shortfall
    # in all (at its source, less what it adds at its destination): it saves
    # preemptions, or it is not worth its copy. 0 also allows moves that only
    # even out freeness (proactive balancing, as in Llumnix).
    balance_min_relief_blocks: int = 1
    stale_report_s: float | None = None  # older reports: instance takes no new work
    seed: int = 0                    # power-of-two's sampling

    def __post_init__(self) -> None:
        object.__setattr__(self, "migration_policies", frozenset(self.migration_policies))
        if self.dispatch_policy not in DISPATCH_POLICIES:
            raise ConfigError(f"dispatch_policy must be one of {', '.join(DISPATCH_POLICIES)}; "
                              f"got {self.dispatch_policy!r}")
        unknown = sorted(set(self.migration_policies) - set(MIGRATION_POLICIES))
        if unknown:
            raise ConfigError(f"migration_policies must be among {', '.join(MIGRATION_POLICIES)}; "
                              f"got {', '.join(map(repr, unknown))}")
        if not self.migrate_in_threshold > self.migrate_out_threshold:
            raise ConfigError("migrate_in_threshold must be > migrate_out_threshold (the gap is the "
                              f"hysteresis); got {self.migrate_in_threshold} <= "
                              f"{self.migrate_out_threshold}")
        for name in ("high_priority_headroom_blocks", "max_migrations_out", "max_migrations_in",
                     "max_balance_pairs", "min_remaining_tokens", "growth_horizon_tokens", "cooldown_s",
                     "balance_min_relief_blocks", "end_margin"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.high_priority_threshold, bool) or not isinstance(self.high_priority_threshold, int):
            raise ConfigError("high_priority_threshold must be an int (a vLLM priority: lower is served "
                              f"first; requests at or below it are high priority), "
                              f"got {self.high_priority_threshold!r}")
        if self.no_return_s < self.cooldown_s:
            raise ConfigError(f"no_return_s must be >= cooldown_s ({self.cooldown_s}), "
                              f"got {self.no_return_s}")
        if self.stale_report_s is not None and not self.stale_report_s > 0:
            raise ConfigError(f"stale_report_s must be > 0 or None, got {self.stale_report_s}")

    def enabled(self, policy: str) -> bool:
        assert policy in MIGRATION_POLICIES, policy
        return policy in self.migration_policies

    def is_high(self, priority: int) -> bool:
        """Whether a request of that (vLLM) priority gets high-priority
        treatment: `priority <= high_priority_threshold`, lower values being
        more important, as in vLLM's priority scheduling."""
        return priority <= self.high_priority_threshold
