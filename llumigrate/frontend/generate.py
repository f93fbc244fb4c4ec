"""Runs one request against a `GenerateBackend` and turns its token stream
into text updates. Owns the backend request: whatever way the consumer stops
(a stop string, the client gone, an error), an unfinished backend request is
aborted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llumigrate.controller.request import StreamDelta
from llumigrate.frontend.backend import GenerateBackend, GenerateHandle
from llumigrate.frontend.metrics import Metrics
from llumigrate.frontend.output import TextStream

logger = logging.getLogger(__name__)


class GenerationFailed(Exception):
    """The backend ended the request with an error (or finish reason "error")."""


@dataclass
class Update:
    """Text and tokens new since the previous update; `finish_reason` is set
    on the last one."""

    text: str
    num_tokens: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None   # the new tokens
    logprobs: list | None = None         # theirs, when the request asked for logprobs


class Generation:
    """One backend request. Call `start()` (submits; may raise), then iterate
    `updates()` once. `output` holds the tokens and text so far."""

    def __init__(self, backend: GenerateBackend, metrics: Metrics | None, request_id: str,
                 prompt_token_ids: list[int], sampling: dict, priority: int, output: TextStream) -> None:
        self.backend, self.metrics = backend, metrics
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling, self.priority = sampling, priority
        self.output = output
        self.arrival = time.monotonic()
        self._handle: GenerateHandle | None = None
        self._backend_done = False
        self._first_token_at: float | None = None
        self._failed = False

    async def start(self) -> None:
        self._handle = await self.backend.submit(self.prompt_token_ids, self.sampling,
                                                 priority=self.priority, request_id=self.request_id)

    async def updates(self) -> AsyncIterator[Update]:
        assert self._handle is not None, "start() first"
        queue: asyncio.Queue[StreamDelta | Exception] = asyncio.Queue()
        pump = asyncio.create_task(_pump(self._handle, queue))
        try:
            while not self.output.finished:
                deltas = await _next_batch(queue)
                before = len(self.output.token_ids)
                num_tokens = self._apply(deltas)
                if not num_tokens and not self.output.finished:
                    continue
                out = self.output
                yield Update(out.take_text(), num_tokens, out.finish_reason, out.stop_reason,
                             out.token_ids[before:],
                             None if out.logprobs is None else out.logprobs[before:])
        except GenerationFailed:
            self._failed = True
            raise
        finally:
            pump.cancel()
            await self._close()

    def _apply(self, deltas: list[StreamDelta]) -> int:
        """Feed deltas to the output; the number of output tokens they added."""
        before = len(self.output.token_ids)
        for delta in deltas:
            self.output.add(delta.token_ids, delta.logprobs)
            if delta.finished:
                self._backend_done = True
                self._finish_from_backend()
        if self._first_token_at is None and self.output.token_ids:
            self._first_token_at = time.monotonic()
        return len(self.output.token_ids) - before

    def _finish_from_backend(self) -> None:
        handle = self._handle
        assert handle is not None
        if self.output.finished:
            return
        if handle.error or handle.finish_reason == "error":
            raise GenerationFailed(handle.error or "generation failed")
        stop_reason = handle.stop_reason if isinstance(handle.stop_reason, (int, str)) else None
        self.output.finish(handle.finish_reason or "stop", stop_reason)

    async def _close(self) -> None:
        self._observe()
        if self._backend_done:
            return
        # NOTE: shield: the abort runs to its end even if this task is cancelled
        # again (anyio cancels a client-gone stream repeatedly).
        try:
            await asyncio.shield(self.backend.abort(self.request_id))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("aborting %s failed", self.request_id)

    def _observe(self) -> None:
        if self.metrics is None:
            return
        ttft = None if self._first_token_at is None else self._first_token_at - self.arrival
        reason = "error" if self._failed else self.output.finish_reason or "abort"
        self.metrics.observe_request(reason, ttft, time.monotonic() - self.arrival,
                                     len(self.prompt_token_ids), len(self.output.token_ids))


async def _pump(handle: GenerateHandle, queue: asyncio.Queue) -> None:
    finished = False
    try:
        async for delta in handle.stream():
            queue.put_nowait(delta)
            finished = delta.finished
    except asyncio.CancelledError:
        raise
    except Exception as e:  # surfaced to the consumer
        queue.put_nowait(e)
        return
    if not finished:
        queue.put_nowait(GenerationFailed("the backend stream ended without finishing"))


async def _next_batch(queue: asyncio.Queue) -> list[StreamDelta]:
    """Wait for one delta, then take every delta already queued, so tokens and
    the finish that follow each other closely make one update."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    for item in items:
        if isinstance(item, Exception):
            raise GenerationFailed(f"backend stream failed: {item}") from item
    return items
