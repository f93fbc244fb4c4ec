"""bench_serving's statistics (pure): the bootstrap interval of its p99 TTFT ratio."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serving  # noqa: E402


def _run(label: str, config: str, ttfts: list[float]) -> dict:
    return {"label": label, "config": config,
            "results": [SimpleNamespace(ttft=t, error=None) for t in ttfts]}


def test_ratio_interval_brackets_a_real_effect_and_widens_with_noise():
    base = [0.05 + 0.01 * k for k in range(100)]
    steady = [_run(f"r{k}", c, [t * (0.5 if c == "migration" else 1.0) for t in base])
              for k in range(4) for c in ("migration", "no_migration")]
    lo, hi = bench_serving.ratio_interval(steady, samples=300)
    assert lo <= 0.5 <= hi and hi < 1.0
    # The same median effect, but rounds that disagree: the interval must widen.
    factors = [0.2, 1.6, 0.3, 1.4]
    noisy = [_run(f"r{k}", c, [t * (factors[k] if c == "migration" else 1.0) for t in base])
             for k in range(4) for c in ("migration", "no_migration")]
    nlo, nhi = bench_serving.ratio_interval(noisy, samples=300)
    assert nhi - nlo > 2 * (hi - lo) and nlo < 1.0 < nhi


def test_ratio_interval_needs_rounds_with_both_configurations():
    assert bench_serving.ratio_interval([_run("r1", "migration", [0.1, 0.2])]) is None


def test_churn_summary_counts_exact_requests_per_round_and_leaks():
    import bench_churn

    def run(rnd: int, config: str, tokens: list[list[int]], tps: float, downtime: list[float]) -> dict:
        return {"round": rnd, "config": config, "tokens": tokens, "decode_tokens_per_s": tps,
                "itl_p50_ms": 10.0, "itl_p99_ms": 20.0 if config == "none" else 30.0,
                "migrations_committed": len(downtime), "migrations_aborted": {"destination full": 1}
                if config == "churn" else {}, "downtime_ms": downtime}
    runs = [run(0, "none", [[1, 2], [3, 4]], 100.0, []), run(0, "churn", [[1, 2], [3, 5]], 90.0, [30.0, 50.0]),
            run(1, "churn", [[7], [8]], 80.0, [40.0]), run(1, "none", [[7], [8]], 100.0, [])]
    s = bench_churn._summary(runs, leaks=[0, 0, 3, 0])
    assert (s["exact_requests"], s["requests"]) == (3, 4)   # round 0's second request differs
    assert s["decode_throughput_ratio_churn_vs_none"] == 0.85 and s["itl_p99_ratio_churn_vs_none"] == 1.5
    assert s["migrations_committed"] == 3 and s["migrations_aborted"] == 2 and s["leaked_blocks"] == 3
    assert s["downtime_p50_ms"] == 40.0
