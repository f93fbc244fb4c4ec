"""The engine adapter's settings: the bounded message-queue busy-wait (on
vLLM's real shm reader condition) and how engine arguments carry it."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from llumigrate.engine.runtime import CPU_ENGINE_SPIN_MS, parse_engine_args
from llumigrate.engine.vllm_compat import bound_mq_spin
from llumigrate.errors import ConfigError


@pytest.fixture()
def spin_condition():
    from vllm.distributed.device_communicators import shm_broadcast as sb
    saved = (sb.SpinCondition.wait, sb.SHM_READER_RECHECK_INTERVAL_MS)
    ctx = zmq.Context()
    addr = f"inproc://llumigrate-test-{time.monotonic_ns()}"
    writer = sb.SpinCondition(is_reader=False, context=ctx, notify_address=addr)
    reader = sb.SpinCondition(is_reader=True, context=ctx, notify_address=addr)
    yield sb, reader, writer
    sb.SpinCondition.wait, sb.SHM_READER_RECHECK_INTERVAL_MS = saved
    ctx.destroy(linger=0)


def test_vllm_reader_spins_for_a_second_after_a_read(spin_condition):
    """The behaviour being bounded: right after a read, vLLM's wait returns
    at once (the caller loops on it: a busy-wait) instead of sleeping."""
    _, reader, _ = spin_condition
    reader.record_read()
    t = time.monotonic()
    reader.wait(timeout_ms=300)
    assert time.monotonic() - t < 0.1


def test_bounded_reader_sleeps_until_notified(spin_condition):
    sb, reader, writer = spin_condition
    assert bound_mq_spin(0.002, recheck_s=0.02)
    assert sb.SHM_READER_RECHECK_INTERVAL_MS == 20
    reader.record_read()
    time.sleep(0.01)                     # past the 2 ms spin
    t = time.monotonic()
    reader.wait(timeout_ms=300)          # nothing written: sleeps to its timeout
    assert time.monotonic() - t >= 0.25
    # A notification wakes it well before the timeout.
    threading.Timer(0.05, writer.notify).start()
    t = time.monotonic()
    reader.wait(timeout_ms=3000)
    assert time.monotonic() - t < 2.0
    # Applying it again (both connector roles in one process) wraps once.
    assert bound_mq_spin(0.002)
    assert sb.SpinCondition.wait.__name__ == "wait"
    assert sb.SpinCondition._llumigrate_original_wait is not sb.SpinCondition.wait


def test_engine_args_carry_the_spin_bound():
    extra = lambda a: a.kv_transfer_config["kv_connector_extra_config"]  # noqa: E731
    # This host has no accelerator: the CPU default applies.
    assert extra(parse_engine_args("m", []))["engine_spin_s"] == CPU_ENGINE_SPIN_MS / 1000
    assert extra(parse_engine_args("m", [], engine_spin_ms=50))["engine_spin_s"] == 0.05
    with pytest.raises(ConfigError, match="spin"):
        parse_engine_args("m", [], engine_spin_ms=-1)


# -- what a restored request can carry (engine/refusal.py) ---------------------------

RESTORABLE = {
    "greedy": {"temperature": 0.0},
    "penalties": {"presence_penalty": 1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "min_tokens": {"min_tokens": 5, "stop_token_ids": [7]},
    "logit_bias": {"logit_bias": {5: 2.0}},
    "bad_words": {"bad_words": ["fox"]},
    "allowed": {"allowed_token_ids": [5, 6, 7]},
    "logprobs": {"logprobs": 3},
    "seeded": {"temperature": 1.0, "seed": 7},
    "json": {"structured_outputs": {"json": {"type": "object"}}},
    "regex": {"structured_outputs": {"regex": "[a-z]+"}},
    "choice": {"structured_outputs": {"choice": ["a", "b"]}},
    "grammar": {"structured_outputs": {"grammar": 'root ::= "a"'}},
}


def _params(kw: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    kw = dict(kw)
    if "structured_outputs" in kw:
        kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
    return SamplingParams(**kw)


@pytest.mark.parametrize("name", sorted(RESTORABLE))
def test_what_a_restore_carries_is_not_refused(name):
    from llumigrate.engine.refusal import migration_refusal
    assert migration_refusal(_params(RESTORABLE[name])) is None
    assert migration_refusal(RESTORABLE[name]) is None        # the wire dict reads the same


@pytest.mark.parametrize("kw,engine,embeds,match", [
    ({"n": 2}, {}, False, "n > 1"),
    ({"skip_reading_prefix_cache": True}, {}, False, "skip_reading_prefix_cache"),
    ({"thinking_token_budget": 10}, {}, False, "thinking_token_budget"),
    ({"structured_outputs": {"regex": "a+"}}, {"reasoning_parser": True}, False, "reasoning parser"),
    ({}, {"model_runner_v2": True}, False, "Model Runner V2"),
    ({}, {"speculative": True}, False, "speculative decoding"),
    ({}, {"async_scheduling": True}, False, "async scheduling"),
    ({}, {}, True, "embeddings"),
])
def test_what_a_restore_cannot_carry_is_refused_with_the_reason(kw, engine, embeds, match):
    from llumigrate.engine.refusal import EngineFacts, migration_refusal
    facts = EngineFacts(**engine)
    for sp in (kw, _params(kw)):
        reason = migration_refusal(sp, engine=facts, prompt_embeds=embeds)
        assert reason is not None and match in reason


def test_stop_strings_and_prompt_logprobs_are_the_frontends_and_move():
    """vLLM's frontend, whose one stream spans every hop, applies stop strings
    and returns prompt logprobs (from the first hop; a restored hop computes
    none: `vllm_api.retagged`)."""
    from llumigrate.engine.refusal import migration_refusal
    for kw in ({"stop": ["fox"]}, {"prompt_logprobs": 1}):
        assert migration_refusal(kw) is None and migration_refusal(_params(kw)) is None


def test_a_restored_hop_computes_no_prompt_logprobs_and_reads_the_prefix_cache():
    from factories import make_core

    from llumigrate.engine.vllm_api import retagged
    core = make_core("r", [1, 2, 3], {"prompt_logprobs": 2, "max_tokens": 4})
    assert core.sampling_params.skip_reading_prefix_cache
    first = retagged(core, "r", {"llumigrate": {"key": "r"}})
    later = retagged(core, "r#1", {"llumigrate": {"key": "r#1"}}, continued=True)
    assert first.sampling_params.prompt_logprobs == 2 and first.sampling_params.skip_reading_prefix_cache
    assert later.sampling_params.prompt_logprobs is None and not later.sampling_params.skip_reading_prefix_cache
    assert core.sampling_params.prompt_logprobs == 2            # the request itself is unchanged
    assert later.sampling_params.extra_args["kv_transfer_params"] == {"llumigrate": {"key": "r#1"}}


def test_structured_output_may_follow_a_reasoning_parser_that_constrains_reasoning_too():
    from llumigrate.engine.refusal import EngineFacts, migration_refusal
    facts = EngineFacts(reasoning_parser=True, structured_in_reasoning=True)
    assert migration_refusal({"structured_outputs": {"regex": "a+"}}, engine=facts) is None
    assert migration_refusal({"temperature": 0.0}, engine=EngineFacts(reasoning_parser=True)) is None


def test_engine_facts_read_the_vllm_config():
    from types import SimpleNamespace

    from llumigrate.engine.refusal import EngineFacts
    from llumigrate.engine.vllm_compat import engine_facts
    cfg = SimpleNamespace(speculative_config=None, use_v2_model_runner=False,
                          scheduler_config=SimpleNamespace(async_scheduling=False),
                          structured_outputs_config=SimpleNamespace(reasoning_parser="",
                                                                    enable_in_reasoning=False))
    assert engine_facts(cfg) == EngineFacts()
    cfg.speculative_config, cfg.use_v2_model_runner = object(), True
    cfg.structured_outputs_config.reasoning_parser = "deepseek_r1"
    assert engine_facts(cfg) == EngineFacts(speculative=True, model_runner_v2=True, reasoning_parser=True)


def test_another_vllm_release_is_refused_by_its_version_alone():
    from llumigrate.engine.version import UnsupportedVllm, check_vllm_version, installed_vllm
    assert check_vllm_version().startswith("0.32") and installed_vllm() == check_vllm_version()
    for other in ("0.31.4", "0.33.0", "1.0.0"):
        with pytest.raises(UnsupportedVllm, match=f"found {other}"):
            check_vllm_version(other)
    assert check_vllm_version("0.32.7") == "0.32.7"
