"""What the HTTP frontend needs from whatever generates tokens.

The frontend tokenizes, detokenizes and applies stop strings itself; a backend
only ever sees token ids and a sampling dict. `llumigrate serve` wires a
`Cluster` behind this interface; tests use a fake.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Protocol

from llumigrate.controller.request import StreamDelta


class BackendRejected(ValueError):
    """`submit` refused the request because of its content (answered as HTTP 400)."""


class GenerateHandle(Protocol):
    """One submitted request. `RequestHandle` of the controller satisfies it.

    Contract: `stream()` can be iterated once; it yields `StreamDelta`s whose
    `token_ids`, concatenated, are the request's output tokens in order (no
    token lost or repeated, whatever happens between instances), and ends with
    exactly one delta with `finished=True` (its `token_ids` may be empty).
    After that delta `finish_reason` ("stop", "length", "abort", "error"),
    `stop_reason` (the stop token id, or None) and `error` (None unless the
    request failed) are set.
    """

    request_id: str
    finish_reason: str | None
    stop_reason: object
    error: str | None

    def stream(self) -> AsyncIterator[StreamDelta]: ...


class GenerateBackend(ABC):
    """Token-level generation service behind the OpenAI frontend.

    Attributes: `model_name` (the served model name, listed by /v1/models and
    required to match a request's `model` when one is given), `model_path` (the
    Hugging Face model folder the frontend loads the tokenizer from) and
    `max_model_len` (prompt + output tokens a request may reach).
    """

    model_name: str
    model_path: str
    max_model_len: int

    @abstractmethod
    async def submit(self, prompt_token_ids: list[int], sampling: dict, *, priority: int = 0,
                     request_id: str | None = None) -> GenerateHandle:
        """Start generating. `sampling` uses only keys of
        `llumigrate.engine.runtime.SAMPLING_FIELDS` and never holds `stop`
        strings. Raises `BackendRejected` for a request it cannot take (the
        client's fault); any other exception means the service failed."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request; idempotent, and a no-op for unknown or finished ones.
        Its stream still ends with a finished delta (reason "abort" unless it
        finished first)."""

    @abstractmethod
    def healthy(self) -> bool:
        """True when the backend can take requests (answers /health)."""
