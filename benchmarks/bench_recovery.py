"""Recovery: an instance killed under load, as the OOM killer would.

One `llumigrate serve` (2 instances of the built-in tiny model) under a
steady load of streamed greedy completions. `--kills` times, SIGKILL the
agent of instance i1 and its engine (its process group), and measure from
the kill, on the control API's event stream:

  detect    until `instance_down` (the cluster saw it go),
  recover   until `instance_up` under the same id (restarted: the restart
            policy's backoff, 1 s doubling per crash in a row, plus an engine
            start),

and, over the whole run, the streams that failed (those on i1 are replayed on
i0 by failover: none should fail) and the engines' shared-memory files left
in /dev/shm by the killed engines (none should be).

    python benchmarks/bench_recovery.py --json out/bench_recovery.json

Writes the JSON and a PNG beside it; prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from common import Server, free_port, latency_stats, llumigrate_cmd, stream_completion, write_json

from llumigrate.cli.serve import engine_defaults
from llumigrate.control.client import ControlClient
from llumigrate.controller import shmreap
from llumigrate.model.tiny import ensure_tiny_model


async def _load(base_url: str, stop: asyncio.Event, results: list, args: argparse.Namespace) -> None:
    """`--concurrency` streams at a time, each a fresh prompt, until `stop`."""
    n = 0

    async def one(http: aiohttp.ClientSession, k: int) -> None:
        prompt = [5 + (k * 7919 + i * 31) % 1800 for i in range(args.prompt_len)]
        results.append(await stream_completion(http, base_url, prompt, args.max_tokens))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        running: set[asyncio.Task] = set()
        while not stop.is_set() or running:
            while not stop.is_set() and len(running) < args.concurrency:
                n += 1
                running.add(asyncio.ensure_future(one(http, n)))
            done, running = await asyncio.wait(running, timeout=0.2)


async def _kill_and_time(ctl: ControlClient, run_dir: Path, timeout_s: float) -> dict:
    """SIGKILL i1's process group; seconds until it is seen down, then up again."""
    pid = int(json.loads((run_dir / "i1.ready").read_text())["pid"])
    events: asyncio.Queue = asyncio.Queue()

    async def watch() -> None:
        async for e in ctl.watch_events(["instance_up", "instance_down"]):
            if e.instance_id == "i1":
                await events.put((e.kind, time.monotonic(), dict(e.detail)))
    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.5)   # the watch is on
    try:
        t0 = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        out: dict = {"pid": pid}
        deadline = t0 + timeout_s
        while "recover_s" not in out:
            kind, t, detail = await asyncio.wait_for(events.get(), max(0.1, deadline - time.monotonic()))
            if kind == "instance_down" and "detect_s" not in out:
                out["detect_s"], out["down_reason"] = t - t0, detail.get("reason", "")
            elif kind == "instance_up":
                out["recover_s"] = t - t0
        out["new_pid"] = int(json.loads((run_dir / "i1.ready").read_text())["pid"])
        return out
    finally:
        watcher.cancel()


async def bench(args: argparse.Namespace, out_dir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    port, control_port = free_port(), free_port()
    shm_before = shmreap.engine_files()
    cmd = llumigrate_cmd(str(ensure_tiny_model()), port, control_port, 2,
                         engine_defaults([], builtin_model=True)) + ["--run-dir", str(run_dir)]
    server = Server("llumigrate", cmd, port, out_dir / "bench_recovery.server.log").start()
    kills: list[dict] = []
    results: list = []
    try:
        print("starting llumigrate serve (2 instances) ...", flush=True)
        await server.wait_ready()
        stop = asyncio.Event()
        load = asyncio.ensure_future(_load(server.base_url, stop, results, args))
        async with ControlClient(f"127.0.0.1:{control_port}") as ctl:
            for k in range(args.kills):
                await asyncio.sleep(args.settle_s)
                kills.append(await _kill_and_time(ctl, run_dir, args.timeout_s))
                r = kills[-1]
                print(f"[kill {k + 1}/{args.kills}] down after {r['detect_s']:.2f} s, "
                      f"up again after {r['recover_s']:.1f} s  (streams so far {len(results)}, "
                      f"failed {sum(x.error is not None for x in results)})", flush=True)
            await asyncio.sleep(args.settle_s)
        stop.set()
        await load
    finally:
        server.stop()
    left = sorted(os.path.basename(p) for p in shmreap.left_behind(shm_before))
    stats = latency_stats(results)
    return {"kills": kills, "streams": len(results), "streams_failed": stats["failed"],
            "errors": sorted({r.error for r in results if r.error})[:5], "latency": stats,
            "engine_shm_left": left}


def _plot(out: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kills = out["kills"]
    xs = list(range(1, len(kills) + 1))
    detect = [k["detect_s"] for k in kills]
    rest = [k["recover_s"] - k["detect_s"] for k in kills]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, detect, label="kill -> seen down")
    ax.bar(xs, rest, bottom=detect, label="down -> restarted (backoff + engine start)")
    ax.set_xlabel("kill (crash in a row)")
    ax.set_ylabel("seconds")
    ax.set_xticks(xs)
    ax.set_title(f"instance i1 SIGKILLed under load: {out['streams']} streams, "
                 f"{out['streams_failed']} failed", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="out/bench_recovery.json")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4, help="streams in flight")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--settle-s", type=float, default=3.0, help="load before each kill and after the last")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per kill, until it is up again")
    args = p.parse_args()
    path = Path(args.json)
    out = asyncio.run(bench(args, path.parent))
    out["args"] = vars(args)
    rec = [k["recover_s"] for k in out["kills"]]
    out["summary"] = {"kills": len(rec), "max_detect_s": max(k["detect_s"] for k in out["kills"]),
                      "recover_s": rec, "streams": out["streams"], "streams_failed": out["streams_failed"],
                      "engine_shm_left": len(out["engine_shm_left"])}
    write_json(path, out)
    _plot(out, path.with_suffix(".png"))
    s = out["summary"]
    print(f"bench_recovery: {s['kills']} kills, seen down within {s['max_detect_s']:.2f} s, up again after "
          f"{', '.join(f'{x:.1f}' for x in rec)} s; streams {s['streams']}, failed {s['streams_failed']}; "
          f"engine shm files left {s['engine_shm_left']} -> {path}", flush=True)
    return 0 if s["streams_failed"] == 0 and s["engine_shm_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
