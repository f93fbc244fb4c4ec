"""Defrag on real engines: a request queued on an instance whose KV cannot
hold it is re-dispatched by the scheduler to an instance that starts it at
once, and produces what it produces there without the move.

Its own `llumigrate serve` (2 engines with 80 KV blocks each), so that one
running request leaves too little room for the next."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import running_service

pytestmark = pytest.mark.engine

BLOCK, NUM_BLOCKS = 32, 80
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def kv_args(model: str) -> list[str]:
    """Engine arguments giving each engine NUM_BLOCKS KV blocks of the model (float32)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) \
        * head_dim * 4
    return ["--dtype", "float32", "--enforce-eager", "--block-size", str(BLOCK),
            "--kv-cache-memory-bytes", str(NUM_BLOCKS * BLOCK * per_token),
            "--max-model-len", "2048", "--max-num-seqs", "8"]


def prompt_of(n: int, salt: int) -> list[int]:
    return [3 + (i * 11 + salt * 17) % 1900 for i in range(n)]


@pytest.fixture(scope="module")
def small_service(tiny_model: str, loop, tmp_path_factory):
    with running_service(loop, tiny_model, kv_args(tiny_model), str(tmp_path_factory.mktemp("defrag")),
                         interval_s=0.1) as svc:
        yield svc


def test_blocked_queue_head_is_redispatched_where_it_starts(loop, small_service):
    cluster, scheduler = small_service.cluster, small_service.scheduler

    async def go():
        # A: 1400 prompt tokens (44 blocks) decoding on i0; B needs 38 blocks, i0 has 36 left.
        a = await cluster.submit(prompt_of(1400, 1), {**GREEDY, "max_tokens": 600}, instance="i0")
        await a.wait_tokens(1, 120)
        b = await cluster.submit(prompt_of(1200, 2), {**GREEDY, "max_tokens": 40}, instance="i0")
        await asyncio.sleep(0.5)
        queued_on_i0 = not b.output_token_ids and b.instance_id == "i0"
        scheduler.set_policy(migration=["defrag"])
        try:
            await b.wait_tokens(1, 120)
            a_still_running = not a.finished  # B did not just wait for A to end
            await b.wait(120)
        finally:
            scheduler.set_policy(migration=[])
        await cluster.abort(a.request_id)
        await a.wait(60)
        moved = [m for m in cluster.migrations if m.request_id == b.request_id]
        ref = await cluster.submit(prompt_of(1200, 2), {**GREEDY, "max_tokens": 40}, instance="i1")
        await ref.wait(120)
        return queued_on_i0, a_still_running, b, moved, ref
    queued_on_i0, a_still_running, b, moved, ref = loop.run(go())
    assert queued_on_i0, "B should have waited on i0 (too few free blocks there)"
    assert [(m.source, m.destination, m.committed) for m in moved] == [("i0", "i1", True)], moved
    assert a_still_running and b.instance_id == "i1" and b.finish_reason == "length"
    assert b.output_token_ids == ref.output_token_ids


def test_preempted_request_is_redispatched_and_continues_exactly(loop, small_service):
    """vLLM preempts B on i0 when A's growth needs its blocks; B is re-queued
    at the head with its whole context to recompute, and A keeps growing, so
    B cannot restart there. The engine reports B as preempted; defrag moves it
    to the empty i1, where it continues with the tokens it would have produced
    without the preemption or the move."""
    cluster, scheduler = small_service.cluster, small_service.scheduler

    async def go():
        seen: list[list[str]] = []

        async def watch() -> None:
            while True:
                pre = cluster.instances["i0"].load.get("preempted") or []
                if pre and pre not in seen:
                    seen.append(list(pre))
                await asyncio.sleep(0.01)
        watcher = asyncio.ensure_future(watch())
        scheduler.set_policy(migration=["defrag"])
        try:
            # A: 50 blocks of prompt, B: 22; together they fill 72 of 80 and
            # outgrow the rest after about 128 tokens each.
            a = await cluster.submit(prompt_of(1600, 3), {**GREEDY, "max_tokens": 440}, instance="i0")
            await a.wait_tokens(1, 120)
            b = await cluster.submit(prompt_of(700, 4), {**GREEDY, "max_tokens": 300}, instance="i0")
            await b.wait(180)
            a_running_when_b_ended = not a.finished
            await a.wait(180)
        finally:
            scheduler.set_policy(migration=[])
            watcher.cancel()
        moved = [m for m in cluster.migrations if m.request_id == b.request_id]
        ref = await cluster.submit(prompt_of(700, 4), {**GREEDY, "max_tokens": 300}, instance="i1")
        await ref.wait(120)
        return seen, a, b, moved, ref, a_running_when_b_ended
    seen, a, b, moved, ref, a_running_when_b_ended = loop.run(go())
    assert any(b.request_id in keys for keys in seen), f"B was never reported preempted: {seen}"
    assert [(m.source, m.destination, m.committed) for m in moved] == [("i0", "i1", True)], moved
    assert b.instance_id == "i1" and b.finish_reason == "length" and a_running_when_b_ended
    assert b.output_token_ids == ref.output_token_ids
    assert a.finish_reason == "length" and len(a.output_token_ids) == 440
