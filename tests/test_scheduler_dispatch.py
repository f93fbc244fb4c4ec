"""Dispatch policies, the freeness metric and config validation over
hand-built snapshots."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from test_scheduler_factories import idle_cluster, make_cluster, make_config, make_instance, make_request

from llumigrate.errors import ConfigError, NoInstanceAvailable
from llumigrate.scheduler import DISPATCH_POLICIES, make_dispatcher
from llumigrate.scheduler.dispatch import rotate_after
from llumigrate.scheduler.load import freeness, time_to_free

HIGH = -5   # a vLLM priority: lower is more important (0 is vLLM's default)


# -- freeness ---------------------------------------------------------------------------
def test_freeness_is_spare_blocks_per_running_request():
    cfg = make_config()
    inst = make_instance("i0", make_request("a", prompt=64, output=0), make_request("b", prompt=64, output=0),
                         free=50, waiting_blocks=10)
    assert freeness(inst, cfg) == (50 - 10) / 2
    assert freeness(make_instance("i1", free=30), cfg) == 30  # idle: divided by 1, not 0


def test_freeness_is_negative_when_the_queue_cannot_start():
    assert freeness(make_instance("i0", free=5, waiting_blocks=8), make_config()) < 0


def _timed(rid: str, blocks: int, left: int, rate: float | None):
    """A running request holding `blocks` full blocks of 16, `left` tokens to go at `rate` tokens/s."""
    return replace(make_request(rid, prompt=blocks * 16, output=0, max_tokens=left), decode_tokens_per_s=rate)


def test_time_to_free_follows_requests_as_they_end_and_grow():
    # a: 4 blocks, ends in 0.5 s; b: 8 blocks, ends in 2 s. 2 free of 14.
    a, b = _timed("a", 4, 50, 100.0), _timed("b", 8, 200, 100.0)
    inst = make_instance("i0", a, b, num_blocks=14)
    assert time_to_free(inst, 2) == 0.0                     # free now
    # When a ends (0.5 s), b has grown 50 tokens into 4 blocks: 2 + 4 - 4 = 2 free.
    assert time_to_free(inst, 3) == 2.0                     # only once b ends too: 2 + 4 + 8 - 0
    assert time_to_free(inst, 2 + 4 + 8) == 2.0
    assert time_to_free(inst, 15) == float("inf")           # more than it has
    slow_growth = make_instance("i0", a, _timed("b", 8, 200, 10.0), num_blocks=14)
    assert time_to_free(slow_growth, 5) == 0.5              # b grew 5 tokens: 1 block
    # Not told: no max_tokens, or no rate measured yet (neither ends nor grows).
    unbounded = make_instance("i0", replace(a, max_tokens=None), b, num_blocks=14)
    assert time_to_free(unbounded, 12) == float("inf")
    assert time_to_free(make_instance("i0", _timed("a", 4, 50, None), b, num_blocks=14), 6) == 2.0


def test_headroom_is_reserved_only_against_normal_requests_where_high_ones_run():
    cfg = make_config(high_priority_threshold=HIGH, high_priority_headroom_blocks=20)
    hosting = make_instance("i0", make_request("vip", priority=HIGH), free=50)
    assert freeness(hosting, cfg) == 30 and freeness(hosting, cfg, 0) == 30
    assert freeness(hosting, cfg, HIGH) == 50 and freeness(hosting, cfg, HIGH - 1) == 50
    assert freeness(hosting, cfg, 3) == 30   # a larger value is less important, not more
    assert freeness(make_instance("i1", make_request("a"), free=50), cfg) == 50
    assert freeness(make_instance("i2", make_request("bg", priority=3), free=50), cfg) == 50


# -- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    ({"dispatch_policy": "random"}, ["least-load", "round-robin", "power-of-two", "flood"]),
    ({"migration_policies": {"balance", "teleport"}}, ["'teleport'", "drain", "defrag"]),
    ({"migrate_out_threshold": 5.0, "migrate_in_threshold": 5.0}, ["hysteresis"]),
    ({"max_migrations_in": -1}, ["max_migrations_in", ">= 0"]),
    ({"cooldown_s": 30.0, "no_return_s": 10.0}, ["no_return_s", "cooldown_s"]),
    ({"stale_report_s": 0}, ["stale_report_s"]),
    ({"high_priority_threshold": 1.5}, ["high_priority_threshold", "int", "lower"]),
    ({"high_priority_threshold": True}, ["high_priority_threshold", "int"]),
])
def test_config_errors_say_what_is_allowed(kw, words):
    with pytest.raises(ConfigError) as e:
        make_config(**kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_high_priority_is_at_or_below_the_threshold_as_in_vllm():
    """vLLM serves lower priority values first; its default 0 is normal here."""
    cfg = make_config()
    assert cfg.high_priority_threshold == -1
    assert [cfg.is_high(p) for p in (-10, -1, 0, 1, 10)] == [True, True, False, False, False]
    assert make_config(high_priority_threshold=0).is_high(0)
    assert not make_config(high_priority_threshold=-3).is_high(-2)


def test_config_accepts_any_iterable_of_policies():
    cfg = make_config(migration_policies=["drain"])
    assert cfg.migration_policies == frozenset({"drain"}) and cfg.enabled("drain")
    assert not cfg.enabled("balance")


# -- dispatch: choices --------------------------------------------------------------------
def test_least_load_picks_the_freest_instance():
    snap = make_cluster(make_instance("i0", free=10), make_instance("i1", free=80), make_instance("i2", free=40))
    assert make_dispatcher(make_config()).choose(snap) == "i1"


def test_least_load_counts_running_requests_and_queue():
    busy = make_instance("i0", *(make_request(f"r{n}") for n in range(4)), free=60)  # 15 per request
    queued = make_instance("i1", free=50, waiting_blocks=30)                          # 20
    assert make_dispatcher(make_config()).choose(make_cluster(busy, queued)) == "i1"


def test_high_priority_headroom_is_respected_by_dispatch():
    cfg = make_config(high_priority_threshold=HIGH, high_priority_headroom_blocks=20)
    snap = make_cluster(make_instance("i0", make_request("vip", priority=HIGH), free=40),  # 20 for normal
                        make_instance("i1", make_request("a"), free=30))
    assert make_dispatcher(cfg).choose(snap, priority=0) == "i1"
    assert make_dispatcher(cfg).choose(snap, priority=3) == "i1"
    assert make_dispatcher(cfg).choose(snap, priority=HIGH) == "i0"
    assert make_dispatcher(cfg).choose(snap, priority=HIGH - 10) == "i0"


def test_round_robin_ignores_load_and_cycles():
    snap = make_cluster(make_instance("i0", free=1), make_instance("i1", free=99), make_instance("i2", free=50))
    d = make_dispatcher(make_config(dispatch_policy="round-robin"))
    assert [d.choose(snap) for _ in range(5)] == ["i0", "i1", "i2", "i0", "i1"]


def test_round_robin_survives_membership_changes():
    d = make_dispatcher(make_config(dispatch_policy="round-robin"))
    assert d.choose(idle_cluster(3)) == "i0"
    assert d.choose(idle_cluster(3)) == "i1"
    shrunk = make_cluster(make_instance("i0"), make_instance("i2"))
    assert [d.choose(shrunk) for _ in range(3)] == ["i2", "i0", "i2"]


def test_power_of_two_prefers_the_freer_of_its_pair_and_is_seeded():
    snap = make_cluster(make_instance("i0", free=1), make_instance("i1", free=99))
    d = make_dispatcher(make_config(dispatch_policy="power-of-two"))
    assert {d.choose(snap) for _ in range(20)} == {"i1"}  # two instances: always both sampled
    many = idle_cluster(6)
    picks = [make_dispatcher(make_config(dispatch_policy="power-of-two", seed=7)).choose(many)
             for _ in range(2)]
    assert picks[0] == picks[1]


def test_power_of_two_never_picks_the_most_loaded_of_many():
    snap = make_cluster(*(make_instance(f"i{k}", free=10 * (k + 1)) for k in range(5)))
    d = make_dispatcher(make_config(dispatch_policy="power-of-two", seed=3))
    assert "i0" not in {d.choose(snap) for _ in range(200)}


def test_flood_sends_everything_to_one_instance():
    snap = make_cluster(make_instance("i0", free=1), make_instance("i1", free=99))
    d = make_dispatcher(make_config(dispatch_policy="flood"))
    assert {d.choose(snap) for _ in range(10)} == {"i0"}


# -- dispatch: eligibility ----------------------------------------------------------------
@pytest.mark.parametrize("policy", DISPATCH_POLICIES)
def test_down_and_draining_instances_get_nothing(policy):
    snap = make_cluster(make_instance("i0", free=100, up=False), make_instance("i1", free=100, draining=True),
                        make_instance("i2", free=1))
    d = make_dispatcher(make_config(dispatch_policy=policy))
    assert {d.choose(snap) for _ in range(20)} == {"i2"}


@pytest.mark.parametrize("policy", DISPATCH_POLICIES)
def test_no_eligible_instance_raises_a_typed_error_saying_why(policy):
    snap = make_cluster(make_instance("i0", up=False), make_instance("i1", draining=True))
    with pytest.raises(NoInstanceAvailable, match="i0 down, i1 draining"):
        make_dispatcher(make_config(dispatch_policy=policy)).choose(snap)
    with pytest.raises(NoInstanceAvailable, match="none registered"):
        make_dispatcher(make_config(dispatch_policy=policy)).choose(make_cluster())


def test_stale_reports_are_excluded_when_configured():
    snap = make_cluster(make_instance("i0", free=100, reported_at=0.0), make_instance("i1", free=1))
    assert make_dispatcher(make_config()).choose(snap) == "i0"
    assert make_dispatcher(make_config(stale_report_s=5.0)).choose(snap) == "i1"


# -- dispatch: ties never starve an instance ----------------------------------------------
@pytest.mark.parametrize("policy", ["least-load", "round-robin"])
def test_all_idle_consecutive_dispatches_visit_every_instance(policy):
    snap, d = idle_cluster(4), make_dispatcher(make_config(dispatch_policy=policy))
    picks = [d.choose(snap) for _ in range(12)]  # the same stale snapshot every time
    assert picks[:4] == ["i0", "i1", "i2", "i3"] and Counter(picks) == {f"i{k}": 3 for k in range(4)}


def test_all_idle_power_of_two_starves_no_instance():
    snap, d = idle_cluster(5), make_dispatcher(make_config(dispatch_policy="power-of-two"))
    counts = Counter(d.choose(snap) for _ in range(500))
    assert set(counts) == {f"i{k}" for k in range(5)} and min(counts.values()) > 50


def test_least_load_rotation_only_among_the_tied():
    snap = make_cluster(make_instance("i0", free=50), make_instance("i1", free=90), make_instance("i2", free=90))
    d = make_dispatcher(make_config())
    assert [d.choose(snap) for _ in range(4)] == ["i1", "i2", "i1", "i2"]


def test_dispatches_applied_to_the_snapshot_spread_a_burst():
    """Between two reports the shell applies each dispatch; near-equal instances
    then share a burst instead of the freest taking all of it."""
    snap, d = make_cluster(make_instance("i0", free=100), make_instance("i1", free=99)), make_dispatcher(make_config())
    picks = []
    for n in range(10):
        picks.append(d.choose(snap))
        snap = snap.with_dispatch(picks[-1], make_request(f"r{n}", prompt=64, output=0))
    assert Counter(picks) == {"i0": 5, "i1": 5}


def test_rotate_after_wraps():
    assert rotate_after(["a", "b", "c"], None) == "a"
    assert rotate_after(["a", "b", "c"], "b") == "c"
    assert rotate_after(["a", "b", "c"], "c") == "a"
    assert rotate_after(["a", "c"], "b") == "c"


def test_dispatch_does_not_modify_the_snapshot():
    snap = idle_cluster(2)
    before = replace(snap)
    make_dispatcher(make_config()).choose(snap)
    assert snap == before
