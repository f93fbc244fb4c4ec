"""A pooling model through `llumigrate serve` (2 instances): the tiny Llama
under vLLM's pooling runner (`--runner pooling --convert embed`) serves
`/v1/embeddings`; its embeddings equal vLLM's own server's, are the same on
either instance, and requests spread over both. A pooling request has no
decoding state to move: migrating one is refused with that reason.

Engine starts: vLLM's server (it boots while the service's two engines start).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from conftest import ENGINE_ARGS, running_service
from llumigrate.errors import MigrationRefused
from vllm_reference import MODEL, VllmServer

pytestmark = pytest.mark.engine

POOLING_ARGS = ["--runner", "pooling", "--convert", "embed"]
TEXTS = ["The scheduler moved the request to another engine.", "hello world",
         "request token cache block engine migrate copy worker", "x = 3; y = x * 2; print(y)"]
# Both servers compute in float32 over different batches: a batch-size-dependent
# reduction order moves the last bits.
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    server = VllmServer(tiny_model, [*ENGINE_ARGS, *POOLING_ARGS],
                        tmp_path_factory.mktemp("vllm-pooling") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(loop, tiny_model: str, reference: VllmServer, tmp_path_factory: pytest.TempPathFactory):
    with running_service(loop, tiny_model, [*ENGINE_ARGS, *POOLING_ARGS],
                         str(tmp_path_factory.mktemp("pooling-service"))) as service:
        yield service


def _url(svc) -> str:
    return f"http://127.0.0.1:{svc.http_port}"


async def _embed(url: str, inputs: list[str], tag: str | None = None) -> list[list[float]]:
    headers = {"X-Request-Id": tag} if tag else {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        r = await http.post("/v1/embeddings", json={"model": MODEL, "input": inputs}, headers=headers)
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
    return max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))


def test_embeddings_equal_vllms(loop, svc, reference):
    ref_url = reference.wait_ready()

    async def go():
        return await _embed(ref_url, TEXTS), await _embed(_url(svc), TEXTS), await _embed(_url(svc), TEXTS)
    ref, got, again = loop.run(go())
    assert len(got) == len(TEXTS) and len(got[0]) == 512
    assert _max_diff(got, ref) < TOL
    assert _max_diff(got, again) < TOL


def test_embeddings_spread_and_agree_across_instances(loop, svc):
    n = 8

    async def go():
        before = svc.scheduler.config.dispatch_policy
        svc.scheduler.set_policy(dispatch="round-robin")
        try:
            out = await asyncio.gather(*(_embed(_url(svc), TEXTS[:1], tag=f"pool-spread-{k}") for k in range(n)))
        finally:
            svc.scheduler.set_policy(dispatch=before)
        on = {h.request_id: h.instance_id for h in svc.cluster.requests.values() if "pool-spread-" in h.request_id}
        return [e[0] for e in out], on
    embeddings, on = loop.run(go())
    assert len(on) == n and set(on.values()) == {"i0", "i1"}, on
    assert _max_diff(embeddings, [embeddings[0]] * n) < TOL


def test_pooling_request_migration_is_refused(loop, svc):
    long = " ".join(["request token cache block engine migrate copy worker"] * 150)
    n = 16

    async def go():
        cluster = svc.cluster
        task = asyncio.ensure_future(_embed(_url(svc), [long] * n, tag="pool-migrate"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = [h for h in cluster.requests.values() if "pool-migrate" in h.request_id and not h.finished]
            if live:
                h = live[0]
                dst = next(iid for iid in cluster.instances if iid != h.instance_id)
                try:
                    await cluster.migrate(h.request_id, dst)
                except MigrationRefused as e:
                    if not h.finished:
                        return h, str(e), await task
            await asyncio.sleep(0)
        task.cancel()
        raise AssertionError("no pooling request was caught running")
    h, reason, embeddings = loop.run(go())
    assert reason == "a pooling request has no decoding state to move"
    assert h.core.pooling_params is not None and h.num_migrations == 0
    assert not any(m.request_id == h.request_id for m in svc.cluster.migrations)
    assert len(embeddings) == n and _max_diff(embeddings, [embeddings[0]] * n) < TOL
