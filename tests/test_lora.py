"""LoRA through `llumigrate serve` (2 instances) against vLLM's own server
with the same arguments: a greedy completion with an adapter equals vLLM's;
a LoRA stream migrated mid-way equals vLLM's unmigrated one; an adapter
loaded at run time through vLLM's API is loaded on every instance, and on an
instance that joins later before it is listed.

Engine starts: vLLM's server (it boots while the service's two engines
start) and one joining instance.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from conftest import ENGINE_ARGS, running_service
from vllm_reference import VllmServer
from llumigrate.controller.cluster import cpu_threads
from llumigrate.model.tiny_lora import TinyLoraConfig, ensure_tiny_lora

pytestmark = pytest.mark.engine

MODEL = "tiny"
ADAPTER = "ad"                 # loaded at startup (--lora-modules)
RANK = 8
PROMPT = "The scheduler moved the request to another engine, and the stream kept going while"


def lora_args(lora_dir: str) -> list[str]:
    return ["--enable-lora", "--max-lora-rank", str(RANK), "--max-loras", "4",
            "--lora-modules", f"{ADAPTER}={lora_dir}"]


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_dir(tiny_model: str) -> str:
    return str(ensure_tiny_lora(tiny_model, TinyLoraConfig(rank=RANK)))


@pytest.fixture(scope="module")
def reference(tiny_model: str, lora_dir: str, tmp_path_factory: pytest.TempPathFactory):
    server = VllmServer(tiny_model, [*ENGINE_ARGS, *lora_args(lora_dir)],
                        tmp_path_factory.mktemp("vllm-lora") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(loop, tiny_model: str, lora_dir: str, reference: VllmServer, tmp_path_factory: pytest.TempPathFactory):
    # NOTE: vLLM's app adds /v1/load_lora_adapter only if this is set when it is built.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        with running_service(loop, tiny_model, [*ENGINE_ARGS, *lora_args(lora_dir)],
                             str(tmp_path_factory.mktemp("lora-service"))) as service:
            yield service


def _url(svc) -> str:
    return f"http://127.0.0.1:{svc.http_port}"


def _openai(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


async def _complete(url: str, model: str, max_tokens: int = 64, **kw) -> openai.types.Completion:
    async with _openai(url) as client:
        return await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                               temperature=0, extra_body={"ignore_eos": True}, **kw)


async def _loras_by_instance(svc) -> dict[str, set[int]]:
    """Each live instance's loaded adapter ids (vLLM's `list_loras`)."""
    live = [iid for iid, i in svc.cluster.instances.items() if i.up]
    return dict(zip(live, (set(x) for x in await svc.cluster.utility_all("list_loras"))))


def _lora_id(svc, name: str) -> int:
    return next(i for i, r in svc.cluster.loras.items() if r.lora_name == name)


async def _load(svc, name: str, path: str) -> None:
    async with httpx.AsyncClient(base_url=_url(svc), timeout=60) as http:
        r = await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 200, r.text


# -- tests -----------------------------------------------------------------------------------

def test_adapter_completion_equals_vllms(loop, svc, reference):
    ref_url = reference.wait_ready()

    async def go():
        return [await _complete(url, model) for url in (ref_url, _url(svc)) for model in (MODEL, ADAPTER)]
    ref_base, ref_lora, base, lora = (r.choices[0].text for r in loop.run(go()))
    assert ref_lora != ref_base, "the adapter does not change the output"
    assert (base, lora) == (ref_base, ref_lora)
    assert _lora_id(svc, ADAPTER) in svc.cluster.loras
    assert all(_lora_id(svc, ADAPTER) in ids for ids in loop.run(_loras_by_instance(svc)).values())


async def _live_handle(svc, tag: str, min_tokens: int, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for h in list(svc.cluster.requests.values()):
            if tag in h.request_id and len(h.output_token_ids) >= min_tokens and not h.finished:
                return h
        await asyncio.sleep(0.02)
    raise AssertionError(f"no running request tagged {tag!r}")


def test_lora_stream_migrates_exactly(loop, svc, reference):
    ref_url = reference.wait_ready()
    n = 300

    async def go():
        ref = await _complete(ref_url, ADAPTER, n)
        async with _openai(_url(svc)) as client:
            stream = await client.completions.create(
                model=ADAPTER, prompt=PROMPT, max_tokens=n, temperature=0, stream=True,
                extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "lora-migrate"})

            async def read():
                return "".join([c.choices[0].text async for c in stream if c.choices])
            reader = asyncio.ensure_future(read())
            h = await _live_handle(svc, "lora-migrate", 16)
            src = h.instance_id
            dst = next(iid for iid in svc.cluster.instances if iid != src)
            result = await svc.cluster.migrate(h.request_id, dst)
            text = await reader
        return ref, h, src, dst, result, text
    ref, h, src, dst, result, text = loop.run(go())
    assert result.committed, result
    assert h.core.lora_request is not None and h.core.lora_request.lora_name == ADAPTER
    # It moved mid-stream: the source had produced tokens, the destination produced the rest.
    assert h.num_migrations == 1 and h.instance_id == dst != src and h.hop > 0
    assert len(h.prompt_token_ids) + 16 <= result.context_tokens < len(h.prompt_token_ids) + n
    assert text == ref.choices[0].text


def test_runtime_adapter_reaches_every_instance(loop, svc, reference, lora_dir):
    ref_url = reference.wait_ready()

    async def go():
        await _load(svc, "rt", lora_dir)
        rt = _lora_id(svc, "rt")
        loaded = await _loras_by_instance(svc)
        ref, got = await _complete(ref_url, ADAPTER), await _complete(_url(svc), "rt")
        removed = await svc.frontend.llm.remove_lora(rt)   # AsyncLLM's own call: fans out
        return rt, loaded, ref, got, removed, await _loras_by_instance(svc)
    rt, loaded, ref, got, removed, after = loop.run(go())
    assert len(loaded) == 2 and all(rt in ids for ids in loaded.values()), loaded
    assert got.choices[0].text == ref.choices[0].text   # same weights as ADAPTER
    assert removed and rt not in svc.cluster.loras
    assert len(after) == 2 and not any(rt in ids for ids in after.values()), after


def test_http_unload_forgets_adapter(loop, svc, lora_dir):
    """vLLM's /v1/unload_lora_adapter forgets the adapter in the frontend only
    (it never calls remove_lora); llumigrate forgets it in the cluster too, so
    no instance that joins later loads it (`serve.frontend.forget_unloaded_loras`)."""
    async def go():
        await _load(svc, "gone", lora_dir)
        gone = _lora_id(svc, "gone")
        async with httpx.AsyncClient(base_url=_url(svc), timeout=60) as http:
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "gone"})
            models = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        return gone, r, models
    gone, r, models = loop.run(go())
    try:
        assert r.status_code == 200 and "gone" not in models
        assert gone not in svc.cluster.loras
        assert not any(gone in ids for ids in loop.run(_loras_by_instance(svc)).values())
    finally:
        if gone in svc.cluster.loras:   # leave the module's later tests as they were
            loop.run(svc.cluster.remove_lora(gone))


def test_joining_instance_gets_adapters_before_it_is_listed(loop, svc, reference, lora_dir):
    ref_url = reference.wait_ready()
    cluster = svc.cluster
    seen: dict[str, tuple[bool, set[int]]] = {}
    load_loras = cluster._load_loras

    async def spy(inst):
        await load_loras(inst)
        from llumigrate.controller.utilities import call_utility
        seen[inst.instance_id] = (inst.instance_id in cluster.instances,
                                  set(await call_utility(inst, "list_loras")))

    async def go():
        await _load(svc, "late", lora_dir)
        cluster._load_loras = spy
        try:
            await cluster.spawn("i2", env=cpu_threads(3))
        finally:
            del cluster._load_loras
        # Only i2 takes new requests now: both adapters' requests run there.
        for iid in ("i0", "i1"):
            cluster.drain(iid)
        try:
            for _ in range(100):
                if svc.scheduler.choose(0) == "i2":
                    break
                await asyncio.sleep(0.1)
            got = [await _complete(_url(svc), m, extra_headers={"X-Request-Id": f"joined-{m}"})
                   for m in (ADAPTER, "late")]
        finally:
            for iid in ("i0", "i1"):
                cluster.undrain(iid)
        ran_on = {h.instance_id for h in cluster.requests.values() if "joined-" in h.request_id}
        await cluster.remove_instance("i2")
        return got, ran_on, await _complete(ref_url, ADAPTER)
    wanted = {_lora_id(svc, ADAPTER)}
    got, ran_on, ref = loop.run(go(), timeout=600)
    wanted.add(_lora_id(svc, "late"))
    listed, loaded = seen["i2"]
    assert not listed and wanted <= loaded, seen
    assert ran_on == {"i2"}
    assert [g.choices[0].text for g in got] == [ref.choices[0].text] * 2
