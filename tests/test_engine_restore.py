"""A moved request held exactly as its source had it (engine/restore.py), on
one real vLLM engine (CPU, the tiny model).

Each case runs a request uninterrupted (the reference), then again as a
restored request: the same prompt P and sampling parameters, its tag
carrying O = the reference's first k output tokens. The restored run must
emit exactly the reference's tokens after k, and nothing for O. The
reference ran on the same engine with prefix caching, so P+O's full blocks
are prefix hits: the connector's report says how many positions were not
computed. One test shows the old way (O folded into the prompt) diverges
under penalties, so these tests can fail.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import ENGINE_ARGS

from llumigrate.engine.commands import CommandClient
from llumigrate.engine.params import PARAMS_KEY, LoadSpec, RequestTag, SealedRequest

pytestmark = pytest.mark.engine

BLOCK_SIZE = 32  # ENGINE_ARGS' --block-size
N = 60           # max_tokens of the plain cases
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs home. "


@dataclass
class Run:
    tokens: list[int]
    finish_reason: str | None
    stop_reason: Any
    report: dict          # the connector's report ("restored", "cached")
    logprobs: list | None
    num_prompt_tokens: int


class Engine:
    """One AsyncLLM with llumigrate's connector, driven from the test loop."""

    def __init__(self, llm: Any, loop: Any, command_path: str) -> None:
        self.llm, self.loop, self.command_path = llm, loop, command_path
        self.tok = llm.get_tokenizer()
        self.kv: dict = {}   # this worker's KV server (llumigrate_attach)

    def run(self, prompt: list[int], sp: Any, out: list[int] = (), gen: bytes | None = None,
            load: LoadSpec | None = None) -> Run:
        return self.loop.run(self.arun(prompt, sp, out, gen, load), timeout=300)

    async def arun(self, prompt: list[int], sp: Any, out: list[int] = (),
                   gen: bytes | None = None, load: LoadSpec | None = None) -> Run:
        from vllm.sampling_params import RequestOutputKind
        sp = sp.clone()
        sp.output_kind = RequestOutputKind.FINAL_ONLY
        key = f"t#{uuid.uuid4().hex[:8]}"
        tag = RequestTag(key, load, gen, tuple(out))
        sp.extra_args = {"kv_transfer_params": tag.to_params()}
        final = None
        async for o in self.llm.generate({"prompt_token_ids": list(prompt)}, sp, key):
            final = o
        c = final.outputs[0]
        report = (final.kv_transfer_params or {}).get(PARAMS_KEY) or {}
        return Run(list(c.token_ids), c.finish_reason, c.stop_reason, report, c.logprobs,
                   len(final.prompt_token_ids))

    def rpc(self, method: str, *args: Any) -> Any:
        return self.loop.run(self.llm.collective_rpc(method, args=args), timeout=60)[0]


@pytest.fixture(scope="module")
def engine(tiny_model, loop, tmp_path_factory):
    from vllm.v1.engine.async_llm import AsyncLLM

    from llumigrate.engine.runtime import parse_engine_args
    path = str(tmp_path_factory.mktemp("restore") / "commands.sock")
    args = parse_engine_args(tiny_model, ENGINE_ARGS, command_path=path)

    async def start():
        return AsyncLLM.from_engine_args(args)
    llm = loop.run(start(), timeout=600)
    eng = Engine(llm, loop, path)
    eng.kv = eng.rpc("llumigrate_attach")
    assert eng.kv["restores"] is True
    yield eng
    llm.shutdown()


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return list(engine.tok.encode(TEXT * 2))


def _sp(**kw: Any) -> Any:
    from vllm import SamplingParams
    return SamplingParams(**{"temperature": 0.0, "max_tokens": N, **kw})


def _expected_cached(prompt: list[int], k: int) -> int:
    """Full blocks of P+O short of its last position (vLLM computes that one)."""
    return (len(prompt) + k - 1) // BLOCK_SIZE * BLOCK_SIZE


def _ks(n: int) -> tuple[int, ...]:
    """Restore points: early, middle, and one token before the end."""
    return tuple(sorted({1, n // 2, n - 1}))


def check_restores(engine: Engine, prompt: list[int], sp: Any, ks: tuple[int, ...] | None = None) -> Run:
    """Run the reference, then restored runs from each k: they must continue
    it exactly, emit only the new tokens and reuse P+O's cached blocks."""
    ref = engine.run(prompt, sp)
    assert ref.report == {}, "a fresh request has nothing to report"
    for k in ks or _ks(len(ref.tokens)):
        assert 0 < k < len(ref.tokens)
        got = engine.run(prompt, sp, out=ref.tokens[:k])
        assert got.tokens == ref.tokens[k:], f"k={k}"
        assert (got.finish_reason, got.stop_reason) == (ref.finish_reason, ref.stop_reason), f"k={k}"
        assert got.num_prompt_tokens == len(prompt)
        assert got.report == {"restored": k, "cached": _expected_cached(prompt, k)}, f"k={k}"
    return ref


def _favoured(prompt: list[int], n: int = 8) -> dict[int, float]:
    """A logit bias that makes a few tokens the likely ones, so that a
    penalty on them (counts of output tokens) decides what comes next."""
    return {t: 20.0 for t in sorted(set(prompt))[:n]}


# -- plain sampling parameters ----------------------------------------------------

def test_greedy(engine, prompt):
    ref = check_restores(engine, prompt, _sp(ignore_eos=True))
    assert len(ref.tokens) == N and ref.finish_reason == "length"


def test_penalties(engine, prompt):
    sp = _sp(ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.6, repetition_penalty=1.2,
             logit_bias=_favoured(prompt))
    check_restores(engine, prompt, sp)


def test_without_restore_penalties_give_a_different_continuation(engine, prompt):
    """The old way (O as prompt, max_tokens reduced): presence and frequency
    penalties no longer count O, and the continuation diverges."""
    sp = _sp(ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.6, logit_bias=_favoured(prompt))
    ref = engine.run(prompt, sp)
    k = N // 2
    folded = engine.run(prompt + ref.tokens[:k], _sp(**{**_kwargs(sp), "max_tokens": N - k}))
    restored = engine.run(prompt, sp, out=ref.tokens[:k])
    assert restored.tokens == ref.tokens[k:]
    assert folded.tokens != ref.tokens[k:]


def _kwargs(sp: Any) -> dict:
    return {"ignore_eos": sp.ignore_eos, "presence_penalty": sp.presence_penalty,
            "frequency_penalty": sp.frequency_penalty, "logit_bias": sp.logit_bias}


@pytest.mark.parametrize("stop_with", ["stop_token", "eos"])
def test_min_tokens_holds_back_a_stop_the_model_wants(engine, prompt, stop_with):
    """A stop token biased to be the model's choice at every step: min_tokens
    holds it back for 20 outputs, so the request stops at exactly 21 tokens,
    restored or not; the old way would hold it back for 20 more."""
    eos = engine.tok.eos_token_id
    stop = 7 if stop_with == "stop_token" else eos
    kw: dict = {"logit_bias": {stop: 30.0}, "min_tokens": 20}
    if stop_with == "stop_token":
        kw.update(stop_token_ids=[stop], ignore_eos=True)
    sp = _sp(**kw)
    ref = check_restores(engine, prompt, sp, ks=(1, 10, 19, 20))
    assert len(ref.tokens) == 21 and ref.tokens[-1] == stop and ref.finish_reason == "stop"
    assert stop not in ref.tokens[:20]
    folded = engine.run(prompt + ref.tokens[:10], _sp(**{**kw, "max_tokens": N - 10}))
    assert len(folded.tokens) == 21  # min_tokens counted again from zero


def test_logit_bias(engine, prompt):
    plain = engine.run(prompt, _sp(ignore_eos=True))
    bias = {plain.tokens[3]: -100.0, plain.tokens[10]: -100.0, **_favoured(prompt, 3)}
    ref = check_restores(engine, prompt, _sp(ignore_eos=True, logit_bias=bias))
    assert ref.tokens != plain.tokens


def test_bad_words(engine, prompt):
    plain = engine.run(prompt, _sp(ignore_eos=True))
    words = [engine.tok.decode(plain.tokens[i:i + 2]) for i in (4, 12, 20)]
    ref = check_restores(engine, prompt, _sp(ignore_eos=True, bad_words=words))
    assert ref.tokens != plain.tokens


def test_stop_token_ids(engine, prompt):
    plain = engine.run(prompt, _sp(ignore_eos=True))
    at = next(i for i in range(20, N) if plain.tokens[i] not in plain.tokens[:i])
    ref = check_restores(engine, prompt, _sp(ignore_eos=True, stop_token_ids=[plain.tokens[at]]))
    assert len(ref.tokens) == at + 1 and ref.finish_reason == "stop"
    assert ref.stop_reason == plain.tokens[at]


def test_logprobs(engine, prompt):
    sp = _sp(ignore_eos=True, logprobs=3, presence_penalty=0.5, logit_bias=_favoured(prompt))
    ref = engine.run(prompt, sp)
    k = N // 2
    got = engine.run(prompt, sp, out=ref.tokens[:k])
    assert got.tokens == ref.tokens[k:]
    assert len(got.logprobs) == N - k
    for mine, theirs, t in zip(got.logprobs, ref.logprobs[k:], got.tokens, strict=True):
        assert set(mine) == set(theirs)
        assert mine[t].rank == theirs[t].rank
        assert mine[t].logprob == pytest.approx(theirs[t].logprob, abs=1e-3)


# -- structured output -------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}
REGEX = r"[a-z]{3,8}( [a-z]{3,8}){2,4}\."
CHOICES = ["alpha", "beta gamma delta", "epsilon"]
GRAMMAR = 'root ::= "(" num ("+" num){0,3} ")"\nnum ::= [0-9]{1,3}'


def _valid_json(text: str) -> bool:
    d = json.loads(text)
    return set(d) == {"name", "n"} and len(d["name"]) <= 8 and 0 <= d["n"] <= 99


@pytest.mark.parametrize("kind,valid", [
    ("json", _valid_json),
    ("regex", lambda text: re.fullmatch(REGEX, text) is not None),
    ("choice", lambda text: text in CHOICES),
    ("grammar", lambda text: re.fullmatch(r"\(\d{1,3}(\+\d{1,3}){0,3}\)", text) is not None),
])
def test_structured_output(engine, prompt, kind, valid):
    from vllm.sampling_params import StructuredOutputsParams
    spec = {"json": SCHEMA, "regex": REGEX, "choice": CHOICES, "grammar": GRAMMAR}[kind]
    so = StructuredOutputsParams(**{kind: spec})
    sp = _sp(max_tokens=80, structured_outputs=so)
    ref = check_restores(engine, prompt, sp)
    assert ref.finish_reason == "stop"
    assert valid(engine.tok.decode(ref.tokens, skip_special_tokens=True))


def test_a_grammar_that_refuses_the_restored_tokens_fails_the_request(engine, prompt):
    from vllm.sampling_params import StructuredOutputsParams
    sp = _sp(structured_outputs=StructuredOutputsParams(choice=CHOICES))
    got = engine.run(prompt, sp, out=list(engine.tok.encode("zzz9")))
    assert got.finish_reason == "error" and got.tokens == []
    assert engine.run(prompt, sp).finish_reason == "stop"  # the engine serves on


@pytest.mark.parametrize("why", ["skip_prefix_cache", "too_long"])
def test_what_cannot_be_restored_fails_the_request(engine, prompt, why):
    sp = _sp(skip_reading_prefix_cache=True) if why == "skip_prefix_cache" else _sp(max_tokens=5)
    got = engine.run(prompt, sp, out=[5, 6, 7, 8, 9])
    assert got.finish_reason == "error" and got.tokens == []


# -- seeded sampling -------------------------------------------------------------------

async def _seal(engine: Engine, prompt: list[int], sp: Any, at: int) -> tuple[SealedRequest, list[int]]:
    """Run `prompt` tracked, stop it (the migration's stop at a step) once it
    has `at` tokens and return its sealed record (its blocks stay held) and
    the tokens it streamed."""
    from vllm.sampling_params import RequestOutputKind
    key = f"seal#{uuid.uuid4().hex[:8]}"
    sp = sp.clone()
    sp.output_kind = RequestOutputKind.DELTA
    sp.extra_args = {"kv_transfer_params": RequestTag(key).to_params()}
    streamed: list[int] = []

    async def consume() -> None:
        async for o in engine.llm.generate({"prompt_token_ids": list(prompt)}, sp, key):
            streamed.extend(o.outputs[0].token_ids)
    task = asyncio.ensure_future(consume())
    rpc = engine.llm.collective_rpc
    while not (await rpc("llumigrate_track", args=(key,)))[0]:
        await asyncio.sleep(0.005)
    while len(streamed) < at:
        await asyncio.sleep(0.005)
    client = CommandClient(engine.command_path)
    assert await client.call({"kind": "stop", "key": key}) == {"capped": True}
    await client.close()
    await task
    while (sealed := (await rpc("llumigrate_sealed", args=(key,)))[0]) is None:
        await asyncio.sleep(0.01)
    return SealedRequest.from_wire(sealed), streamed


def test_seeded_sampling_committed_from_a_held_source(engine, prompt):
    """The whole commit on one engine (source and destination at once): a
    tracked seeded request stopped at a step and sealed; the restored request
    carries its outputs and generator state, gets P+O's full blocks as prefix
    hits and pulls the partial last block from the held source (a final,
    synchronous load that releases the hold), and continues exactly."""
    sp = _sp(temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True, max_tokens=200,
             presence_penalty=0.5)
    ref = engine.run(prompt, sp)
    sealed, streamed = engine.loop.run(_seal(engine, prompt, sp, at=20), timeout=300)
    out = sealed.tokens[len(prompt):]
    assert sealed.generator_state is not None and 20 <= len(out) < 200
    assert out == streamed == ref.tokens[:len(out)]
    load = LoadSpec(engine.kv["kv_host"], engine.kv["kv_port"], sealed.key, sealed.num_kv_tokens, final=True)
    got = engine.run(prompt, sp, out=out, gen=sealed.generator_state, load=load)
    assert got.tokens == ref.tokens[len(out):]
    hit = _expected_cached(prompt, len(out))
    loaded = sealed.num_kv_tokens - hit
    assert sealed.num_kv_tokens == len(prompt) + len(out) - 1
    assert got.report == {"hit": hit, "loaded": loaded, "failed": False,
                          "restored": len(out), "cached": sealed.num_kv_tokens}
    if not loaded:  # the stop fell on a block boundary: nothing pulled, nothing released
        engine.rpc("llumigrate_release", sealed.key)
    assert engine.rpc("llumigrate_status")["held"] == []   # the final load released it
    # The carried state is what makes it exact: from the seed alone it differs.
    assert engine.run(prompt, sp, out=out).tokens != ref.tokens[len(out):]
