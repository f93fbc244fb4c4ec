"""`llumigrate serve` end to end: real engines, the OpenAI endpoint with the
OpenAI Python client, the gRPC control API with its real client.

Streams are compared with the same greedy request run without migration;
each test leaves both instances at their baseline free block count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc
import openai
import pytest

from llumigrate.control.client import ControlClient

pytestmark = pytest.mark.engine

PROMPT = "The quick brown fox jumps over the lazy dog. " * 12


def _openai(service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{service.http_port}/v1", api_key="none",
                              max_retries=0)


def _control(service) -> ControlClient:
    return ControlClient(f"127.0.0.1:{service.control_port}")


async def _free(service) -> dict[str, int]:
    await asyncio.sleep(0.4)  # the engines push their block counts every 50 ms
    return {iid: int(i.load["free_blocks"]) for iid, i in service.cluster.instances.items()}


@pytest.fixture()
def clean(loop, service):
    """Baseline free blocks before the test; checked after it."""
    before = loop.run(_free(service))
    yield
    assert loop.run(_free(service)) == before


async def _running_request(ctl: ControlClient, timeout: float = 30.0):
    for _ in range(int(timeout / 0.05)):
        reqs = [r for r in await ctl.list_requests() if r.num_output_tokens > 0]
        if reqs:
            return reqs[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no running request showed up")


async def _other(ctl: ControlClient, instance_id: str) -> str:
    return next(i.id for i in await ctl.list_instances() if i.id != instance_id)


def test_openai_stream_survives_forced_migrations(loop, service, clean):
    async def go():
        client, ctl = _openai(service), _control(service)
        body = {"ignore_eos": True}
        ref = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1200,
                                              temperature=0, extra_body=body)
        stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1200,
                                                 temperature=0, stream=True, extra_body=body,
                                                 stream_options={"include_usage": True})
        chunks, results = [], []

        async def migrate_twice():
            for _ in range(2):
                r = await _running_request(ctl)
                results.append(await ctl.migrate(r.id, await _other(ctl, r.instance_id)))
                await asyncio.sleep(0.3)
        mover = asyncio.ensure_future(migrate_twice())
        async for chunk in stream:
            chunks.append(chunk)
        await mover
        await ctl.close()
        return ref, chunks, results
    ref, chunks, results = loop.run(go())
    assert [r.state for r in results] == ["done", "done"], results
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 1200 == ref.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens


def test_chat_stream_survives_a_migration(loop, service, clean):
    messages = [{"role": "user", "content": PROMPT}]

    async def go():
        client, ctl = _openai(service), _control(service)
        kw = dict(model="tiny", messages=messages, max_tokens=600, temperature=0, logprobs=True,
                  top_logprobs=2, extra_body={"ignore_eos": True})
        ref = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(stream=True, **kw)
        r = await _running_request(ctl)
        result = await ctl.migrate(r.id, await _other(ctl, r.instance_id))
        chunks = [c async for c in stream if c.choices]
        await ctl.close()
        return ref, chunks, result
    ref, chunks, result = loop.run(go())
    assert result.state == "done", result
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.choices[0].message.content
    # Logprobs travel with their tokens across the migration and match the unmigrated run.
    got = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    want = ref.choices[0].logprobs.content
    assert [e.token for e in got] == [e.token for e in want] and len(want) == 600
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-3
    assert all(len(e.top_logprobs) == 2 for e in got)


def test_drain_empties_an_instance_while_streams_continue(loop, service, clean):
    async def go():
        client, ctl = _openai(service), _control(service)
        refs = [await client.completions.create(model="tiny", prompt=f"{k} {PROMPT}", max_tokens=800,
                                                temperature=0, extra_body={"ignore_eos": True})
                for k in range(3)]
        await ctl.set_policy(dispatch="flood", migration=["drain"])
        try:
            streams = [await client.completions.create(
                model="tiny", prompt=f"{k} {PROMPT}", max_tokens=800, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) for k in range(3)]
            src = (await _running_request(ctl)).instance_id
            await ctl.drain(src)

            async def read(s):
                return "".join([c.choices[0].text async for c in s if c.choices])
            texts = await asyncio.gather(*(read(s) for s in streams))
            left = await ctl.list_requests(src)
            migrated = [r for r in service.cluster.migrations[-3:] if r.source == src]
        finally:
            await ctl.undrain(src)
            await ctl.set_policy(dispatch="least-load", migration=[])
            await ctl.close()
        return refs, texts, left, migrated
    refs, texts, left, migrated = loop.run(go())
    assert texts == [r.choices[0].text for r in refs]
    assert left == []
    assert migrated and all(m.committed for m in migrated), migrated


def test_control_api_verbs_on_real_engines(loop, service, clean):
    async def go():
        client, ctl = _openai(service), _control(service)
        events: list[str] = []

        async def watch():
            async for ev in ctl.watch_events():
                events.append(ev.kind)
        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.3)  # subscribed before anything happens
        health = await ctl.health()
        insts = await ctl.list_instances()
        one = await ctl.get_instance(insts[0].id)
        stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=800,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        r = await _running_request(ctl)
        mine = await ctl.list_requests(r.instance_id)
        result = await ctl.migrate(r.id)  # the policy picks the destination
        codes = {}
        for name, call in {
            "unknown request": lambda: ctl.migrate("no-such-request"),
            "unknown instance": lambda: ctl.get_instance("no-such-instance"),
            "same instance": lambda: ctl.migrate(r.id, result.destination),
            "bad policy": lambda: ctl.set_policy(dispatch="fastest"),
        }.items():
            try:
                await call()
            except grpc.aio.AioRpcError as e:
                codes[name] = e.code()
        async for _ in stream:
            pass
        for _ in range(50):
            if "migration_done" in events:
                break
            await asyncio.sleep(0.1)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        policy = await ctl.get_policy()
        await ctl.close()
        return health, insts, one, mine, r, result, codes, events, policy
    health, insts, one, mine, r, result, codes, events, policy = loop.run(go())
    assert health.status == "serving" and len(insts) == 2 and one.id == insts[0].id
    assert one.num_blocks > 0 and one.free_blocks <= one.num_blocks
    assert [q.id for q in mine] == [r.id]
    assert result.state == "done" and result.destination != r.instance_id
    assert codes == {"unknown request": grpc.StatusCode.NOT_FOUND,
                     "unknown instance": grpc.StatusCode.NOT_FOUND,
                     "same instance": grpc.StatusCode.FAILED_PRECONDITION,
                     "bad policy": grpc.StatusCode.INVALID_ARGUMENT}
    assert "dispatch" in events and "migration_stage" in events and "migration_done" in events
    assert policy.dispatch == "least-load"


def test_metrics_count_dispatches_and_migrations(loop, service):
    async def go():
        import httpx
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{service.http_port}/metrics")).text
    text = loop.run(go())
    migrations = [line for line in text.splitlines()
                  if line.startswith("llumigrate_migrations_total{") and 'outcome="committed"' in line]
    assert migrations and sum(float(line.split()[-1]) for line in migrations) >= 1
    assert "llumigrate_dispatches_total{" in text
    assert 'llumigrate_instance_free_blocks{instance="i0"}' in text
    # vLLM's own serving metrics, one engine label per instance (i0 is engine 0, ...).
    # (Their values are asserted in test_serve_args.py: vLLM's metrics are
    # process-wide, and a service started after this one took them over.)
    for engine in ("0", "1"):
        running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running{")
                   and f'engine="{engine}"' in line]
        assert running, f"no vLLM gauge for engine {engine}"


VLLM_BENCH = """
import argparse, json, sys
from vllm.benchmarks import serve
p = argparse.ArgumentParser()
serve.add_cli_args(p)
result = serve.main(p.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: result[k] for k in ("completed", "failed", "num_prompts")}))
"""


def test_vllm_bench_serve_completes_with_no_failure(loop, service, tiny_model, tmp_path):
    import json
    import subprocess
    import sys
    args = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{service.http_port}",
            "--model", "tiny", "--tokenizer", tiny_model, "--dataset-name", "random",
            "--num-prompts", "16", "--random-input-len", "64", "--random-output-len", "32",
            "--request-rate", "8", "--ignore-eos", "--disable-tqdm", "--seed", "1"]
    # NOTE: the service runs on the test's loop thread; the benchmark client is
    # a separate process, as an operator would run it.
    out = subprocess.run([sys.executable, "-c", VLLM_BENCH, *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result == {"completed": 16, "failed": 0, "num_prompts": 16}


def test_an_instance_started_elsewhere_joins_and_leaves_cleanly(loop, service, tiny_model, clean):
    """`llumigrate instance --scheduler ...` joins; a stream migrated onto it
    survives its leaving (drained back), and it is gone afterwards."""
    import signal
    import subprocess
    import sys

    from conftest import ENGINE_ARGS
    cmd = [sys.executable, "-m", "llumigrate", "instance", tiny_model, "--scheduler",
           f"127.0.0.1:{service.control_port}", "--instance-id", "joiner", *ENGINE_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    async def go():
        client, ctl = _openai(service), _control(service)
        try:
            for _ in range(600):
                if any(i.id == "joiner" for i in await ctl.list_instances()):
                    break
                assert proc.poll() is None, proc.stdout.read()
                await asyncio.sleep(0.5)
            joined = [i.id for i in await ctl.list_instances()]
            ref = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000,
                                                  temperature=0, extra_body={"ignore_eos": True})
            stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000,
                                                     temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True})
            r = await _running_request(ctl)
            if r.instance_id != "joiner":  # the dispatcher may have chosen it already
                assert (await ctl.migrate(r.id, "joiner")).state == "done"
            on_joiner = [q.id for q in await ctl.list_requests("joiner")]
            proc.send_signal(signal.SIGTERM)  # leave while the stream runs there
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, 120)
            left = [i.id for i in await ctl.list_instances()]
            return joined, on_joiner, ref.choices[0].text, text, left
        finally:
            await ctl.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    joined, on_joiner, ref, text, left = loop.run(go(), timeout=900)
    out = proc.stdout.read()
    assert "joiner" in joined and on_joiner, out[-2000:]
    assert text == ref
    assert proc.returncode == 0 and "left the cluster" in out, out[-2000:]
    assert sorted(left) == ["i0", "i1"]


def test_a_killed_instance_is_restarted_under_its_id(loop, service):
    """SIGKILL one instance's agent and engine, as the OOM killer would: it
    comes back under its id with a new process and serves again, the control
    API saw it go down and come up, and the shared memory the killed engine
    held is gone."""
    cluster = service.cluster
    old = cluster.instances["i1"]
    old_pid, old_shm = old.process.pid, dict(old.shm_files)
    assert old_shm, "the engine's shared memory was not recorded"

    async def go():
        ctl = _control(service)
        events: list[tuple[str, str]] = []

        async def watch():
            async for e in ctl.watch_events(["instance_up", "instance_down"]):
                events.append((e.kind, e.instance_id))
        watcher = asyncio.get_running_loop().create_task(watch())
        await asyncio.sleep(0.5)
        try:
            old.kill()
            for _ in range(1800):
                cur = cluster.instances.get("i1")
                if cur is not None and cur is not old and cur.up:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("i1 did not come back")
            h = await cluster.submit([5, 6, 7, 8], {"max_tokens": 8, "temperature": 0}, instance="i1")
            await h.wait(60)
            states = {i.id: i.up for i in await ctl.list_instances()}
            await asyncio.sleep(0.2)
            return cur, h, states, list(events)
        finally:
            watcher.cancel()
            await ctl.close()
    new, h, states, events = loop.run(go(), timeout=300)
    assert new.process.pid != old_pid
    assert h.finished and h.error is None and len(h.output_token_ids) == 8
    assert states == {"i0": True, "i1": True}
    assert ("instance_down", "i1") in events and events.index(("instance_down", "i1")) < \
        events.index(("instance_up", "i1"))
    assert not any(os.path.exists(p) and os.stat(p).st_ino == ino for p, ino in old_shm.items())

