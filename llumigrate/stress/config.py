"""`StressConfig`: everything one stress run needs, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from llumigrate.errors import ConfigError

FAULT_KINDS = ("kill_source", "kill_source_engine", "kill_destination", "drop_transfer",
               "stall_transfer", "abort_client", "exhaust_destination")
DEFECTS = ("leak-block", "dup-token")

# Engine arguments sized for several instances on one host. NOTE: no chunked
# prefill: vLLM 0.32 on CPU crashes the engine when a seeded request's prefill
# is chunked (Generator.get_offset), and under this load any short prompt can
# be chunked when longer ones fill a step's token budget.
ENGINE_ARGS = ("--dtype", "float32", "--enforce-eager", "--block-size", "32",
               "--kv-cache-memory-bytes", str(160 << 20), "--max-model-len", "4096",
               "--max-num-seqs", "16", "--no-enable-chunked-prefill",
               "--max-num-batched-tokens", "4096")


@dataclass(frozen=True)
class StressConfig:
    num_instances: int = 3
    num_requests: int = 40              # stop submitting after this many (0: duration only)
    duration_s: float = 0.0             # stop submitting after this long (0: count only)
    max_duration_s: float = 900.0       # hard cap on the load phase, whatever else
    seed: int = 0
    concurrency: int = 6                # requests in flight at once
    migrate_interval_s: float = 0.4     # pause between migration rounds
    policy_every: int = 3               # every Nth round asks the scheduler's policies
    fault_rate: float = 0.5             # chance that a migration gets the next fault
    faults: tuple[str, ...] = FAULT_KINDS
    require_all_faults: bool = False    # keep going until every fault kind fired once
    stall_s: float = 2.0                # how long a stalled transfer stays silent
    failover: bool = True
    respawn: bool = True                # replace killed instances
    min_survivors: int = 0              # a kill leaves at least this many up (0: 2, or 1 of 2)
    stage_timeout_s: float = 20.0       # pre-copy stage and commit deadlines
    stop_timeout_s: float = 10.0        # reserve and stop-and-copy deadlines (engine round trips)
    settle_s: float = 1.0               # quiet time before comparing free blocks
    quiesce_timeout_s: float = 60.0
    model: str | None = None            # None: the wider built-in tiny model
    engine_args: tuple[str, ...] = ENGINE_ARGS
    progress: bool = True
    plant_defect: str | None = None     # planted into the run: "leak-block" or "dup-token"
    self_test: bool = False             # also leak a block on purpose after the run's checks

    def __post_init__(self) -> None:
        if self.num_instances < 2:
            raise ConfigError(f"num_instances must be >= 2, got {self.num_instances}")
        if self.num_requests < 0 or self.duration_s < 0 or not self.max_duration_s > 0:
            raise ConfigError("num_requests and duration_s must be >= 0, max_duration_s > 0")
        if self.num_requests == 0 and self.duration_s == 0:
            raise ConfigError("give num_requests or duration_s (or both)")
        if self.concurrency < 1 or self.policy_every < 0 or self.migrate_interval_s < 0:
            raise ConfigError("concurrency must be >= 1, policy_every and migrate_interval_s >= 0")
        if not 0 <= self.min_survivors < self.num_instances:
            raise ConfigError(f"min_survivors must be in [0, num_instances), got {self.min_survivors}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ConfigError(f"fault_rate must be in [0, 1], got {self.fault_rate}")
        unknown = [f for f in self.faults if f not in FAULT_KINDS]
        if unknown:
            raise ConfigError(f"unknown fault kinds {unknown}; allowed: {list(FAULT_KINDS)}")
        if self.plant_defect is not None and self.plant_defect not in DEFECTS:
            raise ConfigError(f"plant_defect must be one of {list(DEFECTS)}, got {self.plant_defect!r}")
        for name in ("stall_s", "stage_timeout_s", "stop_timeout_s", "settle_s", "quiesce_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def survivors(self) -> int:
        """Instances a kill must leave up (two keep migrations going)."""
        return self.min_survivors or min(2, self.num_instances - 1)
