"""bench_serving's statistics (pure): the bootstrap interval of its p99 TTFT ratio, and
what it reads from /metrics."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

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


def test_migration_summary_floors_are_one_ordinary_token_interval():
    import bench_migration

    def row(ctx, mode, downtime, step=None):
        return {"context": ctx, "mode": mode, "state": "done", "downtime_ms": downtime,
                "step_ms_before": step, "step_ms_during_precopy": step}
    rows = [row(256, "precopy", 36.0, 20.0), row(8192, "precopy", 80.0, 55.0),
            row(256, "stop_and_copy", 35.0), row(8192, "stop_and_copy", 140.0),
            row(256, "recompute", 280.0), row(8192, "recompute", 13000.0)]
    s = bench_migration._summary(rows, [256, 8192], 1024.0)
    assert s["downtime_ratio_8k_vs_256"] == 80.0 / 36.0
    # A migration costing nothing beyond one step would still see these.
    assert s["floor_downtime_ratio_8k_vs_256"] == 55.0 / 20.0
    assert s["floor_downtime_vs_stop_and_copy_8k"] == 55.0 / 140.0
    assert s["downtime_excess_ms_precopy"] == {256: 16.0, 8192: 25.0}


def test_overhead_ratios_are_of_medians_over_rounds_and_named_per_shape():
    import bench_overhead

    def row(server, tput, tpot, ttft):
        return {"server": server, **{k: 1.0 for k in bench_overhead.KEYS},
                "output_throughput": tput, "median_tpot_ms": tpot, "median_ttft_ms": ttft}
    rows = [row("llumigrate", t, 20.0 + k, 100.0) for k, t in enumerate([450.0, 600.0, 620.0])]
    rows += [row("vllm", t, 20.0, 200.0) for t in (600.0, 500.0, 700.0)]
    llum, vllm = bench_overhead.medians(rows, "llumigrate"), bench_overhead.medians(rows, "vllm")
    s = bench_overhead.ratios(llum, vllm, bench_overhead.key_prefix("tiny"))
    assert s == {"tiny_throughput_ratio_vs_vllm": 600.0 / 600.0, "tiny_p50_tpot_ratio_vs_vllm": 21.0 / 20.0,
                 "tiny_p50_ttft_ratio_vs_vllm": 0.5}
    wide = bench_overhead.ratios(llum, vllm, bench_overhead.key_prefix("wide"))
    assert set(wide) == {"throughput_ratio_vs_vllm", "p50_tpot_ratio_vs_vllm", "p50_ttft_ratio_vs_vllm"}


def test_loop_lag_and_migrations_are_read_from_the_metrics_text():
    """The scrape of a real registry: what the serve process exposes."""
    from llumigrate.serve.metrics import Metrics
    m = Metrics()
    for lag in (0.001, 0.02, 0.15, 0.3, 0.7):
        m.observe_loop_lag(lag)
    m.observe_migration("committed", "defrag")
    m.observe_migration("committed", "defrag")
    m.observe_migration("aborted", "balance")
    text = m.render()[0].decode()
    lag = bench_serving.loop_lag(text)
    assert lag["rounds"] == 5 and abs(lag["late_s"] - 1.171) < 1e-9
    assert lag["over_0.1s"] == 3 and lag["over_0.25s"] == 2
    assert bench_serving.committed_migrations(text) == {"defrag": 2}
    assert bench_serving.loop_lag("") == {"rounds": 0.0, "late_s": 0.0, "over_0.1s": 0.0, "over_0.25s": 0.0}


def test_stranded_queue_counts_only_queues_that_persist():
    def sample(t, w0, w1):
        return {"t": t, "instances": {"i0": [1, w0, 4], "i1": [1, w1, 30]}}
    timeline = [sample(0.0, 0, 0),
                sample(0.1, 1, 0), sample(0.2, 0, 0),                     # one step's wait: not counted
                sample(0.3, 2, 0), sample(0.4, 2, 0), sample(0.5, 1, 0),
                sample(0.6, 1, 0), sample(0.7, 0, 0),                     # 0.4 s stranded
                sample(0.8, 1, 1), sample(0.9, 0, 0),                     # both queued: not stranded
                sample(1.0, 0, 3), sample(1.2, 0, 3), sample(1.5, 0, 3)]  # to the end: 0.5 s
    assert bench_serving.stranded_queue_s(timeline) == pytest.approx(0.9)
    assert bench_serving.stranded_queue_s(timeline, min_s=0.0) == pytest.approx(1.0)


def test_round_geomean_weighs_each_round_once():
    geo, (lo, hi) = bench_serving.round_geomean([0.5, 0.5, 0.5, 2.0], samples=500)
    assert geo == pytest.approx((0.5 ** 3 * 2.0) ** 0.25)
    assert lo <= geo <= hi and lo >= 0.5 and hi <= 2.0
    steady, _ = bench_serving.round_geomean([0.8] * 6)
    assert steady == pytest.approx(0.8)
    assert bench_serving.round_geomean([0.8] * 6, samples=200)[1] == [0.8, 0.8]
    assert bench_serving.round_geomean([]) is None
