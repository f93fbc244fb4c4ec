"""POST /v1/completions, with the response and chunk shapes of vLLM's server."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llumigrate.frontend.errors import bad_request, unsupported
from llumigrate.frontend.logprobs import TokenText, completion_logprobs
from llumigrate.frontend.params import check_model, check_supported
from llumigrate.frontend.protocol import CompletionRequest, parse_body
from llumigrate.frontend.serving import Job, Service, run_to_end, sse_response, start_job


async def create_completion(svc: Service, body: object, request: Request) -> Response:
    req: CompletionRequest = parse_body(CompletionRequest, body)
    check_model(req, svc.backend.model_name)
    check_supported(req)
    prompt_ids = prompt_token_ids(req, svc)
    job = await start_job(svc, req, prompt_ids, req.max_tokens, "cmpl")
    if req.stream:
        return sse_response(_chunks(job, svc.tokenizer.token_text))
    text = await run_to_end(job, request)
    if req.echo:
        text = _prompt_text(req, svc, prompt_ids) + text
    out = job.gen.output
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(svc.tokenizer.token_text, out.token_ids,
                                       out.logprobs or [None] * len(out.token_ids), req.logprobs, 0)
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
              "stop_reason": out.stop_reason, "prompt_logprobs": None}
    return JSONResponse({**_head(job), "choices": [choice], "usage": job.usage()})


def prompt_token_ids(req: CompletionRequest, svc: Service) -> list[int]:
    """One prompt, as text or token ids; a batch of several is refused."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise unsupported("a batch of several prompts", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        return svc.tokenizer.encode(prompt, req.add_special_tokens)
    ids = list(prompt or [])
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    bad = [i for i in ids if not 0 <= i < svc.tokenizer.vocab_size]
    if bad:
        raise bad_request(f"prompt token ids outside the vocabulary: {bad[:5]}", "prompt")
    return ids


def _prompt_text(req: CompletionRequest, svc: Service, prompt_ids: list[int]) -> str:
    prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
    return prompt if isinstance(prompt, str) else svc.tokenizer.hf.decode(prompt_ids)


def _head(job: Job) -> dict:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model}


async def _chunks(job: Job, text_of: TokenText) -> AsyncIterator[dict]:
    num_top = job.req.logprobs
    text_len = 0
    async for update in job.gen.updates():
        logprobs = None
        if num_top is not None:
            ids = update.token_ids or []
            logprobs = completion_logprobs(text_of, ids, update.logprobs or [None] * len(ids),
                                           num_top, text_len)
        text_len += len(update.text)
        choice = {"index": 0, "text": update.text, "logprobs": logprobs,
                  "finish_reason": update.finish_reason, "stop_reason": update.stop_reason}
        chunk = {**_head(job), "choices": [choice]}
        if job.continuous_usage:
            chunk["usage"] = job.usage()
        yield chunk
    if job.include_usage:
        yield {**_head(job), "choices": [], "usage": job.usage()}
