"""The migration cost model, the migration history, and the invariants of
`plan_migrations` over many random snapshots."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from test_scheduler_factories import NOW, make_cluster, make_config, make_instance, make_request

from llumigrate.errors import ConfigError
from llumigrate.scheduler import MigrationCostModel, MigrationHistory, SchedulerConfig, plan_migrations
from llumigrate.scheduler.load import accepts_work


# -- cost model ------------------------------------------------------------------------
def test_prior_gives_sane_estimates_before_any_migration():
    m = MigrationCostModel()
    assert m.estimate(0) == pytest.approx(m.prior_fixed_s)
    assert m.estimate(2048) == pytest.approx(m.prior_fixed_s + m.prior_per_token_s * 2048)


def test_fit_follows_the_measurements():
    m = MigrationCostModel()
    for n in range(100):
        tokens = 256 * (n % 16 + 1)
        m = m.observe(tokens, 0.2 + 1e-4 * tokens)
    fixed, per_token = m.coefficients()
    # the prior (0.05 s fixed) still weighs one observation against ~50
    assert fixed == pytest.approx(0.2, rel=0.1) and per_token == pytest.approx(1e-4, rel=0.05)
    assert m.num_observed == 100


def test_estimates_never_negative_nor_decreasing():
    m = MigrationCostModel()
    for tokens, seconds in ((100, 5.0), (5000, 0.01), (9000, 0.0)):  # noisy: longer was faster
        m = m.observe(tokens, seconds)
    fixed, per_token = m.coefficients()
    assert fixed >= 0 and per_token >= 0
    assert [m.estimate(n) for n in (0, 10, 1000)] == sorted(m.estimate(n) for n in (0, 10, 1000))


def test_old_measurements_fade():
    m = MigrationCostModel(decay=0.5, prior_weight=0.01)
    for _ in range(20):
        m = m.observe(1000, 10.0)
    for _ in range(20):
        m = m.observe(1000, 1.0)
    assert m.estimate(1000) == pytest.approx(1.0, rel=0.05)


def test_cost_orders_requests_by_context_length():
    m = MigrationCostModel().observe(4096, 0.5)
    short, long = make_request("s", prompt=100, output=5), make_request("l", prompt=1000, output=5)
    assert m.cost(short) < m.cost(long)


@pytest.mark.parametrize("kw", [{"decay": 0}, {"decay": 1.5}, {"prior_weight": 0}, {"prior_fixed_s": -1}])
def test_cost_model_rejects_bad_priors(kw):
    with pytest.raises(ConfigError):
        MigrationCostModel(**kw)


# -- history -----------------------------------------------------------------------------
def test_history_cooldown_and_no_return():
    h = MigrationHistory().record("r", "i0", "i1", at=100.0)
    assert h.cooling("r", 105.0, 10.0) and not h.cooling("r", 111.0, 10.0)
    assert h.returning("r", "i0", 150.0, 60.0) and not h.returning("r", "i2", 150.0, 60.0)
    assert not h.returning("r", "i0", 161.0, 60.0)
    assert not h.cooling("other", 100.0, 10.0)


def test_history_is_immutable():
    h0 = MigrationHistory()
    h1 = h0.record("r", "i0", "i1", at=1.0)
    h2 = h1.record("s", "i1", "i0", at=50.0)
    assert "r" not in h0.records and set(h2.records) == {"r", "s"}
    assert set(h2.forget("r").records) == {"s"} and set(h2.prune(60.0, 30.0).records) == {"s"}
    with pytest.raises(TypeError):
        h2.records["x"] = h2.records["r"]  # type: ignore[index]


# -- plan_migrations invariants over random clusters ----------------------------------------
def random_cluster(rng: random.Random):
    instances = []
    for k in range(rng.randint(1, 5)):
        reqs = [make_request(f"i{k}r{n}", prompt=rng.randint(1, 600), output=rng.randint(0, 200),
                             priority=rng.choice([0, 0, 3, -1, -2]),
                             max_tokens=rng.choice([None, 210, 400]), migrating=rng.random() < 0.1,
                             migratable=rng.random() < 0.9)
                for n in range(rng.randint(0, 12))]
        used = sum(r.blocks(16) for r in reqs)
        num_blocks = used + rng.randint(0, 60)
        waiting = rng.choice([0, 0, rng.randint(1, 40)])
        instances.append(make_instance(f"i{k}", *reqs, num_blocks=num_blocks, waiting_blocks=waiting,
                                       head_blocks=min(waiting, rng.randint(1, 20)) if waiting else 0,
                                       up=rng.random() < 0.9, draining=rng.random() < 0.15,
                                       migrations_in=rng.choice([0, 0, 1]),
                                       migrations_out=rng.choice([0, 0, 1])))
    return make_cluster(*instances)


def random_history(rng: random.Random, snap) -> MigrationHistory:
    h = MigrationHistory()
    ids = [i.instance_id for i in snap.instances]
    for r in snap.requests():
        if rng.random() < 0.2:
            h = h.record(r.request_id, rng.choice(ids), r.instance_id, NOW - rng.uniform(0, 100))
    return h


def check_invariants(snap, cfg: SchedulerConfig, hist: MigrationHistory, plans) -> None:
    assert len({p.request_id for p in plans}) == len(plans), "one plan per request"
    outs = Counter(p.source for p in plans)
    ins = Counter(p.destination for p in plans)
    for p in plans:
        src, dst, req = snap[p.source], snap[p.destination], snap.request(p.request_id)
        assert p.source != p.destination and req.instance_id == p.source
        assert accepts_work(dst, cfg, snap.now) and src.up
        assert req.status == "running" and req.migratable and not req.migrating
        if p.reason != "drain":
            assert not hist.cooling(req.request_id, snap.now, cfg.cooldown_s)
            assert not hist.returning(req.request_id, p.destination, snap.now, cfg.no_return_s)
            assert not src.draining
        if p.reason == "priority":
            assert not cfg.is_high(req.priority)
    for iid in outs:  # drain: the most important (lowest vLLM priority value) first
        drained = [snap.request(p.request_id).priority for p in plans if p.source == iid and p.reason == "drain"]
        assert drained == sorted(drained), drained
    for iid, n in outs.items():
        assert snap[iid].migrations_out + n <= cfg.max_migrations_out
    for iid, n in ins.items():
        assert snap[iid].migrations_in + n <= cfg.max_migrations_in


@pytest.mark.parametrize("seed", range(300))
def test_plan_invariants_hold_on_random_clusters(seed):
    rng = random.Random(seed)
    snap = random_cluster(rng)
    cfg = make_config(max_migrations_out=rng.randint(1, 3), max_migrations_in=rng.randint(1, 3),
                      high_priority_threshold=-2, high_priority_headroom_blocks=rng.choice([0, 8]))
    hist = random_history(rng, snap)
    plans = plan_migrations(snap, cfg, hist)
    check_invariants(snap, cfg, hist, plans)
    assert plans == plan_migrations(snap, cfg, hist), "deterministic"


def test_random_clusters_do_plan_migrations():
    """The invariant test is not vacuous: every policy plans in some of them."""
    reasons: Counter[str] = Counter()
    for seed in range(300):
        rng = random.Random(seed)
        snap = random_cluster(rng)
        cfg = make_config(max_migrations_out=3, max_migrations_in=3, high_priority_threshold=-2)
        reasons.update(p.reason for p in plan_migrations(snap, cfg, random_history(rng, snap)))
    assert set(reasons) == {"balance", "defrag", "priority", "drain"}, reasons
