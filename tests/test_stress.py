"""One bounded real-engine stress run (its own cluster: it kills instances).

Four instances, most migrations get a fault until every fault kind was
injected at least once (kills last: they take three of the four instances),
then the invariants must all hold. The harness is checked too: a block
leaked on purpose on a real engine after the run's checks, and a token
duplicated in the run's recorded facts, must both be reported.
"""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from llumigrate.stress.collect import plant_duplicate
from llumigrate.stress.config import FAULT_KINDS, StressConfig
from llumigrate.stress.invariants import check_all

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def stress_run(tiny_model, tmp_path_factory):
    from llumigrate.cli.stress import stress
    cfg = StressConfig(num_instances=4, num_requests=10, seed=11, concurrency=5, fault_rate=0.6,
                       require_all_faults=True, respawn=False, min_survivors=1, stall_s=1.0,
                       max_duration_s=240, progress=False, self_test=True, model=tiny_model)
    path = tmp_path_factory.mktemp("stress") / "stress.json"
    return asyncio.run(stress(cfg, path)), path


def test_every_fault_kind_injected_and_no_violation(stress_run):
    res, path = stress_run
    assert [v for v in res.violations] == []
    assert {f.kind for f in res.faults if f.fired} == set(FAULT_KINDS)
    summary = json.loads(path.read_text())["summary"]
    assert summary["violations"] == 0
    assert set(summary["faults_injected"]) <= {"before_reserve", "precopy", "stop", "commit"}
    assert summary["requests_completed"] == summary["requests"] >= 10
    # Every lost instance is one a kill fault hit (no collateral loss), and the
    # kills are seen. Two kills may land on one instance, so count distinct ones.
    killed = {r.source if r.kind.startswith("kill_source") else r.destination
              for r in res.faults if r.fired and r.kind.startswith("kill")}
    downed = {iid for iid, _ in res.instances_down}
    assert downed and downed <= killed, (downed, killed)
    assert summary["instances_down"] == len(res.instances_down)
    assert summary["migrations_committed"] > 0
    stopped_by = summary["migrations_stopped_by"]
    assert sum(stopped_by.values()) == summary["migrations_committed"] and set(stopped_by) <= {"step", "abort"}
    assert path.with_suffix(".png").exists()


def test_planted_leaked_block_is_caught_on_a_real_engine(stress_run):
    res, _ = stress_run
    assert [v.check for v in res.self_test] == ["free_blocks"]
    assert "self-test-leak" in res.self_test[0].detail


def test_planted_duplicate_token_is_caught(stress_run):
    res, _ = stress_run
    facts = copy.deepcopy(res.requests)
    assert plant_duplicate(facts) is not None
    found = [v for v in check_all(facts, res.instances, failover=True) if v not in res.violations]
    assert found and {v.check for v in found} <= {"stream_exact", "reference"}
