"""Churn: what migrating requests back and forth costs while they decode.

Two instances of the built-in tiny model. Each round starts `--requests`
greedy requests at once (fresh prompts per round, spread over both
instances) and runs them twice on the same prompts, in alternating order:

  none   they decode undisturbed;
  churn  every `--interval-s` the driver migrates the next running request
         (round-robin) to the other instance, at most `--concurrency` at once,
         so each request moves many times.

Reported side by side: decode throughput (output tokens after each request's
first, over the decode window, prefill excluded since the second run of a
round finds its prompts in the prefix cache), gaps between streamed deltas (p50 and p99),
migrations committed and aborted, downtime p50/p99, whether every churned
request produced exactly the tokens of its undisturbed run, and whether both
instances got every KV block back afterwards.

    python benchmarks/bench_churn.py --json out/bench_churn.json

Writes the JSON and a PNG beside it; prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from common import percentile, ratio

from llumigrate.cli.serve import engine_defaults
from llumigrate.controller.cluster import Cluster
from llumigrate.controller.request import RequestHandle
from llumigrate.errors import LlumigrateError
from llumigrate.model.tiny import ensure_tiny_model

CONFIGS = ("none", "churn")


def _prompts(rnd: int, n: int, length: int) -> list[list[int]]:
    # NOTE: a round's own prompts: earlier rounds' prefixes must not be cached.
    return [[5 + (rnd * 7919 + k * 104729 + i * 31) % 1800 for i in range(length)] for k in range(n)]


async def _churn(cluster: Cluster, handles: list[RequestHandle], args: argparse.Namespace,
                 results: list) -> None:
    """Every interval, migrate the next running request that is not moving now."""
    moving: set[asyncio.Task] = set()
    turn = 0
    try:
        while not all(h.finished for h in handles):
            await asyncio.sleep(args.interval_s)
            if len(moving) >= args.concurrency:
                continue
            busy = {t.get_name() for t in moving}
            for _ in range(len(handles)):
                h = handles[turn % len(handles)]
                turn += 1
                if not h.finished and h.request_id not in busy and len(h.output_token_ids) >= 2:
                    task = asyncio.create_task(_migrate(cluster, h, results), name=h.request_id)
                    moving.add(task)
                    task.add_done_callback(moving.discard)
                    break
    finally:
        if moving:
            await asyncio.gather(*moving)


async def _migrate(cluster: Cluster, h: RequestHandle, results: list) -> None:
    try:
        results.append(await cluster.migrate(h.request_id))
    except LlumigrateError as e:  # refused before it started (finished, no room): not a migration
        results.append(e)


def _gaps(h: RequestHandle) -> list[float]:
    """Gaps between the stream's deltas, as its client sees them."""
    return [b - a for a, b in zip(h.token_times, h.token_times[1:])]


async def _run(cluster: Cluster, rnd: int, config: str, args: argparse.Namespace) -> dict:
    prompts = _prompts(rnd, args.requests, args.prompt_tokens)
    sampling = {"temperature": 0.0, "ignore_eos": True, "max_tokens": args.max_tokens}
    instances = sorted(cluster.instances)
    t0 = time.monotonic()
    handles = [await cluster.submit(p, sampling, instance=instances[k % len(instances)],
                                    request_id=f"r{rnd}-{config}-{k}")
               for k, p in enumerate(prompts)]
    migrations: list = []
    driver = asyncio.create_task(_churn(cluster, handles, args, migrations)) if config == "churn" else None
    last_print = t0
    while not all(h.finished for h in handles):
        await asyncio.sleep(0.5)
        if time.monotonic() - last_print >= 5:
            last_print = time.monotonic()
            done = sum(len(h.output_token_ids) for h in handles)
            print(f"[round {rnd + 1}/{args.rounds} {config}] {last_print - t0:5.0f}s  "
                  f"{done}/{args.requests * args.max_tokens} tokens  migrations {len(migrations)}", flush=True)
    if driver is not None:
        await driver
    # Deltas carry one token or several (vLLM merges outputs when the reader
    # lags; a stop's recovered tail arrives as one): count tokens, not deltas.
    started = [h for h in handles if h.token_times]
    decode_start = max((h.token_times[0] for h in started), default=0.0)
    decode_end = max((h.token_times[-1] for h in started), default=0.0)
    decode_tokens = sum(n for h in started for t, n in zip(h.token_times, h.token_counts) if t > decode_start)
    committed = [m for m in migrations if not isinstance(m, Exception) and m.committed]
    aborted = [m for m in migrations if not isinstance(m, Exception) and not m.committed]
    gaps = [g for h in handles for g in _gaps(h)]
    return {
        "round": rnd, "config": config,
        "tokens": [list(h.output_token_ids) for h in handles],   # in prompt order
        "finish_reasons": sorted({str(h.finish_reason) for h in handles}),
        "decode_window_s": decode_end - decode_start,
        "decode_tokens_per_s": decode_tokens / (decode_end - decode_start) if decode_end > decode_start else None,
        "itl_p50_ms": 1000 * percentile(gaps, 50) if gaps else None,
        "itl_p99_ms": 1000 * percentile(gaps, 99) if gaps else None,
        "migrations_committed": len(committed),
        "migrations_aborted": {r: sum(1 for m in aborted if m.reason == r) for r in {m.reason for m in aborted}},
        "migrations_refused": [str(m) for m in migrations if isinstance(m, Exception)],
        "downtime_ms": [1000 * m.downtime_s for m in committed if m.downtime_s is not None],
        "wall_s": time.monotonic() - t0,
    }


async def _settled_free_blocks(cluster: Cluster, want: dict[str, int], timeout_s: float = 30.0) -> dict:
    """Each instance's free blocks once they are back at `want` (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = {i["instance_id"]: int(i["load"]["free_blocks"]) for i in await cluster.instance_info()}
        if free == want or time.monotonic() > deadline:
            return free
        await asyncio.sleep(0.5)


async def _bench(args: argparse.Namespace) -> dict:
    model = str(ensure_tiny_model())
    engine = engine_defaults(["--max-model-len", str(args.prompt_tokens + args.max_tokens + 16)], True)
    runs, leaks = [], []
    async with Cluster(model, 2, engine) as cluster:
        baseline = {i["instance_id"]: int(i["load"]["free_blocks"]) for i in await cluster.instance_info()}
        for rnd in range(args.rounds):
            order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
            for config in order:
                run = await _run(cluster, rnd, config, args)
                free = await _settled_free_blocks(cluster, baseline)
                run["free_blocks_after"] = free
                leaks.append(sum(max(0, baseline[i] - free.get(i, 0)) for i in baseline))
                runs.append(run)
                print(f"[round {rnd + 1} {config}] decode {run['decode_tokens_per_s'] or 0:.0f} tok/s  "
                      f"ITL p99 {run['itl_p99_ms'] or 0:.1f} ms  committed {run['migrations_committed']}  "
                      f"aborted {sum(run['migrations_aborted'].values())}  "
                      f"downtime p50 {percentile(run['downtime_ms'], 50) or 0:.1f} ms  "
                      f"free blocks {free}", flush=True)
    return {"config": vars(args), "baseline_free_blocks": baseline, "runs": runs,
            "summary": _summary(runs, leaks)}


def _summary(runs: list[dict], leaks: list[int]) -> dict:
    by = {c: [r for r in runs if r["config"] == c] for c in CONFIGS}

    def med(config: str, key: str) -> float | None:
        xs = [r[key] for r in by[config] if r[key] is not None]
        return statistics.median(xs) if xs else None
    exact = total = 0
    for churn in by["churn"]:
        ref = next(r for r in by["none"] if r["round"] == churn["round"])
        for got, want in zip(churn["tokens"], ref["tokens"]):
            total += 1
            exact += got == want
    downtime = [d for r in by["churn"] for d in r["downtime_ms"]]
    committed = sum(r["migrations_committed"] for r in by["churn"])
    return {
        "decode_throughput_ratio_churn_vs_none": ratio(med("churn", "decode_tokens_per_s"),
                                                      med("none", "decode_tokens_per_s")),
        "itl_p50_ratio_churn_vs_none": ratio(med("churn", "itl_p50_ms"), med("none", "itl_p50_ms")),
        "itl_p99_ratio_churn_vs_none": ratio(med("churn", "itl_p99_ms"), med("none", "itl_p99_ms")),
        "migrations_committed": committed,
        "migrations_aborted": sum(sum(r["migrations_aborted"].values()) for r in by["churn"]),
        "migrations_per_request": committed / max(1, total),
        "downtime_p50_ms": percentile(downtime, 50),
        "downtime_p99_ms": percentile(downtime, 99),
        "exact_requests": exact,
        "requests": total,
        "leaked_blocks": sum(leaks),
        "decode_tokens_per_s": {c: med(c, "decode_tokens_per_s") for c in CONFIGS},
        "itl_p99_ms": {c: med(c, "itl_p99_ms") for c in CONFIGS},
    }


def _plot(out: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config, color in zip(CONFIGS, ("tab:gray", "tab:orange")):
        rs = [r for r in out["runs"] if r["config"] == config]
        ax1.plot([r["round"] + 1 for r in rs], [r["decode_tokens_per_s"] for r in rs], marker="o",
                 color=color, label=config)
    ax1.set_xticks(sorted({r["round"] + 1 for r in out["runs"]}))
    ax1.set_xlabel("round")
    ax1.set_ylabel("decode tokens/s (both instances)")
    ax1.set_title("throughput: undisturbed vs churned")
    ax1.legend()
    ax1.grid(alpha=0.3)
    downtime = [d for r in out["runs"] if r["config"] == "churn" for d in r["downtime_ms"]]
    ax2.hist(downtime, bins=30, color="tab:orange")
    ax2.set_xlabel("client-visible downtime per migration (ms)")
    ax2.set_ylabel("migrations")
    ax2.set_title(f"{len(downtime)} committed migrations")
    fig.suptitle("llumigrate churn (tiny model, 2 instances)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--interval-s", type=float, default=0.2, help="seconds between migrations started")
    p.add_argument("--concurrency", type=int, default=2, help="migrations in flight at once")
    args = p.parse_args()
    if min(args.rounds, args.requests, args.concurrency) < 1 or args.interval_s <= 0:
        p.error("--rounds, --requests and --concurrency must be >= 1 and --interval-s > 0")
    out = asyncio.run(_bench(args))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    _plot(out, path.with_suffix(".png"))
    s = out["summary"]
    keys = [k for k in s if not isinstance(s[k], dict)]
    print("bench_churn: " + " ".join(f"{k}={s[k]:.3f}" if isinstance(s[k], float) else f"{k}={s[k]}"
                                     for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
