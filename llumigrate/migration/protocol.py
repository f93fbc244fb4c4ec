"""The migration protocol as a pure state machine.

One `Migration` object per attempt to move one request from a source to a
destination instance. It performs no I/O: the coordinator reports what
happened (`on_*` methods) and asks what to do next (`next_action`). Every
state has a deadline (`timeout_for`) and every failure maps to exactly one
rollback (`rollback_action`), so an abort at any point is handled the same
way whatever caused it.

States and transitions::

    RESERVING --reserved--> PRECOPY --(delta <= threshold or stages == max)--> STOPPING
    STOPPING --stopped--> COMMITTING --committed--> RELEASING --released--> DONE
    any state --fail/abort--> ABORTED   (request keeps running on the source,
                                         or finished there)
    STOPPING/COMMITTING --fail--> ROLLING_BACK --resumed--> ABORTED

Before STOPPING the source never stopped decoding, so an abort only cancels
destination work. From STOPPING on the source request is stopped and its KV
blocks are held, so an abort must resume it on the source (ROLLING_BACK).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llumigrate.errors import ConfigError


class State(enum.Enum):
    RESERVING = "reserving"
    PRECOPY = "precopy"
    STOPPING = "stopping"
    COMMITTING = "committing"
    RELEASING = "releasing"
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (State.DONE, State.ABORTED)

    @property
    def source_stopped(self) -> bool:
        """True once the source request is stopped and its blocks are held."""
        return self in (State.STOPPING, State.COMMITTING, State.ROLLING_BACK)


class Action(enum.Enum):
    RESERVE = "reserve"          # ask the destination for room
    PRECOPY = "precopy"          # copy the blocks not yet sent, source keeps decoding
    STOP = "stop"                # stop the source request, seal its tokens and blocks
    COMMIT = "commit"            # resume the request on the destination
    RELEASE = "release"          # free the source's held blocks
    CANCEL = "cancel"            # undo destination-side work; source untouched
    RESUME_SOURCE = "resume_source"  # continue the stopped request on the source
    NONE = "none"                # terminal


# Pre-copy pacing (MigrationConfig.precopy_rate_mib_s): the default, and the
# least a paced pull may move (transfer.pacing.MIN_RATE_BYTES_PER_S; a source
# gives up on a slower puller).
PRECOPY_RATE_MIB_S = 1024.0
MIN_PRECOPY_RATE_MIB_S = 128


def check_precopy_rate(rate_mib_s: float, name: str = "precopy_rate_mib_s") -> None:
    """Raise ConfigError unless `rate_mib_s` is 0 (no limit) or at least the minimum."""
    if rate_mib_s and not rate_mib_s >= MIN_PRECOPY_RATE_MIB_S:
        raise ConfigError(f"{name} must be 0 (no limit) or >= {MIN_PRECOPY_RATE_MIB_S}, got {rate_mib_s}")


@dataclass(frozen=True)
class MigrationConfig:
    """Knobs of one migration. Validated on construction."""

    max_precopy_stages: int = 3
    # Stop-and-copy once the blocks left to send are at most this many.
    stop_threshold_blocks: int = 1
    reserve_timeout_s: float = 5.0
    stage_timeout_s: float = 30.0
    stop_timeout_s: float = 5.0
    commit_timeout_s: float = 30.0
    release_timeout_s: float = 5.0
    # Pre-copy stages copy at most this many MiB/s (0 = no limit), so that
    # the copy leaves the engines their memory bandwidth and cores; the final
    # stop-and-copy is never paced. CPU transports only.
    precopy_rate_mib_s: float = PRECOPY_RATE_MIB_S
    # Baseline for benchmarks: move no KV, re-prefill on the destination.
    recompute: bool = False

    def __post_init__(self) -> None:
        if self.max_precopy_stages < 0:
            raise ConfigError(f"max_precopy_stages must be >= 0, got {self.max_precopy_stages}")
        if self.stop_threshold_blocks < 0:
            raise ConfigError(
                f"stop_threshold_blocks must be >= 0, got {self.stop_threshold_blocks}"
            )
        check_precopy_rate(self.precopy_rate_mib_s)
        for name in ("reserve", "stage", "stop", "commit", "release"):
            value = getattr(self, f"{name}_timeout_s")
            if not value > 0:
                raise ConfigError(f"{name}_timeout_s must be > 0, got {value}")

    def paced_copy_s(self, nbytes: int) -> float:
        """How long a pre-copy of `nbytes` takes at the paced rate at least
        (0 unpaced); a stage's deadline is extended by this much."""
        return nbytes / (self.precopy_rate_mib_s * 2**20) if self.precopy_rate_mib_s else 0.0


@dataclass
class Migration:
    """State of one migration attempt. See the module docstring."""

    config: MigrationConfig = field(default_factory=MigrationConfig)
    state: State = State.RESERVING
    stages_done: int = 0
    blocks_sent: int = 0
    abort_reason: str = ""
    abort_stage: str = ""
    history: list[State] = field(default_factory=list)

    # -- queries -----------------------------------------------------------
    def next_action(self, blocks_available: int = 0) -> Action:
        """What the coordinator does next.

        `blocks_available` is the number of full blocks the source request has
        now; only consulted in PRECOPY, to decide between another stage and
        the final stop-and-copy.
        """
        s = self.state
        if s is State.RESERVING:
            return Action.RESERVE
        if s is State.PRECOPY:
            delta = max(0, blocks_available - self.blocks_sent)
            if self.stages_done >= self.config.max_precopy_stages:
                return Action.STOP
            if self.stages_done > 0 and delta <= self.config.stop_threshold_blocks:
                return Action.STOP
            if delta == 0:
                return Action.STOP
            return Action.PRECOPY
        if s is State.STOPPING:
            return Action.STOP
        if s is State.COMMITTING:
            return Action.COMMIT
        if s is State.RELEASING:
            return Action.RELEASE
        if s is State.ROLLING_BACK:
            return Action.RESUME_SOURCE
        return Action.NONE

    def timeout_for(self) -> float:
        """Deadline in seconds for the work of the current state."""
        c = self.config
        return {
            State.RESERVING: c.reserve_timeout_s,
            State.PRECOPY: c.stage_timeout_s,
            State.STOPPING: c.stop_timeout_s,
            State.COMMITTING: c.commit_timeout_s,
            State.RELEASING: c.release_timeout_s,
            State.ROLLING_BACK: c.commit_timeout_s,
        }.get(self.state, 0.0)

    def rollback_action(self) -> Action:
        """How to undo the current state's work after a failure."""
        if self.state.source_stopped:
            return Action.RESUME_SOURCE
        if self.state in (State.RESERVING, State.PRECOPY):
            return Action.CANCEL
        return Action.NONE

    # -- events ------------------------------------------------------------
    def on_reserved(self) -> None:
        self._expect(State.RESERVING)
        self._go(State.PRECOPY)

    def on_stage_done(self, blocks_sent_total: int) -> None:
        """A pre-copy stage finished; the destination now has that many blocks."""
        self._expect(State.PRECOPY)
        assert blocks_sent_total >= 0
        self.stages_done += 1
        self.blocks_sent = blocks_sent_total

    def on_stop_begin(self) -> None:
        self._expect(State.PRECOPY)
        self._go(State.STOPPING)

    def on_stopped(self) -> None:
        self._expect(State.STOPPING)
        self._go(State.COMMITTING)

    def on_committed(self) -> None:
        self._expect(State.COMMITTING)
        self._go(State.RELEASING)

    def on_released(self) -> None:
        self._expect(State.RELEASING)
        self._go(State.DONE)

    def on_failure(self, reason: str) -> Action:
        """A step failed or timed out. Returns the rollback to perform.

        From RESERVING/PRECOPY the migration ends ABORTED at once (the
        coordinator still performs CANCEL). From STOPPING/COMMITTING it goes
        to ROLLING_BACK until `on_resumed`. From RELEASING the migration has
        committed: a failed release is not an abort (the source frees the
        blocks on its own lease timeout), so it ends DONE.
        """
        if self.state.terminal:
            return Action.NONE
        action = self.rollback_action()
        if self.state is State.RELEASING:
            self._go(State.DONE)
            return Action.NONE
        if not self.abort_reason:
            self.abort_reason, self.abort_stage = reason, self.state.value
        if action is Action.RESUME_SOURCE:
            self._go(State.ROLLING_BACK)
        else:
            self._go(State.ABORTED)
        return action

    def on_source_finished(self) -> Action:
        """The request finished on the source before it was stopped."""
        if self.state in (State.RESERVING, State.PRECOPY):
            return self.on_failure("request finished on the source")
        return Action.NONE

    def on_finished_before_stop(self, reason: str = "request finished on the source") -> None:
        """The stop found the request already finished: nothing is held, so
        there is nothing to resume; the migration ends ABORTED."""
        self._expect(State.STOPPING)
        self.abort_reason, self.abort_stage = reason, self.state.value
        self._go(State.ABORTED)

    def on_resumed(self) -> None:
        self._expect(State.ROLLING_BACK)
        self._go(State.ABORTED)

    # -- internals -----------------------------------------------------------
    def _expect(self, *states: State) -> None:
        if self.state not in states:
            allowed = ", ".join(s.value for s in states)
            raise RuntimeError(f"migration is {self.state.value}; event needs {allowed}")

    def _go(self, state: State) -> None:
        self.history.append(self.state)
        self.state = state
