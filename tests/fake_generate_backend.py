"""A `GenerateBackend` without engines, for frontend tests.

Each request's output comes from a token source (a list cycled, by default
the tiny tokenizer's encoding of `DEFAULT_TEXT`), cut like an engine would:
at `max_tokens` ("length"), at EOS unless `ignore_eos` or at a stop token id
("stop"), never before `min_tokens`. Tokens are delivered through the
controller's real `RequestHandle` in deltas of `chunk_sizes` (cycled), and
the handle's hop is bumped every `hop_every` tokens to mimic migrations.
With `logprobs` in the sampling dict each token comes with `fake_logprobs`
(none for positions in `lost_logprobs`, like a token recovered at a stop).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field

from llumigrate.controller.request import RequestHandle
from llumigrate.frontend.backend import GenerateBackend
from llumigrate.frontend.server import bound_port, make_server
from llumigrate.frontend.tokenizer import ModelTokenizer

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. café 🙂 naïve 中文 x = 42; "


@dataclass
class Submission:
    prompt_token_ids: list[int]
    sampling: dict
    priority: int
    request_id: str


@dataclass
class FakeConfig:
    source: list[int] = field(default_factory=list)  # tokens to cycle; [] -> DEFAULT_TEXT
    chunk_sizes: tuple[int, ...] = (1,)
    hop_every: int = 0
    delay_s: float = 0.0
    fail_after: int | None = None  # finish with an error after this many tokens
    lost_logprobs: tuple[int, ...] = ()  # output positions that come without logprobs


def fake_logprobs(pos: int, token: int, num_top: int) -> list[list]:
    """Position `pos`'s logprobs: the sampled token first (rank 1), then
    `num_top` others with falling logprobs."""
    return [[token, -0.25 - pos / 100, 1]] + [[token + k, -1.0 * k - pos / 100, k + 1]
                                               for k in range(1, num_top + 1)]


class FakeBackend(GenerateBackend):
    def __init__(self, model_path: str, eos_token_id: int, model_name: str = "tiny",
                 max_model_len: int = 512) -> None:
        self.model_path, self.model_name, self.max_model_len = model_path, model_name, max_model_len
        self.eos_token_id = eos_token_id
        self.config = FakeConfig()
        self.default_source: list[int] = []
        self.is_healthy = True
        self.submissions: list[Submission] = []
        self.aborted: list[str] = []
        self._tasks: dict[str, tuple[RequestHandle, asyncio.Task]] = {}

    def healthy(self) -> bool:
        return self.is_healthy

    async def submit(self, prompt_token_ids: list[int], sampling: dict, *, priority: int = 0,
                     request_id: str | None = None) -> RequestHandle:
        rid = request_id or f"fake-{len(self.submissions)}"
        self.submissions.append(Submission(list(prompt_token_ids), dict(sampling), priority, rid))
        h = RequestHandle(rid, list(prompt_token_ids), dict(sampling), priority, "i0")
        task = asyncio.get_running_loop().create_task(self._run(h, self.config))
        self._tasks[rid] = (h, task)
        return h

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        entry = self._tasks.get(request_id)
        if entry is not None and not entry[0].finished:
            entry[1].cancel()
            entry[0].finish("abort")

    def outputs(self, sampling: dict) -> tuple[list[int], str, int | None]:
        """What an engine would generate: tokens, finish reason, stop reason."""
        source = itertools.cycle(self.config.source or self.default_source)
        stop_ids = set(sampling.get("stop_token_ids") or ())
        out: list[int] = []
        for token in source:
            out.append(token)
            if len(out) >= sampling.get("min_tokens", 0):
                if token in stop_ids:
                    return out, "stop", token
                if token == self.eos_token_id and not sampling.get("ignore_eos"):
                    return out, "stop", None
            if len(out) >= sampling["max_tokens"]:
                return out, "length", None
        raise AssertionError("unreachable")

    async def _run(self, h: RequestHandle, cfg: FakeConfig) -> None:
        tokens, reason, stop_reason = self.outputs(h.sampling)
        sizes = itertools.cycle(cfg.chunk_sizes)
        pos = 0
        while pos < len(tokens):
            if cfg.fail_after is not None and pos >= cfg.fail_after:
                h.finish("error", error="instance lost")
                return
            if cfg.delay_s:
                await asyncio.sleep(cfg.delay_s)
            step = tokens[pos:pos + next(sizes)]
            logprobs = None
            if h.sampling.get("logprobs") is not None:
                logprobs = [None if pos + i in cfg.lost_logprobs else
                            fake_logprobs(pos + i, t, h.sampling["logprobs"]) for i, t in enumerate(step)]
            pos += len(step)
            h.append(step, logprobs)
            if cfg.hop_every and pos // cfg.hop_every > h.hop:
                h.hop += 1
                await asyncio.sleep(0)  # a migration boundary: let the consumer run
        h.finish(reason, stop_reason)


class ServerThread:
    """The app on uvicorn, on its own loop in a thread (the backend lives there)."""

    def __init__(self, app: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = make_server(app, port=0, log_level="warning")
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{bound_port(self.server)}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def make_backend(tok: ModelTokenizer, model_path: str) -> FakeBackend:
    backend = FakeBackend(model_path, eos_token_id=tok.hf.eos_token_id)
    backend.default_source = tok.encode(DEFAULT_TEXT, add_special_tokens=False)
    return backend
