"""The report of a stress run: a JSON document with a `summary`, a PNG
(downtime histogram, faults by step), and the one-line summary printed last."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from llumigrate.stress.runner import StressResult


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (`q` in [0, 1]); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def abort_class(reason: str) -> str:
    """A short class for a migration's abort reason."""
    text = reason.lower()
    for key, words in (("destination_full", ("free blocks",)), ("client_abort", ("client aborted",)),
                       ("finished_on_source", ("finished on the source", "no tokens left",
                                               "already finished", "no running request")),
                       ("kv_load_failed", ("load failed", "destination failed")),
                       ("instance_lost", ("lost", "down", "connection", "closed")),
                       ("timeout", ("timed out", "timeout"))):
        if any(w in text for w in words):
            return key
    return "other"


def summary(res: StressResult) -> dict:
    committed = [m for m in res.migrations if m.committed]
    downs = [1000 * m.downtime_s for m in committed if m.downtime_s is not None]
    fired = [f for f in res.faults if f.fired]
    p50, p99 = percentile(downs, 0.5), percentile(downs, 0.99)
    return {
        "violations": len(res.violations),
        "violations_by_check": dict(Counter(v.check for v in res.violations)),
        "migrations_committed": len(committed),
        # How the source stopped each committed one: "step" (at a step boundary,
        # no sampled token lost) or "abort" (not running there, or not ended in time).
        "migrations_stopped_by": dict(Counter(m.stopped_by or "unknown" for m in committed)),
        "migrations_aborted": dict(Counter(abort_class(m.reason) for m in res.migrations if not m.committed)),
        "migrations_refused": res.refused,
        "migrations_started": res.started,
        "faults_injected": dict(Counter(f.step for f in fired)),
        "faults_by_kind": dict(Counter(f.kind for f in fired)),
        "requests": len(res.requests),
        "requests_completed": sum(r.finish_count == 1 for r in res.requests),
        "requests_by_end": dict(Counter(str(r.finish_reason) for r in res.requests)),
        "requests_failed_over": sum(r.failovers > 0 for r in res.requests),
        "failovers": res.failovers,
        "instances_down": len(res.instances_down),
        "instances_respawned": len(res.respawned),
        "downtime_ms_p50": None if p50 is None else round(p50, 2),
        "downtime_ms_p99": None if p99 is None else round(p99, 2),
        "duration_s": round(res.duration_s, 1),
        "seed": res.config.seed,
    }


def to_json(res: StressResult) -> dict:
    return {
        "summary": summary(res),
        "config": asdict(res.config),
        "violations": [v.to_dict() for v in res.violations],
        "faults": [asdict(f) for f in res.faults],
        "instances_down": [{"instance_id": i, "reason": why} for i, why in res.instances_down],
        "migrations": [{"request_id": m.request_id, "source": m.source, "destination": m.destination,
                        "state": m.state, "reason": m.reason, "abort_stage": m.abort_stage,
                        "stages": m.stages, "downtime_ms": None if m.downtime_s is None
                        else round(1000 * m.downtime_s, 2)} for m in res.migrations],
        "instances": [asdict(i) for i in res.instances],
    }


def one_line(res: StressResult) -> str:
    s = summary(res)
    aborted = sum(s["migrations_aborted"].values())
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"stress {'OK' if not s['violations'] else 'FAILED'}: violations={s['violations']} "
            f"requests={s['requests_completed']}/{s['requests']} migrations={s['migrations_committed']} "
            f"committed/{aborted} aborted faults={sum(s['faults_injected'].values())} "
            f"instances_down={s['instances_down']} failovers={s['failovers']} "
            f"downtime_ms p50={fmt(s['downtime_ms_p50'])} p99={fmt(s['downtime_ms_p99'])} "
            f"seed={s['seed']} ({s['duration_s']:.0f}s)")


def write(res: StressResult, path: Path) -> None:
    """`path` (JSON) and the PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(res), indent=2, default=str))
    plot(res, path.with_suffix(".png"))


def plot(res: StressResult, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(res)
    downs = [1000 * m.downtime_s for m in res.migrations if m.committed and m.downtime_s is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(downs or [0], bins=30, color="tab:blue")
    a.set(title=f"downtime of committed migrations ({len(downs)} measured)", xlabel="ms",
          ylabel="migrations")
    steps = ("before_reserve", "precopy", "stop", "commit")
    kinds = sorted(s["faults_by_kind"])
    bottom = [0] * len(steps)
    for kind in kinds:
        counts = [sum(1 for f in res.faults if f.fired and f.kind == kind and f.step == st) for st in steps]
        b.bar(steps, counts, bottom=bottom, label=kind)
        bottom = [x + y for x, y in zip(bottom, counts)]
    b.set(title=f"faults injected by step (violations: {s['violations']})", ylabel="faults")
    if kinds:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
