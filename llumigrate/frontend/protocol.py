"""Request bodies of the OpenAI API, as vLLM's server accepts them.

Field names and defaults follow vLLM 0.32's `CompletionRequest` and
`ChatCompletionRequest`; unknown fields are allowed (OpenAI clients send
extras). Fields that are accepted but refused when set are checked in
`params.py`, so the error message can say why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llumigrate.frontend.errors import APIError, bad_request

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(SamplingRequest):
    prompt: list[int] | list[list[int]] | str | list[str] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _prompt_given(self) -> CompletionRequest:
        if self.prompt is None or self.prompt == "" or self.prompt == []:
            raise ValueError("Either prompt or prompt_embeds must be provided and non-empty.")
        if self.max_tokens is None:
            self.max_tokens = 16
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


def parse_body(model: type[SamplingRequest], body: Any) -> Any:
    """Validate a decoded JSON body; every failure is an HTTP 400 (as vLLM
    answers validation errors), naming the first offending field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors: list) -> APIError:
    """An HTTP 400 for pydantic/FastAPI validation errors (first few listed)."""
    shown = errors[:5]
    lines = [f"  {'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in shown]
    label = "error" if len(errors) == 1 else "errors"
    param = ".".join(str(p) for p in shown[0].get("loc", ())) if shown else None
    return bad_request(f"{len(errors)} validation {label}:\n" + "\n".join(lines), param or None)
