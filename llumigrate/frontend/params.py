"""From a validated OpenAI request to what the backend and the output stage
need: the sampling dict (keys of the engine's SAMPLING_FIELDS only), the stop
rules applied in the frontend, and the refusals with their reasons."""

from __future__ import annotations

from http import HTTPStatus

from llumigrate.frontend.errors import APIError, bad_request, unsupported
from llumigrate.frontend.logprobs import MAX_LOGPROBS
from llumigrate.frontend.output import StopRules
from llumigrate.frontend.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from llumigrate.frontend.tokenizer import ModelTokenizer

# Request fields copied to the backend's sampling dict when set.
PASSED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "allowed_token_ids", "bad_words")
MAX_LOGIT_BIAS = 100.0


def check_model(req: SamplingRequest, served: str) -> None:
    """404 for a model that is not served (vLLM's answer); no model is fine."""
    if req.model and req.model != served:
        raise APIError(f"The model `{req.model}` does not exist. Valid aliases: {served}.",
                       HTTPStatus.NOT_FOUND, "model")


def check_supported(req: SamplingRequest) -> None:
    """400 for what llumigrate does not serve (yet), naming the field."""
    if (req.n or 1) != 1:
        raise unsupported("n > 1 (parallel sampling)", "n")
    if req.best_of not in (None, 1):
        raise unsupported("best_of", "best_of")
    if req.use_beam_search:
        raise unsupported("beam search", "use_beam_search")
    if req.prompt_logprobs is not None:
        raise unsupported("prompt_logprobs", "prompt_logprobs")
    if req.structured_outputs or (req.response_format or {}).get("type", "text") != "text":
        raise unsupported("structured output (response_format, structured_outputs)", "response_format")
    if isinstance(req, CompletionRequest):
        _check_completion(req)
    elif isinstance(req, ChatCompletionRequest):
        _check_chat(req)


def _check_completion(req: CompletionRequest) -> None:
    if req.logprobs is not None:
        _check_num_logprobs(req.logprobs, "logprobs")
        if req.echo:
            raise unsupported("echo with logprobs (prompt logprobs)", "echo")
    if req.echo and req.stream:
        raise unsupported("echo with stream=true", "echo")
    if req.suffix:
        raise unsupported("suffix", "suffix")


def _check_chat(req: ChatCompletionRequest) -> None:
    if req.top_logprobs:
        if not req.logprobs:
            raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.",
                              "top_logprobs")
        _check_num_logprobs(req.top_logprobs, "top_logprobs")
    if req.echo:
        raise unsupported("echo in chat completions", "echo")
    if req.tools:
        raise unsupported("tool calling", "tools")


def _check_num_logprobs(n: int, param: str) -> None:
    if not 0 <= n <= MAX_LOGPROBS:
        raise bad_request(f"{param} must be between 0 and {MAX_LOGPROBS}, got {n}.", param)


def num_logprobs(req: SamplingRequest) -> int | None:
    """Top logprobs per output token the request asked for (besides the
    sampled token's own), or None for no logprobs."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    if isinstance(req, ChatCompletionRequest) and req.logprobs:
        return req.top_logprobs or 0
    return None


def max_output_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int) -> int:
    """vLLM's rule: the prompt must leave room for one token; the output is
    capped by what is left of the context."""
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"contains {num_prompt_tokens} input tokens, which leaves no room for output tokens. "
            "Please reduce the length of the input prompt.", "prompt")
    room = max_model_len - num_prompt_tokens
    if requested is None:
        return room
    if requested < 1:
        raise bad_request(f"max_tokens must be at least 1, got {requested}.", "max_tokens")
    return min(requested, room)


def sampling_dict(req: SamplingRequest, tok: ModelTokenizer, max_tokens: int) -> dict:
    """The backend's sampling dict: generation_config defaults, then the
    request's values. Stop strings stay in the frontend."""
    out: dict = dict(tok.sampling_defaults)
    out.update({k: v for k in PASSED_FIELDS if (v := getattr(req, k)) is not None})
    out["max_tokens"] = max_tokens
    if (n := num_logprobs(req)) is not None:
        out["logprobs"] = n
    if req.min_tokens:
        if req.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({req.min_tokens}) must be at most max_tokens ({max_tokens}).",
                              "min_tokens")
        out["min_tokens"] = req.min_tokens
    if req.stop_token_ids:
        out["stop_token_ids"] = _token_ids(req.stop_token_ids, tok.vocab_size, "stop_token_ids")
    if req.ignore_eos:
        out["ignore_eos"] = True
    if req.logit_bias:
        out["logit_bias"] = _logit_bias(req.logit_bias, tok.vocab_size)
    if req.allowed_token_ids is not None:
        out["allowed_token_ids"] = _token_ids(req.allowed_token_ids, tok.vocab_size, "allowed_token_ids")
    return out


def stop_rules(req: SamplingRequest, tok: ModelTokenizer) -> StopRules:
    stop_ids = set(req.stop_token_ids or ())
    if not req.ignore_eos:
        stop_ids |= tok.eos_token_ids
    return StopRules(tuple(req.stop_list), frozenset(stop_ids), req.include_stop_str_in_output, req.min_tokens)


def _token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise bad_request(f"{param} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param)
    return list(ids)


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[str, float]:
    """Keys stay strings (vLLM converts them; msgpack maps keep str keys)."""
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        _token_ids([token_id], vocab_size, "logit_bias")
        out[str(token_id)] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(value)))
    return out
