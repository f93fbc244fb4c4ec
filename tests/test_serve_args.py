"""`vllm serve`'s frontend arguments mean what they mean there, on
`llumigrate serve`: several served model names, an API key from
`VLLM_API_KEY`, `--max-logprobs`, `--reasoning-parser` (one instance: what
is checked is vLLM's frontend over the cluster)."""

from __future__ import annotations

import os
import re

import httpx
import pytest
from conftest import ENGINE_ARGS, running_service

pytestmark = pytest.mark.engine

KEY = "s3cret-key"
# The granite reasoning parser splits on these phrases; a structured output
# (applied during reasoning too) makes the tiny model produce them.
THOUGHT, RESPONSE = "Here is my thought process:", "Here is my response:"
SHAPE = rf"{THOUGHT} [a-z]{{4,8}} {RESPONSE} [a-z]{{4,8}}"


@pytest.fixture(scope="module")
def svc(loop, tiny_model, tmp_path_factory):
    import json
    reasoning = {"reasoning_start_str": THOUGHT, "reasoning_end_str": RESPONSE}
    args = [*ENGINE_ARGS, "--max-logprobs", "3", "--reasoning-parser", "granite",
            "--reasoning-config", json.dumps(reasoning),
            "--structured-outputs-config.enable_in_reasoning", "true"]
    os.environ["VLLM_API_KEY"] = KEY
    try:
        with running_service(loop, tiny_model, args, str(tmp_path_factory.mktemp("args")), num_instances=1,
                             served_model_name=("tiny", "alias")) as s:
            yield s
    finally:
        del os.environ["VLLM_API_KEY"]


def _http(svc, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{svc.http_port}", headers=headers, timeout=120)


def test_the_api_key_from_the_environment_is_required(svc):
    with _http(svc, None) as http:
        assert http.get("/v1/models").status_code == 401
    with _http(svc, "wrong") as http:
        assert http.get("/v1/models").status_code == 401
    with _http(svc) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/health").status_code == 200    # vLLM leaves health open


def test_every_served_model_name_is_listed_and_answers(svc):
    with _http(svc) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "alias"]
        texts = []
        for name in ("tiny", "alias"):
            r = http.post("/v1/completions", json={"model": name, "prompt": "one two", "max_tokens": 8,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "tiny"   # vLLM answers under the first served name
            texts.append(r.json()["choices"][0]["text"])
        assert texts[0] == texts[1]
        assert http.post("/v1/completions", json={"model": "other", "prompt": "x"}).status_code == 404


def test_max_logprobs_bounds_what_a_request_may_ask(svc):
    with _http(svc) as http:
        body = {"model": "tiny", "prompt": "one two", "max_tokens": 4, "temperature": 0}
        ok = http.post("/v1/completions", json={**body, "logprobs": 3})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 3
        too_many = http.post("/v1/completions", json={**body, "logprobs": 5})
        assert too_many.status_code == 400 and "max" in too_many.text.lower()


def test_the_reasoning_parser_splits_reasoning_from_content(svc):
    with _http(svc) as http:
        r = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "think first"}], "max_tokens": 120,
            "temperature": 0, "structured_outputs": {"regex": SHAPE}})
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        reasoning = msg.get("reasoning") or msg.get("reasoning_content")
        assert reasoning and re.fullmatch(r"\s*[a-z]{4,8}\s*", reasoning), msg
        assert msg["content"] and re.fullmatch(r"\s*[a-z]{4,8}\s*", msg["content"]), msg
        assert THOUGHT not in msg["content"] and RESPONSE not in msg["content"]


def test_a_request_whose_state_cannot_be_carried_is_refused_and_finishes_where_it_is(loop, svc):
    """A thinking-token budget's state is not carried by a restore (not
    verified on vLLM 0.32): its migration is refused before anything moves,
    with the reason on the control API and in /metrics, and the stream
    finishes where it is exactly as without the attempt."""
    import asyncio

    import grpc

    from llumigrate.control.client import ControlClient
    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "thinking_token_budget": 20}
    with _http(svc) as http:
        ref = http.post("/v1/completions", json=body)
        assert ref.status_code == 200, ref.text

    async def go():
        ctl = ControlClient(f"127.0.0.1:{svc.control_port}")
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=120,
                                         headers={"Authorization": f"Bearer {KEY}"}) as http:
                stream = asyncio.ensure_future(http.post("/v1/completions", json=body))
                for _ in range(600):
                    live = [r for r in await ctl.list_requests() if r.num_output_tokens > 0]
                    if live:
                        break
                    await asyncio.sleep(0.05)
                try:
                    await ctl.migrate(live[0].id, "i0")
                    err = None
                except grpc.aio.AioRpcError as e:
                    err = e
                listed = [q for q in await ctl.list_requests() if q.id == live[0].id]
                done = await stream
                metrics = (await http.get("/metrics")).text
            return err, listed, done, metrics
        finally:
            await ctl.close()
    err, listed, done, metrics = loop.run(go())
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "thinking_token_budget" in err.details()
    assert listed and "thinking_token_budget" in listed[0].migration_refusal
    assert done.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]
    refusals = [line for line in metrics.splitlines()
                if line.startswith("llumigrate_migration_refusals_total{") and "thinking_token_budget" in line]
    assert refusals and float(refusals[0].split()[-1]) >= 1


def test_vllm_serving_metrics_count_the_clusters_requests(svc):
    """vLLM's own /metrics, fed by the instances' outputs and scheduler
    stats: tokens generated count, per engine (i0 is engine 0)."""
    def generated(text: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('vllm:generation_tokens_total{engine="0"'))
    with _http(svc) as http:
        before = generated(http.get("/metrics").text)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "count me", "max_tokens": 12,
                                               "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        text = http.get("/metrics").text
    assert generated(text) - before == 12
    assert 'vllm:num_requests_running{engine="0"' in text and "llumigrate_dispatches_total" in text
