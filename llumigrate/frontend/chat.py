"""POST /v1/chat/completions, with the response and chunk shapes of vLLM's server."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llumigrate.frontend.logprobs import TokenText, chat_logprobs
from llumigrate.frontend.params import check_model, check_supported, num_logprobs
from llumigrate.frontend.protocol import ChatCompletionRequest, parse_body
from llumigrate.frontend.serving import Job, Service, run_to_end, sse_response, start_job


async def create_chat_completion(svc: Service, body: object, request: Request) -> Response:
    req: ChatCompletionRequest = parse_body(ChatCompletionRequest, body)
    check_model(req, svc.backend.model_name)
    check_supported(req)
    prompt = svc.tokenizer.render_chat(req.messages, add_generation_prompt=req.add_generation_prompt,
                                       continue_final_message=req.continue_final_message,
                                       template_kwargs=req.chat_template_kwargs)
    prompt_ids = svc.tokenizer.encode(prompt, req.add_special_tokens)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    job = await start_job(svc, req, prompt_ids, requested, "chatcmpl")
    role = _role(req)
    if req.stream:
        return sse_response(_chunks(job, role, svc.tokenizer.token_text))
    text = await run_to_end(job, request)
    out = job.gen.output
    logprobs = None
    if (num_top := num_logprobs(req)) is not None:
        logprobs = chat_logprobs(svc.tokenizer.token_text, out.token_ids,
                                 out.logprobs or [None] * len(out.token_ids), num_top)
    choice = {"index": 0, "message": {"role": role, "content": text, "tool_calls": []},
              "logprobs": logprobs, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
    return JSONResponse({**_head(job, "chat.completion"), "choices": [choice], "usage": job.usage()})


def _role(req: ChatCompletionRequest) -> str:
    """vLLM's rule: "assistant" when a reply is prompted, else the last message's role."""
    if req.add_generation_prompt:
        return "assistant"
    return str(req.messages[-1].get("role", "assistant"))


def _head(job: Job, kind: str) -> dict:
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model}


async def _chunks(job: Job, role: str, text_of: TokenText) -> AsyncIterator[dict]:
    """The role first (with the first output, as vLLM does), then content
    deltas; updates with no text are skipped unless they finish the request
    or carry logprobs."""
    first = True
    num_top = num_logprobs(job.req)
    async for update in job.gen.updates():
        if first:
            first = False
            yield _chunk(job, {"role": role, "content": ""}, None, None, job.continuous_usage)
        logprobs = None
        if num_top is not None and update.token_ids:
            logprobs = chat_logprobs(text_of, update.token_ids,
                                     update.logprobs or [None] * len(update.token_ids), num_top)
        if not update.text and update.finish_reason is None and logprobs is None:
            continue
        delta = {"content": update.text} if update.text else {}
        yield _chunk(job, delta, update.finish_reason, update.stop_reason, job.continuous_usage,
                     logprobs)
    if job.include_usage:
        yield {**_head(job, "chat.completion.chunk"), "choices": [], "usage": job.usage()}


def _chunk(job: Job, delta: dict, finish_reason: str | None, stop_reason: int | str | None,
           with_usage: bool, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    chunk = {**_head(job, "chat.completion.chunk"), "choices": [choice]}
    if with_usage:
        chunk["usage"] = job.usage()
    return chunk
