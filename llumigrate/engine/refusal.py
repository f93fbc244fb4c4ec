"""Which requests a destination engine cannot hold exactly as their source had
them, and why (vLLM 0.32 with the V1 model runner).

A restored request enters the destination with its original prompt and
sampling parameters plus the output tokens it already produced (see
`restore.py`). Everything vLLM derives from the output tokens when a request
enters the engine is then rebuilt natively: max_tokens / min_tokens / stop
token checks, presence/frequency/repetition penalties, logit bias, bad words,
allowed token ids, repetition detection, sample logprobs, the grammar of
structured outputs, and (with the carried generator state) seeded sampling.
What is left is refused here with the reason.

Pure: reads sampling parameters (a vLLM `SamplingParams`, or the wire dict of
`runtime.SAMPLING_FIELDS`) and `EngineFacts`; imports no vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineFacts:
    """What of a destination engine's configuration decides whether a request
    can be restored there (`vllm_compat.engine_facts` reads them off a
    `VllmConfig`)."""

    speculative: bool = False          # a speculative decoding config is set
    model_runner_v2: bool = False      # vLLM's Model Runner V2 (the CUDA default)
    async_scheduling: bool = False     # the scheduler runs a step ahead of the worker
    reasoning_parser: bool = False     # --reasoning-parser is set
    structured_in_reasoning: bool = False  # structured_outputs_config.enable_in_reasoning


def _get(sp: Any, name: str, default: Any = None) -> Any:
    if isinstance(sp, Mapping):
        return sp.get(name, default)
    return getattr(sp, name, default)


def _has_structured_output(sp: Any) -> bool:
    so = _get(sp, "structured_outputs")
    if not so:
        return False
    if isinstance(so, Mapping):
        return any(v not in (None, False) for k, v in so.items() if not str(k).startswith("_"))
    none = getattr(so, "all_constraints_none", None)
    return not none() if callable(none) else True


def _engine(engine: EngineFacts) -> str | None:
    if engine.model_runner_v2:
        return ("the engine runs vLLM's Model Runner V2, which keeps request state where "
                "llumigrate cannot restore output tokens (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if engine.speculative:
        return ("speculative decoding is on: the draft state and the seeded generator's use "
                "per step are not carried")
    if engine.async_scheduling:
        return ("async scheduling is on: restoring output tokens was verified only with "
                "synchronous scheduling")
    return None


def _request(sp: Any, engine: EngineFacts) -> str | None:
    if int(_get(sp, "n", 1) or 1) > 1:
        return ("n > 1: restore each child as its own n=1 request with the child's parameters "
                "(vLLM gives child i the seed + i); output tokens belong to one child")
    if _get(sp, "skip_reading_prefix_cache") and _get(sp, "prompt_logprobs") is None \
            and _get(sp, "prompt_logprob_token_ids") is None:
        return ("skip_reading_prefix_cache: the moved KV would be recomputed, and vLLM overrides "
                "the connector's answer for such a request (a failed restore could not be held back)")
    if _get(sp, "thinking_token_budget") is not None:
        return "thinking_token_budget: restoring the thinking-budget state was not verified"
    if _has_structured_output(sp) and engine.reasoning_parser and not engine.structured_in_reasoning:
        return ("structured output with a reasoning parser: where the grammar starts depends on "
                "the reasoner's step-by-step view of the output, which a restore cannot replay")
    return None


def migration_refusal(sampling_params: Any, *, prompt_embeds: bool = False,
                      engine: EngineFacts | None = None) -> str | None:
    """Why a request with `sampling_params` cannot be restored exactly on a
    destination engine described by `engine` (vLLM 0.32), or None if it can.

    `prompt_embeds`: the request's prompt was given as embeddings (llumigrate
    carries token ids only). Penalties, min_tokens, logit_bias, bad_words,
    allowed_token_ids, stop token ids, every kind of structured output (when no
    reasoning parser is in play), logprobs, seeded sampling and LoRA requests
    are restorable. Stop strings and prompt logprobs are the frontend's: its
    one stream spans every hop (a restored hop computes no prompt logprobs:
    `vllm_api.retagged`)."""
    if prompt_embeds:
        return "the prompt was given as embeddings; llumigrate carries token ids only"
    facts = engine or EngineFacts()
    return _engine(facts) or _request(sampling_params, facts)
