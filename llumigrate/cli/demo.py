"""Run the main job: `llumigrate serve` on the built-in tiny model, 2 instances.

Starts the server as an operator would (a subprocess), then drives it only
through its public surfaces: the OpenAI endpoint (streaming requests, greedy
and seeded) and the gRPC control API (forced migrations, policy changes,
drain, the event stream). Every stream is compared with the same request run
before without migration. Ends with a summary: requests, exact streams,
migrations by cause, downtime P50/P99, tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# NOTE: no chunked prefill, as in the stress harness: vLLM 0.32 on CPU crashes
# the engine ("CPU Generator does not use offset") when it chunks the prefill
# of a seeded request, which half the demo's requests are; a burst of long
# prompts filling a step's token budget chunks a short one.
ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--block-size", "32",
               "--kv-cache-memory-bytes", str(80 << 20), "--max-model-len", "4096",
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"]
# Balance thresholds (freeness: free blocks per running request) for the demo's
# small KV cache: an instance running five requests is a source, an idle one
# a destination; balance evens out freeness even with no preemption in sight
# (balance_min_relief_blocks 0), which the demo's short requests never near.
BALANCE = {"migrate_out_threshold": 30.0, "migrate_in_threshold": 40.0, "cooldown_s": 5.0,
           "no_return_s": 30.0, "balance_min_relief_blocks": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model path (default: the built-in tiny model, 4-layer variant)")
    p.add_argument("--requests", type=int, default=5, help="requests per phase")
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


class Demo:
    def __init__(self, args: argparse.Namespace, model: str) -> None:
        self.args, self.model = args, model
        self.http, self.ctl_port = _free_port(), _free_port()
        self.rng = random.Random(args.seed)
        self.pick = random.Random(args.seed + 1)  # which request to force-migrate
        self.done_events: list = []
        self.proc: subprocess.Popen | None = None

    # -- the server ------------------------------------------------------------
    async def start_server(self, log: Path) -> None:
        cmd = [sys.executable, "-m", "llumigrate", "serve", self.model, "--num-instances", "2",
               "--port", str(self.http), "--control-address", f"127.0.0.1:{self.ctl_port}",
               "--served-model-name", "tiny", "--migration-policies", "", "--scheduler-interval",
               "0.2", "--log-level", "WARNING", *ENGINE_ARGS]
        print(f"[demo] $ llumigrate serve ... (log: {log})", flush=True)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        import httpx
        t0 = time.monotonic()
        async with httpx.AsyncClient() as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llumigrate serve exited ({self.proc.returncode}); see {log}")
                try:
                    if (await http.get(f"http://127.0.0.1:{self.http}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                waited = time.monotonic() - t0
                if int(waited) % 10 == 0:
                    print(f"[demo] waiting for 2 engines to start ... {waited:.0f}s", flush=True)
                await asyncio.sleep(1.0)
        print(f"[demo] serving on http://127.0.0.1:{self.http}/v1, control 127.0.0.1:{self.ctl_port}",
              flush=True)

    def stop_server(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    # -- requests ----------------------------------------------------------------
    def jobs(self, phase: str) -> list[dict]:
        out = []
        for k in range(self.args.requests):
            seeded = k % 2 == 1
            words = self.rng.randint(20, 40) if seeded else self.rng.randint(60, 250)
            prompt = " ".join(self.rng.choice(["alpha", "beta", "gamma", "delta", "live", "move"])
                              for _ in range(words))
            out.append({"prompt": f"{phase} {k}: {prompt}", "max_tokens": self.args.max_tokens,
                        "temperature": 0.8 if seeded else 0.0, "seed": 1000 + k if seeded else None})
        return out

    async def run_one(self, client, job: dict, stream: bool) -> tuple[str, int]:
        kw = dict(model="tiny", prompt=job["prompt"], max_tokens=job["max_tokens"],
                  temperature=job["temperature"], seed=job["seed"], extra_body={"ignore_eos": True})
        if not stream:
            r = await client.completions.create(**kw)
            return r.choices[0].text, r.usage.completion_tokens
        s = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        text, tokens = [], 0
        async for chunk in s:
            text += [c.text for c in chunk.choices]
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return "".join(text), tokens

    async def watch(self, ctl) -> None:
        async for ev in ctl.watch_events(["migration_done"]):
            self.done_events.append(ev)

    async def force(self, ctl, n: int) -> None:
        """Migrate running requests by hand, each to the other instance, some twice."""
        moved: Counter = Counter()
        deadline = time.monotonic() + 60
        while sum(moved.values()) < n and time.monotonic() < deadline:
            reqs = [r for r in await ctl.list_requests() if r.num_output_tokens > 20
                    and moved[r.id] < 2 and r.state == "running"]
            if not reqs:
                await asyncio.sleep(0.1)
                continue
            r = self.pick.choice(reqs)
            dst = "i1" if r.instance_id == "i0" else "i0"
            res = await ctl.migrate(r.id, dst)
            moved[r.id] += 1
            print(f"[demo]   forced {r.id[:12]} {r.instance_id}->{dst}: {res.state} "
                  f"downtime {res.downtime_ms:.0f} ms", flush=True)

    async def phase(self, client, ctl, name: str, refs: dict, during) -> tuple[int, int]:
        jobs = self.jobs(name)
        print(f"[demo] {name}: {len(jobs)} streams ...", flush=True)
        tasks = [asyncio.ensure_future(self.run_one(client, j, True)) for j in jobs]
        await during()
        results = await asyncio.gather(*tasks)
        exact = sum(text == refs[j["prompt"]] for j, (text, _) in zip(jobs, results))
        return exact, sum(tokens for _, tokens in results)

    async def main(self) -> int:
        import openai

        from llumigrate.control.client import ControlClient

        run_dir = Path(tempfile.mkdtemp(prefix="llumigrate-demo-"))
        t0 = time.monotonic()
        try:
            await self.start_server(run_dir / "serve.log")
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.http}/v1", api_key="none",
                                        max_retries=0, timeout=600)
            async with ControlClient(f"127.0.0.1:{self.ctl_port}") as ctl:
                watcher = asyncio.ensure_future(self.watch(ctl))
                names = ("forced", "balance", "drain")
                print("[demo] references: every request once, without migration ...", flush=True)
                all_jobs = [j for n in names for j in self.jobs(n)]
                self.rng = random.Random(self.args.seed)  # the phases replay the same jobs
                texts = await asyncio.gather(*(self.run_one(client, j, False) for j in all_jobs))
                refs = {j["prompt"]: t for j, (t, _) in zip(all_jobs, texts)}
                totals = [await self.phase(client, ctl, "forced", refs,
                                           lambda: self.force(ctl, self.args.requests + 1))]

                async def balance() -> None:
                    await ctl.set_policy(dispatch="flood", migration=["balance"], thresholds=BALANCE)
                totals.append(await self.phase(client, ctl, "balance", refs, balance))

                async def drain() -> None:
                    await ctl.set_policy(dispatch="flood", migration=["drain"])
                    await asyncio.sleep(1.0)
                    await ctl.drain("i0")
                    print("[demo]   drained i0: its streams move to i1", flush=True)
                totals.append(await self.phase(client, ctl, "drain", refs, drain))
                await ctl.undrain("i0")
                await asyncio.sleep(0.5)
                watcher.cancel()
        finally:
            self.stop_server()
        return self.summary(totals, time.monotonic() - t0)

    def summary(self, totals: list[tuple[int, int]], wall_s: float) -> int:
        n = 3 * self.args.requests
        exact, tokens = sum(e for e, _ in totals), sum(t for _, t in totals)
        by = Counter((ev.detail.get("policy", "?"), ev.detail.get("state", "?")) for ev in self.done_events)
        downs = [float(ev.detail["downtime_ms"]) for ev in self.done_events
                 if ev.detail.get("state") == "done" and ev.detail.get("downtime_ms")]
        committed = sum(c for (_, s), c in by.items() if s == "done")
        causes = ", ".join(f"{p}: {c} {s}" for (p, s), c in sorted(by.items()))
        print("\n[demo] ---- summary ----")
        print(f"[demo] requests      {n} streamed, {exact}/{n} identical to their no-migration run")
        print(f"[demo] migrations    {committed} committed of {len(self.done_events)} ({causes})")
        print(f"[demo] downtime      p50 {_pct(downs, 0.5):.1f} ms, p99 {_pct(downs, 0.99):.1f} ms")
        print(f"[demo] tokens        {tokens} generated in the migrated phases; wall {wall_s:.0f} s")
        policy_driven = sum(c for (p, s), c in by.items() if p in ("balance", "drain") and s == "done")
        ok = exact == n and committed > 0 and policy_driven > 0
        print("[demo] OK" if ok else "[demo] FAILED", flush=True)
        return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    from llumigrate.model.tiny import TinyModelConfig, ensure_tiny_model

    # A 4-layer variant of the built-in model: slow enough on a small CPU that
    # requests are still decoding when they are migrated.
    model = args.model or str(ensure_tiny_model(config=TinyModelConfig(
        num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=8)))
    return asyncio.run(Demo(args, model).main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
