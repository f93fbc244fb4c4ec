"""`RequestHandle`: one engine request (vLLM's `EngineCoreRequest`, as the
serve process's vLLM frontend made it) as the controller sees it, across any
number of migrations and failovers.

Each hop runs the same request, under engine id `request_id` (hop 0) or
`f"{request_id}#{hop}"`: the same prompt, the same sampling parameters, and
the output tokens of the hops before it, restored as *outputs* (never folded
into the prompt: penalties, grammars, `min_tokens` and stop checks see them
as the source did). The outputs of every hop are joined into one stream of
vLLM `EngineCoreOutput`s under `request_id`, for vLLM's frontend (`emit`)
and for Python API callers (`stream`, `output_token_ids`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llumigrate.engine.vllm_api import (EngineCoreOutput, EngineCoreRequest, core_refusal,
                                        finish_reason_name, keep_preemptions, logprob_rows,
                                        renamed_output, terminal_output)
from llumigrate.errors import MigrationRefused


@dataclass
class StreamDelta:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class RequestHandle:
    request_id: str
    core: EngineCoreRequest
    instance_id: str
    hop: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    # With output_token_ids when the request asked for logprobs: per token
    # [[token_id, logprob, rank], ...], the sampled token first, then the top
    # ones; None for a token recovered from a stopped source's record.
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
    # The serve's frontend process that owns its stream (None: this process).
    owner: str | None = None
    # Whether its current hop's agent sends its outputs to `owner` itself
    # (this process then gets only their tokens: `progress`).
    remote: bool = False
    arrival: float = field(default_factory=time.monotonic)
    # When it joined its current instance's queue: arrival, then each new hop
    # (an engine queues a new hop behind what it already has).
    queued_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival time of each delta
    token_counts: list[int] = field(default_factory=list)   # tokens in each delta (same order)
    # Where its outputs go (vLLM's frontend), with the instance they come
    # from and where in its output tokens each starts; None for Python API callers.
    emit: Callable[[str, EngineCoreOutput, int], None] | None = field(default=None, repr=False)
    # Told once, when the request finishes, whatever finished it (the cluster's listener).
    on_finish: Callable[[RequestHandle], None] | None = field(default=None, repr=False)
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _token_event: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.queued_at is None:
            self.queued_at = self.arrival
        if self.output_logprobs is None and self.wants_logprobs:
            self.output_logprobs = []

    # -- what it is ----------------------------------------------------------
    @property
    def engine_rid(self) -> str:
        return hop_id(self.request_id, self.hop)

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self.core.prompt_token_ids or ())

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def sampling(self) -> Any:
        """Its vLLM SamplingParams (None for a pooling request)."""
        return self.core.sampling_params

    @property
    def priority(self) -> int:
        """vLLM's priority: lower values are served first."""
        return int(self.core.priority)

    @property
    def max_tokens(self) -> int | None:
        sp = self.core.sampling_params
        return None if sp is None else sp.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        sp = self.core.sampling_params
        return sp is not None and sp.logprobs is not None

    def decode_rate(self, window: int = 16) -> float | None:
        """Tokens per second over its last `window` deltas (None before two):
        how fast it is generating now, where it runs now."""
        k = min(window, len(self.token_times))
        if k < 2:
            return None
        elapsed = self.token_times[-1] - self.token_times[-k]
        return sum(self.token_counts[-k + 1:]) / elapsed if elapsed > 0 else None

    # -- fed by the controller ---------------------------------------------------
    def append(self, output: EngineCoreOutput, forward: bool = True) -> None:
        """Add one engine output of the current hop (its tokens, and its end
        if it ended); the agent already took out replayed tokens the client
        had. `forward`: send it on to `emit` (False: the agent sent it to the
        frontend process that owns the stream itself)."""
        tokens = list(output.new_token_ids)
        if tokens:
            self._note_tokens(tokens, logprob_rows(output.new_logprobs, len(tokens)))
        if output.finish_reason is not None:
            self._end(finish_reason_name(output.finish_reason), output.stop_reason, None,
                      self._for_frontend(output) if forward else None)
        elif forward and (tokens or output.pooling_output is not None
                          or output.new_prompt_logprobs_tensors is not None):
            self._forward(self._for_frontend(output))

    def _note_tokens(self, tokens: list[int], logprobs: list | None = None) -> None:
        if self.output_logprobs is not None:
            self.output_logprobs.extend(logprobs if logprobs is not None else [None] * len(tokens))
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.token_times.append(now)
        self.token_counts.append(len(tokens))
        self.output_token_ids.extend(tokens)
        if self._queue is not None:
            self._queue.put_nowait(StreamDelta(list(tokens)))
        self._token_event.set()

    def _for_frontend(self, output: EngineCoreOutput) -> EngineCoreOutput:
        """The output as vLLM's frontend must see it: under the request's own
        id, and from a later hop only what the first did not report already
        (its queueing events and prefill stats describe the hop, not the request)."""
        if self.hop == 0:
            return output
        return keep_preemptions(renamed_output(output, self.request_id))

    def _forward(self, output: EngineCoreOutput) -> None:
        if self.emit is not None:
            self.emit(self.instance_id, output, len(self.output_token_ids) - len(output.new_token_ids))

    def finish(self, reason: str | None, stop_reason: object = None, error: str | None = None) -> None:
        """End the stream from here (an abort, a failure, no instance left);
        only the first end counts (and calls `on_finish`)."""
        self._end(reason, stop_reason, error,
                  terminal_output(self.request_id, reason or "abort", stop_reason))

    def _end(self, reason: str | None, stop_reason: object, error: str | None,
             output: EngineCoreOutput | None) -> None:
        if self.finished:
            return
        self.finished, self.finish_reason = True, reason
        self.stop_reason, self.error = stop_reason, error
        if output is not None:
            self._forward(output)
        if self._queue is not None:
            self._queue.put_nowait(StreamDelta([], True, reason))
        self._done.set()
        self._token_event.set()
        if self.on_finish is not None:
            self.on_finish(self)

    # -- migration ---------------------------------------------------------------
    def migration_refusal(self, engine_facts: dict | None = None) -> str | None:
        """Why this request cannot move now (between engines that
        `engine_facts` describes), or None if it can."""
        if self.finished:
            return "request already finished"
        if self.migrating:
            return "request is already migrating"
        return core_refusal(self.core, engine_facts)

    def check_migratable(self, engine_facts: dict | None = None) -> None:
        """Raise MigrationRefused if this request's state cannot move exactly."""
        reason = self.migration_refusal(engine_facts)
        if reason is not None:
            raise MigrationRefused(reason)

    # -- read by Python API callers ------------------------------------------------
    async def stream(self):
        """Yield `StreamDelta`s until the request finishes (call before its
        first token, once)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            if self.output_token_ids:
                self._queue.put_nowait(StreamDelta(list(self.output_token_ids)))
            if self.finished:
                self._queue.put_nowait(StreamDelta([], True, self.finish_reason))
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


def hop_id(request_id: str, hop: int) -> str:
    """The engine request id of hop `hop` of `request_id`."""
    return request_id if hop == 0 else f"{request_id}#{hop}"
