"""What /v1/completions and /v1/chat/completions share: turning a parsed
request into a started `Generation`, running one to its end while watching
for the client leaving, and the SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import StreamingResponse

from llumigrate.frontend.backend import BackendRejected, GenerateBackend
from llumigrate.frontend.errors import APIError, bad_request
from llumigrate.frontend.generate import Generation, GenerationFailed
from llumigrate.frontend.metrics import Metrics
from llumigrate.frontend.output import TextStream
from llumigrate.frontend.params import max_output_tokens, sampling_dict, stop_rules
from llumigrate.frontend.protocol import SamplingRequest
from llumigrate.frontend.tokenizer import ModelTokenizer


@dataclass
class Service:
    """Everything a request handler needs."""

    backend: GenerateBackend
    metrics: Metrics | None
    tokenizer: ModelTokenizer


@dataclass
class Job:
    """A started request and what its responses repeat."""

    gen: Generation
    req: SamplingRequest
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return self.gen.request_id

    def usage(self) -> dict:
        num_prompt, num_output = len(self.gen.prompt_token_ids), len(self.gen.output.token_ids)
        return {"prompt_tokens": num_prompt, "total_tokens": num_prompt + num_output,
                "completion_tokens": num_output, "prompt_tokens_details": None}

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.req.stream_options.continuous_usage_stats)


async def start_job(svc: Service, req: SamplingRequest, prompt_token_ids: list[int],
                    requested_max_tokens: int | None, id_prefix: str) -> Job:
    """Check lengths, build the sampling dict and submit to the backend."""
    tok = svc.tokenizer
    max_tokens = max_output_tokens(requested_max_tokens, len(prompt_token_ids), svc.backend.max_model_len)
    sampling = sampling_dict(req, tok, max_tokens)
    output = TextStream(tok.detokenizer(prompt_token_ids, req.skip_special_tokens), stop_rules(req, tok))
    rid = f"{id_prefix}-{uuid.uuid4().hex}"
    gen = Generation(svc.backend, svc.metrics, rid, prompt_token_ids, sampling, req.priority, output)
    try:
        await gen.start()
    except BackendRejected as e:
        raise bad_request(str(e)) from e
    except Exception as e:
        raise APIError(f"the backend failed to take the request: {e}",
                       HTTPStatus.SERVICE_UNAVAILABLE) from e
    return Job(gen, req, svc.backend.model_name)


async def run_to_end(job: Job, request: Request) -> str:
    """Consume the whole generation (non-streaming); returns its text. If the
    client disconnects first the generation is aborted and a 499-style
    error raised (nobody reads it)."""
    async def consume() -> str:
        async for _ in job.gen.updates():
            pass
        return job.gen.output.text

    task = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError("client disconnected", HTTPStatus.BAD_REQUEST)
    try:
        return task.result()
    except GenerationFailed as e:
        raise APIError(str(e), HTTPStatus.INTERNAL_SERVER_ERROR) from e


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one `data: <json>` per event, then `data: [DONE]`.
    A generation failure mid-stream becomes an `{"error": ...}` event."""
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield _data(event)
        except GenerationFailed as e:
            yield _data(APIError(str(e), HTTPStatus.INTERNAL_SERVER_ERROR).body())
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
