"""`llumigrate serve --api-server-count 2`: two processes run vLLM's server
on one socket over the same instances and one global scheduler; each owns
its requests' streams across every migration (the agents send a moved
request's outputs to the process that owns it)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import ENGINE_ARGS, running_service

from llumigrate.errors import MigrationRefused

pytestmark = pytest.mark.engine

PROMPTS = [f"Stream {k}: " + "the live move of a request " * (4 + k) for k in range(8)]


@pytest.fixture(scope="module")
def svc(loop, tiny_model, tmp_path_factory):
    with running_service(loop, tiny_model, ENGINE_ARGS, str(tmp_path_factory.mktemp("frontends")),
                         api_server_count=2) as s:
        yield s


async def _complete(port: int, prompt: str, stream: bool) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 160, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    # A connection of its own per request: the two processes take turns accepting them.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        if not stream:
            r = await http.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["text"]
        text = ""
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    import json
                    text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
        return text


async def _migrate_everything(cluster, until: asyncio.Event, results: list) -> None:
    """Move every live request with some output to the other instance, over and over."""
    while not until.is_set():
        for h in [h for h in cluster.requests.values() if not h.finished and len(h.output_token_ids) >= 5]:
            dst = "i1" if h.instance_id == "i0" else "i0"
            try:
                results.append(await cluster.migrate(h.request_id, dst))
            except MigrationRefused:
                pass
        await asyncio.sleep(0.1)


def test_two_frontend_processes_own_their_streams_across_migrations(loop, svc):
    async def go():
        refs = [await _complete(svc.http_port, p, stream=False) for p in PROMPTS]
        rounds = []
        for _ in range(3):   # until a stream of the second process was moved (which requests move is timing)
            done, results = asyncio.Event(), []
            mover = asyncio.ensure_future(_migrate_everything(svc.cluster, done, results))
            texts = await asyncio.gather(*(_complete(svc.http_port, p, stream=True) for p in PROMPTS))
            done.set()
            await mover
            handles = {h.request_id: h for h in svc.cluster.requests.values()}
            rounds.append((texts, results, handles))
            if any(r.committed and handles[r.request_id].owner == "f1" for r in results):
                break
        return refs, rounds
    refs, rounds = loop.run(go(), timeout=1800)
    for texts, results, _ in rounds:
        differ = [k for k, (a, b) in enumerate(zip(refs, texts)) if a != b]
        assert not differ, [(k, refs[k][:80], texts[k][:80]) for k in differ]
        assert any(r.committed for r in results), [(r.state, r.reason) for r in results]
    _, results, handles = rounds[-1]
    # Both processes served (the serve process's own requests have no owner),
    # and a stream of the other one moved with its outputs going to it
    # straight from the agents (`remote`), not relayed by the serve process.
    assert {h.owner for h in handles.values()} == {None, "f1"}
    moved_remote = [r for r in results if r.committed and handles[r.request_id].owner == "f1"
                    and handles[r.request_id].remote]
    assert moved_remote, [(r.request_id, handles[r.request_id].owner, r.state) for r in results]
