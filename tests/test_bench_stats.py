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
