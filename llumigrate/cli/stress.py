"""Stress live migration: mixed load, continuous migrations, injected faults, failover.

Starts N instances, drives a seeded mix of requests, migrates them all the
time (random moves, chains, policy moves) while a seeded schedule kills
agents and engines, breaks KV transfers, aborts clients and fills
destinations at every protocol step; then checks the invariants (every
request completes exactly once with an exact stream, outputs equal a run
without migration, no block, segment or process leaks). Exit status 1 on
any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from llumigrate.stress.config import DEFECTS, FAULT_KINDS, StressConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, default=3, help="instances to start (default 3)")
    p.add_argument("--requests", type=int, default=40, help="requests to run (0: use --duration)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to keep submitting (0: use --requests)")
    p.add_argument("--max-duration", type=float, default=900.0, help="hard cap on the load phase")
    p.add_argument("--seed", type=int, default=0, help="seeds the request mix, migrations and faults")
    p.add_argument("--concurrency", type=int, default=6, help="requests in flight at once")
    p.add_argument("--faults", default="all",
                   help=f"comma-separated fault kinds, 'all' or 'none' (kinds: {', '.join(FAULT_KINDS)})")
    p.add_argument("--fault-rate", type=float, default=0.5, help="share of migrations that get a fault")
    p.add_argument("--require-all-faults", action="store_true",
                   help="keep running until every fault kind was injected (a violation otherwise)")
    p.add_argument("--stall-s", type=float, default=2.0, help="how long a stalled KV transfer stays silent")
    p.add_argument("--stage-timeout", type=float, default=20.0, help="pre-copy stage / commit deadline (s)")
    p.add_argument("--no-failover", action="store_true", help="requests of lost instances fail instead")
    p.add_argument("--no-respawn", action="store_true", help="do not replace killed instances")
    p.add_argument("--model", help="model path (default: the wider built-in tiny model)")
    p.add_argument("--json", type=Path, help="write the report here (and a PNG beside it)")
    p.add_argument("--no-progress", action="store_true", help="no live status line")
    p.add_argument("--plant-defect", choices=DEFECTS, help=argparse.SUPPRESS)  # harness self-test


def parse_faults(text: str) -> tuple[str, ...]:
    if text == "all":
        return FAULT_KINDS
    if text in ("", "none"):
        return ()
    return tuple(k.strip() for k in text.split(",") if k.strip())


def config_from(args: argparse.Namespace) -> StressConfig:
    return StressConfig(
        num_instances=args.instances, num_requests=args.requests, duration_s=args.duration,
        max_duration_s=args.max_duration, seed=args.seed, concurrency=args.concurrency,
        faults=parse_faults(args.faults), fault_rate=args.fault_rate,
        require_all_faults=args.require_all_faults, stall_s=args.stall_s,
        stage_timeout_s=args.stage_timeout, failover=not args.no_failover,
        respawn=not args.no_respawn, model=args.model, progress=not args.no_progress,
        plant_defect=args.plant_defect)


def default_model() -> str:
    """The wider built-in tiny model: slow enough on a small CPU to migrate mid-stream."""
    from llumigrate.model.tiny import TinyModelConfig, ensure_tiny_model
    return str(ensure_tiny_model(config=TinyModelConfig(num_layers=4, hidden_size=512, num_heads=8,
                                                        num_kv_heads=8)))


async def stress(cfg: StressConfig, json_path: Path | None = None):
    """Run one stress run; returns its `StressResult` (and writes the report)."""
    from llumigrate.stress import report
    from llumigrate.stress.runner import StressRunner

    result = await StressRunner(cfg, cfg.model or default_model()).run()
    if json_path is not None:
        report.write(result, json_path)
    return result


def run(args: argparse.Namespace) -> int:
    from llumigrate.stress import report

    logging.basicConfig(level=os.environ.get("LLUMIGRATE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from(args)
    result = asyncio.run(stress(cfg, args.json))
    for v in result.violations[:20]:
        print(f"violation [{v.check}] {v.subject}: {v.detail}", flush=True)
    print(report.one_line(result), flush=True)
    return 1 if result.violations else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
