"""`RequestHandle`: one client request as the controller sees it, across any
number of migrations. The stream it yields is the concatenation of each hop's
tokens; a hop's engine request id is `f"{request_id}#{hop}"`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llumigrate.errors import MigrationRefused

# Sampling features whose state cannot be carried to another engine exactly.
_PENALTIES = ("presence_penalty", "frequency_penalty")


@dataclass
class StreamDelta:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    # When the request asked for logprobs: per token, [[token_id, logprob,
    # rank], ...] (the sampled token first), or None where a token's logprobs
    # were lost (a token recovered from a stopped source's record).
    logprobs: list[list[list] | None] | None = None


@dataclass
class RequestHandle:
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict
    priority: int
    instance_id: str
    hop: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    # Aligned with output_token_ids when the request asked for logprobs, else None.
    output_logprobs: list[list[list] | None] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: object = None
    error: str | None = None
    migrating: bool = False
    abort_requested: bool = False
    num_migrations: int = 0
    num_failovers: int = 0
    # Set when the current hop failed before producing a token while a migration
    # was committing it: the coordinator rolls back instead of ending the stream.
    hop_error: str | None = None
    committing: bool = False     # a migration is committing the current hop
    # Tokens a failover replay will produce again: checked and not re-streamed.
    replay_expected: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    # When it joined its current instance's queue: arrival, then each new hop
    # (an engine queues a new hop behind what it already has).
    queued_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival time of each delta
    token_counts: list[int] = field(default_factory=list)   # tokens in each delta (same order)
    # Told once, when the request finishes, whatever finished it (the cluster's listener).
    on_finish: Callable[[RequestHandle], None] | None = field(default=None, repr=False)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _token_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def engine_rid(self) -> str:
        return f"{self.request_id}#{self.hop}"

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def decode_rate(self, window: int = 16) -> float | None:
        """Tokens per second over its last `window` deltas (None before two):
        how fast it is generating now, where it runs now."""
        k = min(window, len(self.token_times))
        if k < 2:
            return None
        elapsed = self.token_times[-1] - self.token_times[-k]
        return sum(self.token_counts[-k + 1:]) / elapsed if elapsed > 0 else None

    # -- fed by the controller ---------------------------------------------------
    def __post_init__(self) -> None:
        if self.queued_at is None:
            self.queued_at = self.arrival
        if self.output_logprobs is None and self.sampling.get("logprobs") is not None:
            self.output_logprobs = []

    def append(self, tokens: list[int], logprobs: list | None = None) -> bool:
        """Add a hop's new tokens (and their logprobs, one entry per token,
        when the request asked for them). False if they contradict the tokens
        a failover replay was expected to reproduce (nothing is added then)."""
        if logprobs is not None and len(logprobs) != len(tokens):
            logprobs = None  # misaligned: never attach a token's logprobs to another
        if self.replay_expected and tokens:
            n = min(len(tokens), len(self.replay_expected))
            if list(tokens[:n]) != self.replay_expected[:n]:
                return False
            del self.replay_expected[:n]
            tokens = tokens[n:]
            logprobs = logprobs[n:] if logprobs is not None else None
        if not tokens:
            return True
        if self.output_logprobs is not None:
            logprobs = list(logprobs) if logprobs is not None else [None] * len(tokens)
            self.output_logprobs.extend(logprobs)
        else:
            logprobs = None
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.token_times.append(now)
        self.token_counts.append(len(tokens))
        self.output_token_ids.extend(tokens)
        self._queue.put_nowait(StreamDelta(list(tokens), logprobs=logprobs))
        self._token_event.set()
        return True

    def finish(self, reason: str | None, stop_reason: object = None, error: str | None = None) -> None:
        """End the stream; only the first call counts (and calls `on_finish`)."""
        if self.finished:
            return
        self.finished, self.finish_reason = True, reason
        self.stop_reason, self.error = stop_reason, error
        self._queue.put_nowait(StreamDelta([], True, reason))
        self._done.set()
        self._token_event.set()
        if self.on_finish is not None:
            self.on_finish(self)

    # -- read by clients -----------------------------------------------------
    async def stream(self):
        """Yield `StreamDelta`s until the request finishes."""
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finished:
                return

    async def wait(self, timeout: float | None = None) -> RequestHandle:
        await asyncio.wait_for(self._done.wait(), timeout)
        return self

    def fail_hop(self, error: str) -> None:
        """The hop being committed failed before its first token (see `hop_error`)."""
        self.hop_error = error
        self._token_event.set()

    async def wait_tokens(self, n: int, timeout: float | None = None) -> None:
        """Wait until at least `n` output tokens arrived (or it finished, or
        its hop failed)."""
        async def _wait() -> None:
            while len(self.output_token_ids) < n and not self.finished and self.hop_error is None:
                self._token_event.clear()
                await self._token_event.wait()
        await asyncio.wait_for(_wait(), timeout)

    # -- migration helpers -----------------------------------------------------
    def check_migratable(self) -> None:
        """Raise MigrationRefused if this request's state cannot move exactly."""
        s = self.sampling
        if s.get("n", 1) != 1:
            raise MigrationRefused("parallel sampling (n > 1) cannot be migrated")
        for name in _PENALTIES:
            if s.get(name):
                raise MigrationRefused(f"{name} counts output tokens; it cannot be carried exactly")
        if s.get("structured_outputs"):
            raise MigrationRefused("structured output (grammar) state cannot be carried")
        if self.finished:
            raise MigrationRefused("request already finished")
        if self.migrating:
            raise MigrationRefused("request is already migrating")

    def continuation_sampling(self, num_generated: int) -> dict:
        """Sampling for the next hop after `num_generated` output tokens."""
        s = dict(self.sampling)
        if s.get("max_tokens") is not None:
            s["max_tokens"] = int(s["max_tokens"]) - num_generated
        if s.get("min_tokens"):
            s["min_tokens"] = max(0, int(s["min_tokens"]) - num_generated)
        return s
