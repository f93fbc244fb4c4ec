"""Live migration between two real vLLM engines (CPU, the tiny model).

Each test compares a migrated request with the same request run without
migration, and checks that both instances return to their baseline free
block counts with no shared-memory segment left behind.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from llumigrate.errors import MigrationRefused
from llumigrate.migration.protocol import MigrationConfig
from llumigrate.transfer import shm

pytestmark = pytest.mark.engine

GREEDY = {"temperature": 0.0, "ignore_eos": True}
SEEDED = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "ignore_eos": True}


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [3 + (i * 7 + salt * 13) % 1900 for i in range(n)]


async def _free_blocks(cluster) -> dict[str, int]:
    # Stats refresh on engine steps; give the engines a moment to settle.
    await asyncio.sleep(0.3)
    return {i["instance_id"]: i["load"]["free_blocks"] for i in await cluster.instance_info()}


async def _reference(cluster, prompt, sampling):
    h = await cluster.submit(prompt, sampling, instance="i0")
    await h.wait(120)
    return h.output_token_ids


async def _reference_handle(cluster, prompt, sampling):
    h = await cluster.submit(prompt, sampling, instance="i0")
    return await h.wait(120)


async def _migrated(cluster, prompt, sampling, hops: list[tuple[int, str]], cfg=None):
    """Run the request, migrating to `dst` once it has `n` output tokens."""
    h = await cluster.submit(prompt, sampling, instance="i0")
    results = []
    for n, dst in hops:
        await h.wait_tokens(n, 120)
        results.append(await cluster.migrate(h.request_id, dst, cfg))
    await h.wait(120)
    return h, results


def _assert_clean(loop, cluster, baseline):
    after = loop.run(_free_blocks(cluster))
    assert after == baseline, f"free blocks {after} != baseline {baseline}"
    # No migration in flight is left holding its destination's blocks in the
    # scheduler's view (serve/snapshots.py), whatever its outcome.
    assert {i: inst.incoming for i, inst in cluster.instances.items() if inst.incoming} == {}
    assert shm.list_segments() == [] or all(
        not os.path.exists(f"/proc/{s.split('-')[1]}") for s in shm.list_segments())


@pytest.fixture()
def baseline(loop, cluster):
    return loop.run(_free_blocks(cluster))


# NOTE: generous max_tokens: on 2 shared cores an engine step now and then
# stalls for a second or two, and the request must still be running when the
# migration reaches its stop.
@pytest.mark.parametrize("prompt_len,at,max_tokens", [(20, 5, 700), (300, 40, 700), (900, 100, 700)])
def test_greedy_exact_after_one_migration(loop, cluster, baseline, prompt_len, at, max_tokens):
    prompt, sp = prompt_of(prompt_len, prompt_len), {**GREEDY, "max_tokens": max_tokens}
    ref = loop.run(_reference(cluster, prompt, sp))
    h, (r,) = loop.run(_migrated(cluster, prompt, sp, [(at, "i1")]))
    assert r.committed, r
    assert h.output_token_ids == ref
    assert h.finish_reason == "length" and h.instance_id == "i1"
    _assert_clean(loop, cluster, baseline)


def test_seeded_exact_across_several_migrations(loop, cluster, baseline):
    prompt, sp = prompt_of(200, 7), {**SEEDED, "max_tokens": 700}
    ref = loop.run(_reference(cluster, prompt, sp))
    h, results = loop.run(_migrated(cluster, prompt, sp, [(20, "i1"), (120, "i0"), (240, "i1")]))
    assert all(r.committed for r in results), results
    assert h.output_token_ids == ref
    assert h.num_migrations == 3
    _assert_clean(loop, cluster, baseline)


@pytest.mark.parametrize("base", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_logprobs_carried_across_migrations(loop, cluster, baseline, base):
    """Every output token keeps its logprobs across migrations, the one the
    stop's step sampled included (its output still streams from the source),
    and they match the run without migration."""
    prompt, sp = prompt_of(150, 5), {**base, "max_tokens": 500, "logprobs": 3}
    ref = loop.run(_reference_handle(cluster, prompt, sp))
    h, results = loop.run(_migrated(cluster, prompt, sp, [(15, "i1"), (100, "i0")]))
    assert all(r.committed for r in results), results
    assert h.output_token_ids == ref.output_token_ids
    got, want = h.output_logprobs, ref.output_logprobs
    assert len(got) == len(want) == len(ref.output_token_ids)
    lost = [i for i, e in enumerate(got) if e is None]
    assert not lost, f"positions without logprobs: {lost}"
    for i, (g, w, t) in enumerate(zip(got, want, ref.output_token_ids)):
        assert g[0][0] == t and len(g) in (3, 4), (i, g)  # the sampled token first, then the top 3
        assert [e[0] for e in g] == [e[0] for e in w], i
        assert max(abs(a[1] - b[1]) for a, b in zip(g, w)) < 1e-3, (i, g, w)
    _assert_clean(loop, cluster, baseline)


def test_precopy_moves_most_blocks_before_stop(loop, cluster, baseline):
    prompt, sp = prompt_of(1500, 3), {**GREEDY, "max_tokens": 600}
    cfg = MigrationConfig(max_precopy_stages=3, stop_threshold_blocks=1)
    h, (r,) = loop.run(_migrated(cluster, prompt, sp, [(10, "i1")], cfg))
    assert r.committed and r.stages >= 1
    full_blocks = (r.context_tokens - 1) // 32
    assert sum(r.blocks_per_stage) >= full_blocks - 2, r
    _assert_clean(loop, cluster, baseline)


def test_waiting_or_prefill_request_migrates(loop, cluster, baseline):
    prompt, sp = prompt_of(600, 11), {**GREEDY, "max_tokens": 500}
    ref = loop.run(_reference(cluster, prompt, sp))

    async def go():
        h = await cluster.submit(prompt, sp, instance="i0")
        r = await cluster.migrate(h.request_id, "i1")  # at once: no output yet
        await h.wait(120)
        return h, r
    h, r = loop.run(go())
    assert r.committed, r
    assert h.output_token_ids == ref
    _assert_clean(loop, cluster, baseline)


def test_request_finishing_during_precopy_aborts_cleanly(loop, cluster, baseline):
    prompt, sp = prompt_of(100, 5), {**GREEDY, "max_tokens": 12}
    ref = loop.run(_reference(cluster, prompt, sp))
    cfg = MigrationConfig(max_precopy_stages=50, stop_threshold_blocks=0)

    async def go():
        h = await cluster.submit(prompt, sp, instance="i0")
        await h.wait_tokens(10, 60)
        try:
            r = await cluster.migrate(h.request_id, "i1", cfg)
        except MigrationRefused:  # it finished before the call: nothing to move
            r = None
        await h.wait(60)
        return h, r
    h, r = loop.run(go())
    # It finished before, during or after the migration; the stream is exact either way.
    assert h.output_token_ids == ref and h.finish_reason == "length"
    assert r is None or r.state == "done" or (r.state, r.reason) == ("aborted", "request finished on the source"), r
    _assert_clean(loop, cluster, baseline)


def test_destination_without_room_is_refused_and_request_continues(loop, cluster, baseline):
    # Two long requests leave i1 fewer free blocks than this 3500-token request needs.
    prompt, sp = prompt_of(3500, 9), {**GREEDY, "max_tokens": 200}
    ref = loop.run(_reference(cluster, prompt, sp))

    async def go():
        hogs = [await cluster.submit(prompt_of(3400, k), {**GREEDY, "max_tokens": 600},
                                     instance="i1") for k in range(2)]
        await hogs[1].wait_tokens(1, 120)
        h = await cluster.submit(prompt, sp, instance="i0")
        await h.wait_tokens(5, 120)
        r = await cluster.migrate(h.request_id, "i1")
        for hog in hogs:
            await cluster.abort(hog.request_id)
            await hog.wait(60)
        await h.wait(120)
        return h, r
    h, r = loop.run(go())
    assert r.state == "aborted" and r.abort_stage == "reserving", r
    assert "free blocks" in r.reason
    assert h.output_token_ids == ref and h.instance_id == "i0"
    _assert_clean(loop, cluster, baseline)


def test_client_abort_during_migration_leaves_nothing(loop, cluster, baseline):
    prompt, sp = prompt_of(800, 2), {**GREEDY, "max_tokens": 600}

    async def go():
        h = await cluster.submit(prompt, sp, instance="i0")
        await h.wait_tokens(5, 60)
        mig = asyncio.ensure_future(cluster.migrate(h.request_id, "i1"))
        await asyncio.sleep(0.05)
        await cluster.abort(h.request_id)
        r = await mig
        if not h.finished:  # the abort raced the hop; abort where it lives now
            await cluster.abort(h.request_id)
        await h.wait(60)
        return h, r
    h, r = loop.run(go())
    assert h.finished
    _assert_clean(loop, cluster, baseline)


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 0.8, "frequency_penalty": 0.6, "repetition_penalty": 1.3},
    {"min_tokens": 300, "logit_bias": {7: 2.5, 11: -1.0}},
], ids=["penalties", "min_tokens_logit_bias"])
def test_output_dependent_sampling_is_exact_across_migrations(loop, cluster, baseline, extra):
    """Penalties count output tokens, min_tokens counts them too: the
    destination holds the moved request's outputs as outputs (not folded into
    its prompt), so the continuation equals the run without migration."""
    prompt, sp = prompt_of(120, 4), {**GREEDY, "max_tokens": 400, **extra}
    ref = loop.run(_reference(cluster, prompt, sp))
    h, results = loop.run(_migrated(cluster, prompt, sp, [(20, "i1"), (150, "i0")]))
    assert all(r.committed for r in results), results
    assert h.output_token_ids == ref
    _assert_clean(loop, cluster, baseline)


# Long structured outputs (an engine step is tens of ms here): room to move them early,
# midway and late in their generation.
LONG_SCHEMA = {"type": "object", "properties": {
    "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
           "minItems": 60, "maxItems": 60},
    "tag": {"enum": ["alpha", "beta"]}}, "required": ["xs", "tag"], "additionalProperties": False}
LONG_REGEX = r"([a-z]{4} ){40}[0-9]{6}\."


def _satisfies(kind: str, text: str) -> bool:
    import json
    import re
    if kind == "regex":
        return re.fullmatch(LONG_REGEX, text) is not None
    d = json.loads(text)
    return set(d) == {"xs", "tag"} and len(d["xs"]) == 60 and all(0 <= x <= 9 for x in d["xs"])


@pytest.mark.parametrize("kind", ["json", "regex"])
def test_structured_output_is_exact_when_moved_early_midway_and_late(loop, cluster, baseline, kind):
    """The destination's grammar is advanced over the output already produced:
    moved at several points of its generation, the output equals the run
    without migration and satisfies its schema."""
    from llumigrate.engine.vllm_api import StructuredOutputsParams
    so = StructuredOutputsParams(**{kind: LONG_SCHEMA if kind == "json" else LONG_REGEX})
    prompt, sp = prompt_of(60, 8), {"temperature": 0.0, "max_tokens": 600, "structured_outputs": so}
    ref = loop.run(_reference_handle(cluster, prompt, sp))
    n = len(ref.output_token_ids)
    tok = cluster._inputs().processor.renderer.tokenizer
    assert ref.finish_reason == "stop" and n >= 60, (ref.finish_reason, n)
    assert _satisfies(kind, tok.decode(ref.output_token_ids, skip_special_tokens=True))
    for at in (3, n // 2, (3 * n) // 4):
        h, (r,) = loop.run(_migrated(cluster, prompt, sp, [(at, "i1")]))
        assert r.committed, (at, r)
        assert h.output_token_ids == ref.output_token_ids, at
        assert h.finish_reason == "stop"
    _assert_clean(loop, cluster, baseline)


def test_unmigratable_requests_are_refused(loop, cluster):
    async def go():
        h = await cluster.submit(prompt_of(30), {**GREEDY, "max_tokens": 600}, instance="i0")
        try:
            with pytest.raises(MigrationRefused, match="current instance"):
                await cluster.migrate(h.request_id, "i0")
        finally:
            await h.wait(60)
        with pytest.raises(MigrationRefused, match="already finished"):
            await cluster.migrate(h.request_id, "i1")
    loop.run(go())
