"""Serving under load: llumigrate with migration vs the same dispatch without it
vs round-robin, on a replayed production trace, with KV memory small enough
that vLLM preempts.

Workload: a window of the Azure LLM inference trace 2023, conversation service
(`AzureLLMInferenceTrace_conv.csv`; Azure/AzurePublicDataset, described in
Patel et al., "Splitwise: Efficient generative LLM inference using phase
splitting", ISCA 2024; CC-BY 4.0). Arrival gaps are stretched by
`--time-scale` and prompt/output lengths scaled down so that the tiny model on
this machine is loaded but not hopeless; `--arrivals gamma` keeps the trace's
lengths but draws gamma-distributed gaps (`--rate`, `--cv`) for bursts.
Prompts are random token ids of the scaled length (distinct per run, so no
run benefits from the prefix cache of an earlier one); outputs are forced to
the scaled length (`ignore_eos`).

One `llumigrate serve` (2 instances) serves every configuration; the policy
is switched over the control API between runs, once the instances are idle:

    migration      least-load dispatch + drain, priority, defrag, balance
    no_balance     the same without balance (an ablation; not run by default)
    no_migration   least-load dispatch, no migration policy
    round_robin    round-robin dispatch, no migration policy

Rounds alternate the order (a b c, c b a, ...) so drift of the shared machine
falls on every configuration. The client streams /v1/completions and measures
TTFT, TPOT and E2E itself (as `vllm bench serve` does). Preemptions are counted
in the engines by a probe (see `common.PREEMPT_PROBE`); migrations from
llumigrate's /metrics.

    python benchmarks/bench_serving.py --json out/bench_serving.json

Writes the JSON and a PNG beside it; prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
from common import (
    RequestResult,
    Server,
    StatusLine,
    count_preemptions,
    preemption_times,
    fmt,
    free_port,
    latency_stats,
    llumigrate_cmd,
    percentile,
    preemption_probe_env,
    ratio,
    stream_completion,
    write_json,
)

from llumigrate.control.client import ControlClient
from llumigrate.model.tiny import ensure_tiny_model

TRACE = Path(__file__).resolve().parents[2] / "shared/data/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
TRACE_SOURCE = ("Azure LLM inference trace 2023, conversation (AzureLLMInferenceTrace_conv.csv), "
                "Azure/AzurePublicDataset; Patel et al., 'Splitwise: Efficient generative LLM "
                "inference using phase splitting', ISCA 2024; CC-BY 4.0")
ALL_MIGRATION = ["drain", "priority", "defrag", "balance"]
CONFIGS = {  # name -> (dispatch policy, migration policies)
    "migration": ("least-load", ALL_MIGRATION),
    "no_balance": ("least-load", [m for m in ALL_MIGRATION if m != "balance"]),
    "no_migration": ("least-load", []),
    "round_robin": ("round-robin", []),
}
DEFAULT_CONFIGS = ["migration", "no_migration", "round_robin"]


@dataclass(frozen=True)
class Job:
    """One request of the workload: send at `arrival_s`, prompt and output lengths."""

    arrival_s: float
    prompt_len: int
    output_len: int


# -- workload ----------------------------------------------------------------------------
def read_trace(path: Path, start_s: float, window_s: float) -> list[tuple[float, int, int]]:
    """(seconds since the window's start, context tokens, generated tokens) of the rows
    arriving in [start_s, start_s + window_s) after the trace's first row."""
    rows, t_first = [], None
    with open(path) as f:
        for row in csv.DictReader(f):
            t = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            t_first = t if t_first is None else t_first
            offset = t - t_first - start_s
            if offset >= window_s:
                break
            if offset >= 0:
                rows.append((offset, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    return rows


def scale_lengths(n: int, scale: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(n * scale)))


def build_workload(args: argparse.Namespace) -> list[Job]:
    rows = read_trace(Path(args.trace), args.trace_start_s, args.window_s)
    if args.arrivals == "gamma":
        rng = random.Random(args.seed)
        shape = 1.0 / (args.cv ** 2)
        t, times = 0.0, []
        for _ in rows:
            times.append(t)
            t += rng.gammavariate(shape, 1.0 / (shape * args.rate))
    else:
        times = [r[0] * args.time_scale for r in rows]
    return [Job(t, scale_lengths(c, args.prompt_scale, 8, args.max_prompt),
                scale_lengths(g, args.output_scale, 4, args.max_output))
            for t, (_, c, g) in zip(times, rows)]


def make_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(16, 2000) for _ in range(n)]


# -- one run -----------------------------------------------------------------------------
async def metrics_text(http: aiohttp.ClientSession, base_url: str) -> str:
    async with http.get(f"{base_url}/metrics") as r:
        return await r.text()


LAG = "llumigrate_event_loop_lag_seconds"


def loop_lag(text: str) -> dict[str, float]:
    """The serving process's event-loop lag histogram on /metrics: rounds,
    total seconds late, and rounds more than 0.1 s / 0.25 s late."""
    out = {"rounds": 0.0, "late_s": 0.0, "over_0.1s": 0.0, "over_0.25s": 0.0}
    below: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{LAG}_count"):
            out["rounds"] = float(line.split()[-1])
        elif line.startswith(f"{LAG}_sum"):
            out["late_s"] = float(line.split()[-1])
        elif line.startswith(f"{LAG}_bucket{{"):
            below[line.split('le="', 1)[1].split('"', 1)[0]] = float(line.split()[-1])
    out["over_0.1s"] = out["rounds"] - below.get("0.1", out["rounds"])
    out["over_0.25s"] = out["rounds"] - below.get("0.25", out["rounds"])
    return out


def committed_migrations(text: str) -> dict[str, int]:
    """llumigrate_migrations_total{outcome="committed",reason=...} on /metrics, by reason."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("llumigrate_migrations_total{") and 'outcome="committed"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in line else "?"
            out[reason] = out.get(reason, 0) + int(float(line.split()[-1]))
    return out


async def wait_idle(ctl: ControlClient, timeout_s: float = 180.0) -> None:
    """Until no request is left and every block is free (holds released) on every instance."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        insts = await ctl.list_instances()
        busy = [i for i in insts if i.num_running or i.num_waiting or i.num_migrations_in
                or i.num_migrations_out or i.free_blocks < i.num_blocks]
        if not busy and not await ctl.list_requests():
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("instances did not become idle")


async def replay(http: aiohttp.ClientSession, base_url: str, jobs: list[Job], salt: int,
                 results: list[RequestResult]) -> None:
    """Send every job at its arrival time (open loop); `results` fills as they finish."""
    rng = random.Random(salt)
    prompts = [make_prompt(rng, j.prompt_len) for j in jobs]
    t0, tasks = time.perf_counter(), []

    async def one(job: Job, prompt: list[int]) -> None:
        results.append(await stream_completion(http, base_url, prompt, job.output_len))
    for job, prompt in zip(jobs, prompts):
        await asyncio.sleep(max(0.0, t0 + job.arrival_s - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one(job, prompt)))
    await asyncio.gather(*tasks)


async def sample_load(ctl: ControlClient, t0: float, timeline: list[dict], every_s: float = 0.1) -> None:
    """Per-instance queue and free blocks every `every_s`, until cancelled."""
    while True:
        insts = await ctl.list_instances()
        timeline.append({"t": round(time.perf_counter() - t0, 3),
                         "instances": {i.id: [i.num_running, i.num_waiting, i.free_blocks]
                                       for i in insts if i.up}})
        await asyncio.sleep(every_s)


async def record_migrations(ctl: ControlClient, wall0: float, events: list[dict]) -> None:
    """Every finished migration (time since the run's start, request, source,
    destination, policy, state, why it aborted, milliseconds), until cancelled."""
    async for e in ctl.watch_events(["migration_done"]):
        d = dict(e.detail)
        events.append({"t": round(e.timestamp - wall0, 3), "request_id": e.request_id,
                       "source": e.instance_id, "destination": e.destination_id,
                       "policy": d.get("policy", ""), "state": d.get("state", ""),
                       "reason": d.get("reason", ""),
                       "total_ms": float(d["total_ms"]) if d.get("total_ms") else None,
                       "downtime_ms": float(d["downtime_ms"]) if d.get("downtime_ms") else None})


def stranded_queue_s(timeline: list[dict], min_s: float = 0.3) -> float:
    """Seconds during which some instance had a queue while another had none
    (queued work that a move could have started sooner), from the samples.
    Only stretches lasting `min_s` or more count: a request that just arrived
    waits for the engine's next step anyway."""
    total, start = 0.0, None
    for a, b in zip(timeline, timeline[1:]):
        waiting = [w for _, w, _ in a["instances"].values()]
        stranded = len(waiting) > 1 and max(waiting) > 0 and min(waiting) == 0
        if stranded and start is None:
            start = a["t"]
        elif not stranded and start is not None:
            total += a["t"] - start if a["t"] - start >= min_s else 0.0
            start = None
    if start is not None and timeline[-1]["t"] - start >= min_s:
        total += timeline[-1]["t"] - start
    return total


async def run_config(name: str, server: Server, ctl: ControlClient, jobs: list[Job], salt: int,
                     probe_dir: Path, label: str, thresholds: dict[str, float] | None = None) -> dict:
    dispatch, migration = CONFIGS[name]
    await wait_idle(ctl)
    await ctl.set_policy(dispatch=dispatch, migration=migration,
                         thresholds=thresholds if migration else None)
    results: list[RequestResult] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
        text0, wall0, t0 = await metrics_text(http, server.base_url), time.time(), time.perf_counter()

        def status() -> str:
            return (f"[{label} {name}] {time.perf_counter() - t0:5.0f}s  done {len(results)}/{len(jobs)}  "
                    f"failed {sum(r.error is not None for r in results)}  "
                    f"preemptions {count_preemptions(probe_dir, wall0)}")
        timeline: list[dict] = []
        events: list[dict] = []
        watchers = [asyncio.ensure_future(sample_load(ctl, t0, timeline)),
                    asyncio.ensure_future(record_migrations(ctl, wall0, events))]
        try:
            async with StatusLine(status):
                await replay(http, server.base_url, jobs, salt, results)
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        for w in watchers:
            if not w.cancelled() and w.exception() is not None:
                raise w.exception()
        elapsed, wall1 = time.perf_counter() - t0, time.time()
        text1 = await metrics_text(http, server.base_url)
        migr0, migr1 = committed_migrations(text0), committed_migrations(text1)
        by_reason = {k: n - migr0.get(k, 0) for k, n in migr1.items() if n - migr0.get(k, 0)}
        lag0, lag1 = loop_lag(text0), loop_lag(text1)
        lag = {k: round(lag1[k] - lag0[k], 3) for k in lag1}
    return {"config": name, "label": label, "results": results, "elapsed_s": elapsed,
            "preemptions": count_preemptions(probe_dir, wall0, wall1),
            "migrations": sum(by_reason.values()), "migrations_by_reason": by_reason,
            "errors": sorted({r.error for r in results if r.error})[:5],
            "stranded_queue_s": stranded_queue_s(timeline), "timeline": timeline,
            "migration_events": events, "serve_loop_lag": lag,
            "preemption_times": preemption_times(probe_dir, wall0, wall1),
            "slowest_starts": [{"sent_s": round(r.sent_at - t0, 3), "ttft_s": round(r.ttft, 3),
                                "prompt_len": r.prompt_len, "max_tokens": r.max_tokens}
                               for r in sorted((r for r in results if r.ttft is not None),
                                               key=lambda r: -r.ttft)[:10]]}


# -- summary -----------------------------------------------------------------------------
def pooled(runs: list[dict]) -> dict:
    """Latency percentiles over every request of these runs; throughput as total
    output tokens over total run time (first send to last token)."""
    results = [r for run in runs for r in run["results"]]
    tokens = sum(r.output_tokens for r in results if r.error is None)
    seconds = sum(run["elapsed_s"] for run in runs)
    return {**latency_stats(results), "output_tokens": tokens, "elapsed_s": seconds,
            "throughput_tok_s": tokens / seconds, "request_throughput": len(results) / seconds,
            "preemptions": sum(run["preemptions"] for run in runs),
            "migrations": sum(run["migrations"] for run in runs),
            "stranded_queue_s": sum(run["stranded_queue_s"] for run in runs),
            "migrations_by_reason": {k: sum(run["migrations_by_reason"].get(k, 0) for run in runs)
                                     for k in sorted({k for run in runs for k in run["migrations_by_reason"]})}}


def ratio_interval(runs: list[dict], q: float = 99, samples: int = 2000, seed: int = 0,
                   num: str = "migration", den: str = "no_migration") -> list[float] | None:
    """95% bootstrap interval of the pooled p`q` TTFT ratio `num`/`den`. Rounds
    are resampled (a round's drift of the shared machine hits both
    configurations of it), then the requests within each resampled run; the
    spread says how much of a measured ratio the noise alone could give."""
    rounds: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        rounds.setdefault(run["label"], {})[run["config"]] = [r.ttft for r in run["results"]
                                                              if r.error is None and r.ttft is not None]
    paired = [r for r in rounds.values() if r.get(num) and r.get(den)]
    if not paired:
        return None
    rng, out = random.Random(seed), []
    for _ in range(samples):
        pick = [rng.choice(paired) for _ in paired]
        a = [x for r in pick for x in rng.choices(r[num], k=len(r[num]))]
        b = [x for r in pick for x in rng.choices(r[den], k=len(r[den]))]
        out.append(percentile(a, q) / percentile(b, q))
    return [round(percentile(out, 2.5), 3), round(percentile(out, 97.5), 3)]


def round_geomean(per_round: list[float], samples: int = 2000,
                  seed: int = 0) -> tuple[float, list[float]] | None:
    """The geometric mean of per-round ratios, and its 95% bootstrap interval
    over rounds. Each round pairs the configurations on the same machine
    state, so a slow round (which drives a pooled p99 for every
    configuration) weighs as one round, not as the whole tail."""
    logs = [math.log(r) for r in per_round if r]
    if not logs:
        return None
    rng = random.Random(seed)
    means = sorted(math.exp(sum(rng.choices(logs, k=len(logs))) / len(logs)) for _ in range(samples))
    return math.exp(sum(logs) / len(logs)), [round(percentile(means, 2.5), 3), round(percentile(means, 97.5), 3)]


def summarize(per_config: dict[str, dict], runs: list[dict] | None = None) -> dict:
    m, n, rr = per_config["migration"], per_config["no_migration"], per_config.get("round_robin", {})
    # Each round's own p99 TTFT ratio: the spread shows how much of a pooled
    # ratio is the shared machine's noise (a p99 of ~200 requests is ~2 requests).
    per_round = {}
    for run in runs or []:
        per_round.setdefault(run["label"], {})[run["config"]] = latency_stats(run["results"])["p99_ttft_ms"]
    rounds = [ratio(r["migration"], r["no_migration"]) for r in per_round.values()
              if "migration" in r and "no_migration" in r]
    geo = round_geomean(rounds)
    return {
        "p99_ttft_ratio_migration_vs_none": ratio(m["p99_ttft_ms"], n["p99_ttft_ms"]),
        "throughput_ratio_migration_vs_none": ratio(m["throughput_tok_s"], n["throughput_tok_s"]),
        "p99_ttft_ratio_migration_vs_round_robin": ratio(m["p99_ttft_ms"], rr.get("p99_ttft_ms")),
        "p99_e2e_ratio_migration_vs_none": ratio(m["p99_e2e_ms"], n["p99_e2e_ms"]),
        "preemptions": {k: v["preemptions"] for k, v in per_config.items()},
        "migrations": {k: v["migrations"] for k, v in per_config.items()},
        "stranded_queue_s": {k: round(v["stranded_queue_s"], 2) for k, v in per_config.items()},
        "migrations_by_reason": {k: v["migrations_by_reason"] for k, v in per_config.items()},
        "p99_ttft_ratio_migration_vs_none_per_round": rounds,
        "p99_ttft_ratio_migration_vs_none_95ci": ratio_interval(runs or []),
        # the paired view: each round's own ratio, geometric mean over rounds
        "p99_ttft_ratio_migration_vs_none_round_geomean": geo[0] if geo else None,
        "p99_ttft_ratio_migration_vs_none_round_geomean_95ci": geo[1] if geo else None,
        "p50_ttft_ratio_migration_vs_none": ratio(m["p50_ttft_ms"], n["p50_ttft_ms"]),
        # every configuration run (ablations included) against no migration
        "p99_ttft_ratio_vs_none": {k: ratio(v["p99_ttft_ms"], n["p99_ttft_ms"]) for k, v in per_config.items()},
    }


def plot(per_config: dict[str, dict], runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(per_config)
    for name in names:
        ttfts = sorted(r.ttft for run in runs if run["config"] == name
                       for r in run["results"] if r.ttft is not None)
        axes[0].plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
    axes[0].set(xscale="log", xlabel="TTFT (s)", ylabel="CDF", title="TTFT")
    axes[0].legend()
    width = 0.25
    for k, name in enumerate(names):
        vals = [per_config[name][f"p{q}_{m}_ms"] or 0 for m in ("ttft", "e2e") for q in (50, 99)]
        axes[1].bar([x + k * width for x in range(4)], vals, width, label=name)
    axes[1].set_xticks([x + width for x in range(4)], ["P50 TTFT", "P99 TTFT", "P50 E2E", "P99 E2E"])
    axes[1].set(ylabel="ms", yscale="log", title="latency")
    axes[1].legend()
    for k, metric in enumerate(("preemptions", "migrations")):
        axes[2].bar([x + k * 0.4 for x in range(len(names))], [per_config[n][metric] for n in names],
                    0.4, label=metric)
    axes[2].set_xticks([x + 0.2 for x in range(len(names))], names)
    axes[2].set(title="preemptions and committed migrations")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main --------------------------------------------------------------------------------
def engine_args(args: argparse.Namespace) -> list[str]:
    return ["--dtype", "float32", "--enforce-eager", "--block-size", str(args.block_size),
            "--kv-cache-memory-bytes", str(int(args.kv_mib * (1 << 20))),
            "--max-model-len", str(args.max_prompt + args.max_output + args.block_size),
            "--max-num-seqs", str(args.max_num_seqs)]


async def warm_up(server: Server) -> None:
    rng = random.Random(-1)
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(stream_completion(http, server.base_url, make_prompt(rng, 200), 32)
                               for _ in range(4)))


async def bench(args: argparse.Namespace, jobs: list[Job], out_dir: Path) -> list[dict]:
    probe_dir = Path(tempfile.mkdtemp(prefix="bench-serving-probe-"))
    port, control_port = free_port(), free_port()
    cmd = llumigrate_cmd(str(ensure_tiny_model()), port, control_port, args.num_instances, engine_args(args))
    server = Server("llumigrate", cmd, port, out_dir / "bench_serving.server.log",
                    env=preemption_probe_env(probe_dir)).start()
    runs: list[dict] = []
    try:
        print(f"starting llumigrate serve ({args.num_instances} instances) ...", flush=True)
        await server.wait_ready()
        await warm_up(server)
        async with ControlClient(f"127.0.0.1:{control_port}") as ctl:
            for rnd in range(args.rounds):
                order = args.configs if rnd % 2 == 0 else args.configs[::-1]
                for name in order:
                    run = await run_config(name, server, ctl, jobs, 1000 * rnd + len(runs), probe_dir,
                                           f"round {rnd + 1}/{args.rounds}", args.thresholds)
                    runs.append(run)
                    s = latency_stats(run["results"])
                    print(f"[round {rnd + 1} {name}] p99 TTFT {fmt(s['p99_ttft_ms'], '.0f')} ms  "
                          f"preemptions {run['preemptions']}  migrations {run['migrations_by_reason']}  "
                          f"stranded queue {run['stranded_queue_s']:.1f}s  "
                          f"serve loop late >0.1s x{run['serve_loop_lag']['over_0.1s']:.0f}  "
                          f"failed {s['failed']}", flush=True)
    finally:
        server.stop()
    return runs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="out/bench_serving.json")
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--arrivals", choices=["trace", "gamma"], default="trace")
    p.add_argument("--trace-start-s", type=float, default=60.0, help="window start, seconds into the trace")
    p.add_argument("--window-s", type=float, default=40.0, help="trace seconds replayed (sets the requests)")
    p.add_argument("--time-scale", type=float, default=1.5, help="stretch arrival gaps by this factor")
    p.add_argument("--rate", type=float, default=2.5, help="gamma arrivals: requests/s")
    p.add_argument("--cv", type=float, default=3.0, help="gamma arrivals: coefficient of variation")
    p.add_argument("--prompt-scale", type=float, default=0.25)
    p.add_argument("--output-scale", type=float, default=0.5)
    p.add_argument("--max-prompt", type=int, default=768)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="each round runs every configuration once")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS,
                   help="configurations to run (migration and no_migration give the summary)")
    p.add_argument("--num-instances", type=int, default=2)
    p.add_argument("--kv-mib", type=float, default=1.5, help="KV cache per instance (MiB)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="a scheduler knob for the migration configuration (e.g. "
                        "migrate_in_threshold=2); repeatable")
    args = p.parse_args()
    if not {"migration", "no_migration"} <= set(args.configs):
        p.error("--configs must include migration and no_migration (the summary's ratios)")
    try:
        args.thresholds = {k: float(v) for k, v in (t.split("=", 1) for t in args.threshold)}
    except ValueError:
        p.error("--threshold takes NAME=VALUE with a number")
    return args


def main() -> None:
    args = parse_args()
    jobs = build_workload(args)
    out = Path(args.json)
    print(f"{len(jobs)} requests over {jobs[-1].arrival_s:.0f} s ({args.arrivals} arrivals), "
          f"prompt mean {sum(j.prompt_len for j in jobs) / len(jobs):.0f}, "
          f"output mean {sum(j.output_len for j in jobs) / len(jobs):.0f} tokens", flush=True)
    runs = asyncio.run(bench(args, jobs, out.parent))
    per_config = {name: pooled([r for r in runs if r["config"] == name]) for name in args.configs}
    summary = summarize(per_config, runs)
    write_json(out, {"summary": summary, "configs": per_config, "source": TRACE_SOURCE,
                     "args": vars(args), "num_requests": len(jobs),
                     "runs": [{k: v for k, v in r.items() if k != "results"} | latency_stats(r["results"])
                              for r in runs]})
    plot(per_config, runs, out.with_suffix(".png"))
    ci = summary["p99_ttft_ratio_migration_vs_none_95ci"]
    print(f"bench_serving: p99 TTFT migration/none {fmt(summary['p99_ttft_ratio_migration_vs_none'])} "
          f"(target <= 0.5; 95% interval {ci}; per-round geometric mean "
          f"{fmt(summary['p99_ttft_ratio_migration_vs_none_round_geomean'])} "
          f"{summary['p99_ttft_ratio_migration_vs_none_round_geomean_95ci']}), "
          f"throughput migration/none {fmt(summary['throughput_ratio_migration_vs_none'])} "
          f"(target >= 1.0), preemptions {summary['preemptions']}, migrations {summary['migrations']} "
          f"-> {out}")


if __name__ == "__main__":
    main()
