"""`make_*` factories for controller-level tests: engine requests and
handles built without vLLM's input processor (nothing reaches an engine)."""

from __future__ import annotations

from llumigrate.controller.request import RequestHandle
from llumigrate.engine.vllm_api import EngineCoreRequest, SamplingParams


def make_core(request_id: str, prompt: list[int], sampling: dict | None = None,
              priority: int = 0) -> EngineCoreRequest:
    return EngineCoreRequest(request_id=request_id, prompt_token_ids=list(prompt), mm_features=None,
                             sampling_params=SamplingParams(**(sampling or {})), pooling_params=None,
                             arrival_time=0.0, lora_request=None, cache_salt=None,
                             data_parallel_rank=None, priority=priority)


def make_handle(request_id: str, prompt: list[int], sampling: dict | None = None, priority: int = 0,
                instance_id: str = "i0", **fields) -> RequestHandle:
    return RequestHandle(request_id, make_core(request_id, prompt, sampling, priority), instance_id, **fields)


def make_output(request_id: str, token_ids: list[int], finish_reason: str | None = None):
    """An engine output of `request_id` (vLLM's EngineCoreOutput)."""
    from llumigrate.engine.vllm_api import EngineCoreOutput, finish_reason_from_name
    return EngineCoreOutput(request_id=request_id, new_token_ids=list(token_ids),
                            finish_reason=None if finish_reason is None else finish_reason_from_name(finish_reason))


def added(calls: list[tuple[str, dict]]) -> list[tuple[EngineCoreRequest, object]]:
    """The engine requests (and their llumigrate tags) of the `add` calls
    among an agent's recorded calls."""
    from llumigrate.engine.params import RequestTag
    from llumigrate.engine.vllm_api import decode_request
    out = []
    for method, args in calls:
        if method == "add":
            core = decode_request(args["request"])
            out.append((core, RequestTag.from_params(core.sampling_params.extra_args["kv_transfer_params"])))
    return out
