"""Migration policies over hand-built snapshots: balance (thresholds,
hysteresis, anti-ping-pong), defrag, priority headroom, drain, and the
per-instance concurrency limits."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_scheduler_factories import NOW, make_cluster, make_config, make_instance, make_request

from llumigrate.scheduler import MigrationCostModel, MigrationHistory, apply_plan, plan_migrations
from llumigrate.scheduler.plan import PlanContext
from llumigrate.scheduler.policies import balance, defrag, drain, make_headroom

HIGH = -5   # a vLLM priority: lower is more important (0 is vLLM's default)
WIDE = {"max_migrations_out": 4, "max_migrations_in": 4}


def ctx(history: MigrationHistory | None = None, cost: MigrationCostModel | None = None, **kw) -> PlanContext:
    return PlanContext(make_config(**kw), history or MigrationHistory(), cost or MigrationCostModel())


def moves(plans) -> list[tuple[str, str, str]]:
    return [(p.request_id, p.source, p.destination) for p in plans]


def overloaded(iid: str = "i0", n: int = 10, **kw):
    """n running requests of 8-9 blocks (r{k}: 128 + k tokens) and a queue of
    4 blocks: freeness (100 - 80..90 - 4) / n, below 1."""
    reqs = [make_request(f"{iid}r{k}", prompt=128, output=k) for k in range(n)]
    return make_instance(iid, *reqs, waiting_blocks=4, **kw)


# -- balance ---------------------------------------------------------------------------
def test_balance_moves_the_cheapest_request_until_the_source_is_fixed():
    plans = balance(make_cluster(overloaded(), make_instance("i1")), ctx(**WIDE))
    assert moves(plans) == [("i0r0", "i0", "i1")]  # the shortest; one move lifts i0 over 1.0
    assert plans[0].reason == "balance" and plans[0].est_cost_s > 0


@pytest.mark.parametrize("i0_free, i1_free", [(15, 100), (5, 50)])
def test_balance_plans_nothing_within_the_hysteresis_gap(i0_free, i1_free):
    # i0 is a source only below 1.0, i1 a destination only above 4.0
    i0 = make_instance("i0", *(make_request(f"a{k}") for k in range(10)), free=i0_free)  # 1.5 / 0.5
    i1 = make_instance("i1", *(make_request(f"b{k}") for k in range(13)), free=i1_free)  # 7.7 / 3.8
    assert balance(make_cluster(i0, i1), ctx(**WIDE)) == []


def test_balanced_cluster_plans_nothing():
    i0 = make_instance("i0", *(make_request(f"a{k}") for k in range(10)), free=15)  # 1.5
    i1 = make_instance("i1", *(make_request(f"b{k}") for k in range(10)), free=38)  # 3.8
    assert plan_migrations(make_cluster(i0, i1), make_config(**WIDE)) == []


def test_balance_never_inverts_the_imbalance():
    big = make_request("big", prompt=90 * 16, output=0)  # 90 blocks
    i0 = make_instance("i0", big, waiting_blocks=10)      # freeness 0
    i1 = make_instance("i1", make_request("s", prompt=64, output=0), free=95)
    # moving `big` would leave i1 at 2.5 and i0 at 90: refused
    assert balance(make_cluster(i0, i1), ctx(**WIDE)) == []


def test_balance_pairs_most_loaded_with_freest_up_to_the_limit():
    snap = make_cluster(overloaded("i0", n=10), overloaded("i1", n=11), make_instance("i2", free=60),
                        make_instance("i3", free=90))
    assert {(p.source, p.destination) for p in balance(snap, ctx())} == {("i1", "i3"), ("i0", "i2")}
    assert {(p.source, p.destination) for p in balance(snap, ctx(max_balance_pairs=1))} == {("i1", "i3")}


def test_balance_moves_low_priority_before_high():
    vip = make_request("vip", prompt=128, output=0, priority=HIGH)   # cheapest, but high priority
    reqs = [make_request(f"n{k}", prompt=128, output=5 + k) for k in range(9)]
    snap = make_cluster(make_instance("i0", vip, *reqs, waiting_blocks=4), make_instance("i1"))
    assert moves(balance(snap, ctx(high_priority_threshold=HIGH)))[0][0] == "n0"


def test_balance_moves_the_largest_priority_value_first():
    """vLLM serves lower priority values first: a request sent with priority
    3 is less important than one at the default 0, and moves first though it
    costs more."""
    bg = make_request("bg", prompt=128, output=14, priority=3)
    reqs = [make_request(f"n{k}", prompt=128, output=5 + k) for k in range(9)]
    snap = make_cluster(make_instance("i0", bg, *reqs, waiting_blocks=4), make_instance("i1"))
    assert moves(balance(snap, ctx()))[0][0] == "bg"


def test_no_ping_pong_after_a_migration():
    """i0 -> i1 just happened for r; now i1 looks overloaded and i0 free."""
    r = make_request("r", prompt=128, output=0)
    others = [make_request(f"o{k}", prompt=128, output=1 + k) for k in range(9)]
    snap = make_cluster(make_instance("i0"), make_instance("i1", r, *others, waiting_blocks=4))
    hist = MigrationHistory().record("r", "i0", "i1", at=NOW - 1)
    cooling = balance(snap, ctx(hist, cooldown_s=10, no_return_s=60))
    assert "r" not in [p.request_id for p in cooling] and moves(cooling)[0][0] == "o0"
    only_r = make_cluster(make_instance("i0"), make_instance("i1", r, waiting_blocks=95))
    for at in (NOW - 1, NOW - 30):  # cooling down, then past cooldown but it would go straight back
        assert balance(only_r, ctx(MigrationHistory().record("r", "i0", "i1", at=at))) == []
    assert moves(balance(only_r, ctx(MigrationHistory().record("r", "i0", "i1", at=NOW - 61)))) == \
        [("r", "i1", "i0")]


def test_balance_after_its_own_plan_plans_nothing_more():
    snap = make_cluster(overloaded(), make_instance("i1"))
    cfg = make_config(**WIDE)
    plans = plan_migrations(snap, cfg)
    after = apply_plan(snap, plans[0])
    hist = MigrationHistory().record(plans[0].request_id, "i0", "i1", NOW)
    assert plan_migrations(after, cfg, hist) == []


# -- requests that are never moved -------------------------------------------------------
@pytest.mark.parametrize("flag", [{"migrating": True}, {"migratable": False}, {"status": "waiting"},
                                  {"max_tokens": 20}])  # 20 - 16 generated: 4 left < 8
def test_unmovable_requests_are_skipped(flag):
    reqs = [make_request(f"r{k}", prompt=128, output=16, **flag) for k in range(10)]
    snap = make_cluster(make_instance("i0", *reqs, free=5, num_running=10), make_instance("i1"))
    assert plan_migrations(snap, make_config(**WIDE)) == []


@pytest.mark.parametrize("left, rate, margin, moved", [
    (30, 100.0, 2.0, False),   # ~20 tokens while it migrates: 30 < 2 x 20, it likely ends first
    (50, 100.0, 2.0, True),    # 50 >= 40: worth the copy
    (30, None, 2.0, True),     # rate not measured yet: only min_remaining_tokens (8) applies
    (30, 100.0, 0.0, True),    # margin 0: only min_remaining_tokens
])
def test_a_request_that_would_finish_while_it_migrates_is_not_moved(left, rate, margin, moved):
    """The cost model puts a migration at 0.2 s; at 100 tokens/s a request
    generates ~20 tokens meanwhile. With fewer than `end_margin` times that
    left, it would likely finish on its source before the stop."""
    cost = MigrationCostModel(prior_fixed_s=0.2, prior_per_token_s=0.0)
    reqs = [replace(make_request(f"r{k}", prompt=128, output=16, max_tokens=16 + left),
                    decode_tokens_per_s=rate) for k in range(10)]
    snap = make_cluster(make_instance("i0", *reqs, free=5, num_running=10), make_instance("i1"))
    plans = plan_migrations(snap, make_config(end_margin=margin, **WIDE), cost=cost)
    assert bool(plans) == moved


# -- concurrency limits ---------------------------------------------------------------------
def test_source_at_its_limit_sends_nothing():
    snap = make_cluster(overloaded(migrations_out=1), make_instance("i1"))
    assert plan_migrations(snap, make_config()) == []
    assert len(plan_migrations(snap, make_config(max_migrations_out=2))) == 1


def test_destination_at_its_limit_receives_nothing():
    snap = make_cluster(overloaded(), make_instance("i1", migrations_in=1), make_instance("i2", free=50))
    assert {p.destination for p in plan_migrations(snap, make_config())} == {"i2"}


def test_limits_hold_across_policies():
    """Drain takes i2's only incoming slot; balance then has no destination."""
    draining = make_instance("i0", make_request("d"), draining=True)
    snap = make_cluster(draining, overloaded("i1"), make_instance("i2"))
    plans = plan_migrations(snap, make_config())
    assert moves(plans) == [("d", "i0", "i2")] and plans[0].reason == "drain"


# -- defrag ----------------------------------------------------------------------------------
def blocked(*reqs, head: int = 12, free: int | None = None):
    """i0 with 30 blocks whose head-of-line request needs `head` blocks."""
    return make_instance("i0", *reqs, num_blocks=30, free=free, waiting_blocks=head)


def test_defrag_frees_room_for_the_head_of_line_request():
    a, b, c = (make_request(x, prompt=n * 16, output=0, max_tokens=16) for x, n in (("a", 2), ("b", 10), ("c", 14)))
    # i0: 4 free, head needs 12; i1 and i2 have 11 free each: no instance can take the head.
    # b (10 blocks, then 16 more tokens: 11) fits i1 with its growth.
    snap = make_cluster(blocked(a, b, c), make_instance("i1", num_blocks=11), make_instance("i2", num_blocks=11))
    plans = defrag(snap, ctx(**WIDE))
    assert moves(plans) == [("b", "i0", "i1")] and plans[0].reason == "defrag"


@pytest.mark.parametrize("rate, moved", [(100.0, False), (10.0, True), (None, True)])
def test_defrag_makes_no_room_that_the_instance_frees_sooner_itself(rate, moved):
    """Moving b would take 0.5 s (the cost model); c, 14 blocks with 10
    tokens to go, frees the head's room itself in 0.1 s at 100 tokens/s:
    the head starts sooner without the move. At 10 tokens/s (1 s), or with
    c's rate not measured yet, b moves as before."""
    a, b = (make_request(x, prompt=n * 16, output=0, max_tokens=16) for x, n in (("a", 2), ("b", 10)))
    c = replace(make_request("c", prompt=14 * 16, output=0, max_tokens=10), decode_tokens_per_s=rate)
    snap = make_cluster(blocked(a, b, c), make_instance("i1", num_blocks=11), make_instance("i2", num_blocks=11))
    plans = defrag(snap, ctx(cost=MigrationCostModel(prior_fixed_s=0.5, prior_per_token_s=0.0), **WIDE))
    assert moves(plans) == ([("b", "i0", "i1")] if moved else [])


def test_moves_of_running_requests_trade_no_room_for_preemptions():
    """Balance moves a running request only if the move saves preemptions:
    it relieves more growth shortfall (blocks the requests lack to grow
    `growth_horizon_tokens`) at the source than it adds at the destination.
    Making room moves one only if it adds no more than it relieves."""
    # i0 is below the threshold (18 spare for 21 running) but its spare covers
    # the growth of all of it: 20 short requests that end within their block,
    # and m (8 blocks) that grows 16 more. A move would save nothing.
    short = [make_request(f"s{k}", prompt=7, output=0, max_tokens=9) for k in range(20)]
    m = make_request("m", prompt=128, output=0, max_tokens=256)
    calm = make_instance("i0", *short, m, num_blocks=46)                       # freeness 18/21
    assert balance(make_cluster(calm, make_instance("i1", num_blocks=60)), ctx(**WIDE)) == []
    # Proactive balancing (the knob at 0) evens out freeness with moves that add nothing.
    assert balance(make_cluster(calm, make_instance("i1", num_blocks=60)),
                   ctx(balance_min_relief_blocks=0, **WIDE))
    # i0 must preempt: a and b grow 16 blocks each and its queue claims 20 of 14 free.
    a, b = (make_request(x, prompt=128, output=0, max_tokens=256) for x in "ab")
    src = make_instance("i0", a, b, num_blocks=30, waiting_blocks=20)
    roomy = make_instance("i1", make_request("r", prompt=64, output=0), num_blocks=60)
    assert moves(balance(make_cluster(src, roomy), ctx(**WIDE))) == [("a", "i0", "i1")]
    # i1's runner (no max_tokens) grows 16 blocks of its 16 free: a's growth
    # there would only move the shortfall from i0 to i1.
    tight = make_instance("i1", make_request("r", prompt=64, output=0), num_blocks=20)
    assert balance(make_cluster(src, tight), ctx(**WIDE)) == []
    # A blocked head's instance must preempt anyway: sending b where it can
    # grow only partly still relieves more than it adds.
    a, b, c = (make_request(x, prompt=n * 16, output=0, max_tokens=500) for x, n in (("a", 2), ("b", 10), ("c", 14)))
    snap = make_cluster(blocked(a, b, c), make_instance("i1", num_blocks=20), make_instance("i2", num_blocks=20))
    assert moves(defrag(snap, ctx(**WIDE))) == [("b", "i0", "i1")]


def test_defrag_uses_several_moves_when_no_single_one_is_enough():
    reqs = [make_request(f"r{k}", prompt=4 * 16, output=0) for k in range(6)]   # 4 blocks each
    snap = make_cluster(blocked(*reqs, head=12), make_instance("i1", num_blocks=40), make_instance("i2", num_blocks=40))
    plans = defrag(snap, ctx(**WIDE))
    assert len(plans) == 2 and {p.source for p in plans} == {"i0"}  # 6 free + 4 + 4 >= 12
    assert len(defrag(snap, ctx())) == 1  # the concurrency limit: the rest next round


def test_defrag_plans_nothing_when_the_cluster_has_no_room():
    reqs = [make_request(f"r{k}", prompt=4 * 16, output=0) for k in range(6)]
    snap = make_cluster(blocked(*reqs, head=20), make_instance("i1", num_blocks=5))
    assert defrag(snap, ctx(**WIDE)) == []


def test_defrag_does_not_block_the_destination_queue():
    b = make_request("b", prompt=10 * 16, output=0)
    busy = make_instance("i1", num_blocks=20, waiting_blocks=12)  # 20 free, 12 claimed by its queue
    assert defrag(make_cluster(blocked(b, free=4), busy), ctx()) == []


def _queued(rid: str, blocks: int, **kw):
    return make_request(rid, prompt=blocks * 16, output=0, status="waiting", **kw)


def test_defrag_redispatches_a_blocked_head_that_can_start_elsewhere():
    """The head of i0's queue cannot start there, i1 could start it now: it
    moves itself (no KV to copy) rather than running requests making room."""
    head, nxt = _queued("h", 12), _queued("n", 3)
    runner = make_request("b", prompt=10 * 16, output=0)
    i0 = replace(blocked(runner, head, nxt, head=12, free=4), head_waiting_id="h", waiting_demand_blocks=15)
    plans = defrag(make_cluster(i0, make_instance("i1", num_blocks=40)), ctx(**WIDE))
    assert moves(plans) == [("h", "i0", "i1")] and plans[0].waiting and plans[0].est_cost_s == 0
    after = apply_plan(make_cluster(i0, make_instance("i1", num_blocks=40)), plans[0])
    assert after["i0"].head_waiting_id == "n" and after["i0"].head_waiting_blocks == 3
    assert after["i0"].waiting_demand_blocks == 3 and after["i1"].waiting_demand_blocks == 12


def test_defrag_redispatches_a_preempted_head():
    """A preempted request heads its queue again with its whole context to
    recompute; where another instance can start it now, it moves there."""
    head = make_request("p", prompt=8 * 16, output=4 * 16, status="waiting")   # 12 blocks
    i0 = replace(blocked(head, head=12, free=4), head_waiting_id="p")
    plans = defrag(make_cluster(i0, make_instance("i1", num_blocks=40)), ctx(**WIDE))
    assert moves(plans) == [("p", "i0", "i1")] and plans[0].waiting


def test_defrag_redispatches_only_where_the_running_requests_keep_growth_room():
    """i1 has the blocks to start the head, but its running request and the
    head would outgrow them within the growth horizon: vLLM would have to
    preempt there, so the head stays queued, unless the horizon is shorter
    or the requests end sooner."""
    head = make_request("h", prompt=10 * 16, output=0, status="waiting", max_tokens=200)
    i0 = replace(blocked(head, head=10, free=4), head_waiting_id="h")
    runner = make_request("r", prompt=10 * 16, output=0, max_tokens=200)
    i1 = make_instance("i1", runner, num_blocks=40, free=30, num_running=1)
    # Started, h takes 10 of the 30 free blocks; 200 more tokens each take 2 x 13.
    assert defrag(make_cluster(i0, i1), ctx(**WIDE)) == []
    assert moves(defrag(make_cluster(i0, i1), ctx(growth_horizon_tokens=64, **WIDE))) == [("h", "i0", "i1")]
    i0_short = replace(i0, requests=(replace(i0.requests[0], max_tokens=16),))
    i1_short = replace(i1, requests=(replace(i1.requests[0], max_tokens=16),))
    assert moves(defrag(make_cluster(i0_short, i1_short), ctx(**WIDE))) == [("h", "i0", "i1")]


def test_defrag_does_not_redispatch_into_a_queue_or_twice_in_a_row():
    """A destination with a queue of its own takes nothing, even with the
    blocks: its engine may be held back by limits the snapshot does not show."""
    head = _queued("h", 12, max_tokens=16)
    i0 = replace(blocked(head, head=12, free=4), head_waiting_id="h")
    queued_there = make_instance("i1", num_blocks=40, waiting_blocks=2)
    assert defrag(make_cluster(i0, queued_there), ctx(**WIDE)) == []
    history = MigrationHistory().record("h", "i2", "i0", NOW - 1)  # just moved: cooling down
    assert defrag(make_cluster(i0, make_instance("i1", num_blocks=40)), ctx(history, **WIDE)) == []


def _blocked_queue(*queued, runner_blocks: int = 26):
    """i0 (30 blocks) runs one request of `runner_blocks` and queues `queued`
    in that order; its head needs more than the 4 blocks free."""
    runner = make_request("big", prompt=runner_blocks * 16, output=0, max_tokens=64)
    demand = sum(r.blocks(16) for r in queued)
    return make_instance("i0", runner, *queued, num_blocks=30, waiting_blocks=demand,
                         head_blocks=queued[0].blocks(16), head_waiting_id=queued[0].request_id)


def test_defrag_lets_requests_behind_a_blocked_head_start_elsewhere():
    """vLLM serves its queue in order: i0's head (12 blocks) can start neither
    there (4 free) nor on i1 (10 free), and no move makes room (i0's runner
    does not fit i1). The small requests queued behind it start on i1 now, in
    queue order, as far as i1 keeps growth room for them."""
    head, s1, s2, s3 = (_queued("h", 12, max_tokens=16), _queued("s1", 3, max_tokens=16),
                        _queued("s2", 3, max_tokens=16), _queued("s3", 3, max_tokens=16))
    i1 = make_instance("i1", num_blocks=10)
    plans = defrag(make_cluster(_blocked_queue(head, s1, s2, s3), i1), ctx(**WIDE))
    # 3 blocks each and one more to grow 16 tokens: i1's 10 blocks take two.
    assert moves(plans) == [("s1", "i0", "i1"), ("s2", "i0", "i1")]
    assert all(p.waiting and p.reason == "defrag" for p in plans)
    # A re-dispatch copies nothing: the migration concurrency limits (1 in,
    # 1 out by default), even when taken by copies in flight, do not hold it back.
    busy = replace(_blocked_queue(head, s1, s2, s3), migrations_out=1)
    assert moves(defrag(make_cluster(busy, replace(i1, migrations_in=1)), ctx())) \
        == [("s1", "i0", "i1"), ("s2", "i0", "i1")]


def test_defrag_goes_on_down_the_queue_while_it_stays_blocked():
    """The head moves; the next head is blocked too and moves as well; one
    cooling down from an earlier move stays, and blocks what is behind it,
    which moves. Once the queue's head fits where it is, the walk stops."""
    head, nxt, cool, small = (_queued("h", 12, max_tokens=16), _queued("n", 6, max_tokens=16),
                              _queued("c", 6, max_tokens=16), _queued("s", 2, max_tokens=16))
    history = MigrationHistory().record("c", "i2", "i0", NOW - 1)
    i1 = make_instance("i1", num_blocks=40)
    plans = defrag(make_cluster(_blocked_queue(head, nxt, cool, small), i1), ctx(history, **WIDE))
    assert moves(plans) == [("h", "i0", "i1"), ("n", "i0", "i1"), ("s", "i0", "i1")]
    assert all(p.waiting for p in plans)
    # h gone, s (2 blocks) heads the queue and fits i0's 4 free: n waits behind it there.
    plans = defrag(make_cluster(_blocked_queue(head, small, nxt), i1), ctx(history, **WIDE))
    assert moves(plans) == [("h", "i0", "i1")]


def test_growth_room_counts_queued_requests_once_started():
    """A queued request's context is the queue's demand; its growth, once
    started, is growth room the instance must also have."""
    from llumigrate.scheduler.load import growth_blocks, growth_shortfall
    run = make_request("r", prompt=4 * 16, output=0, max_tokens=32)            # +2 blocks
    queued = _queued("q", 4, max_tokens=48)                                     # +3 blocks
    inst = make_instance("i0", run, queued, num_blocks=12, waiting_blocks=4)    # 8 free, 4 claimed
    assert growth_blocks(inst, 256) == 5 and growth_shortfall(inst, make_config()) == 1
    assert growth_blocks(inst, 16) == 2


def test_defrag_keeps_the_queue_behind_a_head_that_room_is_made_for():
    """When moving a running request makes room for the head, the requests
    behind it wait for it, as vLLM would have them: nothing jumps the head."""
    head, s1 = _queued("h", 12, max_tokens=64), _queued("s1", 2, max_tokens=16)
    mid = make_request("mid", prompt=10 * 16, output=0, max_tokens=16)
    i0 = _blocked_queue(head, s1, runner_blocks=10)
    i0 = replace(i0, free_blocks=10, requests=i0.requests + (replace(mid, instance_id="i0"),))
    # i1's 13 blocks cannot grow the head by 64 tokens (16 blocks), but take a runner (10 blocks).
    plans = defrag(make_cluster(i0, make_instance("i1", num_blocks=13)), ctx(**WIDE))
    assert len(plans) == 1 and plans[0].request_id in ("big", "mid") and not plans[0].waiting
    # i0's migration slot is taken by a copy in flight: the room waits for it,
    # and the queue behind the head still waits for the head.
    busy = make_cluster(replace(i0, migrations_out=1), make_instance("i1", num_blocks=13))
    assert defrag(busy, ctx(max_migrations_out=1, max_migrations_in=4)) == []


def test_defrag_moves_nothing_from_a_queue_that_is_not_blocked():
    """A queue whose head fits is vLLM's to start: defrag leaves it alone."""
    s1 = _queued("s1", 2, max_tokens=16)
    i0 = _blocked_queue(s1, runner_blocks=20)            # 10 free, the head needs 2
    assert defrag(make_cluster(i0, make_instance("i1", num_blocks=40)), ctx(**WIDE)) == []


def test_only_defrag_moves_a_queued_request():
    head = _queued("h", 2)
    snap = make_cluster(make_instance("i0", head, num_blocks=10, free=0, waiting_blocks=2,
                                      head_waiting_id="h"), make_instance("i1"))
    assert all(p.request_id != "h" for p in balance(snap, ctx(**WIDE)) + drain(snap, ctx(**WIDE)))


# -- cost model ordering -----------------------------------------------------------------------
def test_measured_fixed_cost_prefers_one_larger_move():
    small = [make_request(f"s{k}", prompt=4 * 16, output=0) for k in range(3)]   # 4 blocks each
    large = make_request("L", prompt=20 * 16, output=0)
    snap = make_cluster(make_instance("i0", *small, large, num_blocks=40, free=2, waiting_blocks=12),
                        make_instance("i1", num_blocks=60))
    per_token, fixed = MigrationCostModel(), MigrationCostModel()
    for n in (64, 512, 1024, 4096):
        per_token = per_token.observe(n, 1e-4 * n)   # cost grows with size, no fixed part
        fixed = fixed.observe(n, 2.0)                 # every migration takes 2 s whatever its size
    assert moves(defrag(snap, ctx(cost=per_token, **WIDE)))[0][0] == "s0"
    assert moves(defrag(snap, ctx(cost=fixed, **WIDE))) == [("L", "i0", "i1")]


# -- priority ----------------------------------------------------------------------------------
def hp_ctx(**kw) -> PlanContext:
    return ctx(high_priority_threshold=HIGH, high_priority_headroom_blocks=20, **kw)


def test_priority_moves_normal_requests_off_a_high_priority_instance():
    vip = make_request("vip", prompt=16, output=0, priority=HIGH)
    normal = [make_request(f"n{k}", prompt=10 * 16, output=k) for k in range(3)]
    snap = make_cluster(make_instance("i0", vip, *normal, num_blocks=40, free=8), make_instance("i1"))
    plans = make_headroom(snap, hp_ctx(**WIDE))
    # 8 free: 12 short of the headroom; no single request frees 12: n0 (10 blocks), then n1 (11)
    assert moves(plans) == [("n0", "i0", "i1"), ("n1", "i0", "i1")]
    assert {p.reason for p in plans} == {"priority"}


def test_priority_never_moves_high_priority_requests():
    vips = [make_request(f"v{k}", prompt=64, output=0, priority=HIGH) for k in range(5)]
    snap = make_cluster(make_instance("i0", *vips, num_blocks=20, free=0), make_instance("i1"))
    assert make_headroom(snap, hp_ctx(**WIDE)) == []


def test_priority_follows_vllm_lower_is_more_important():
    """At the default threshold (-1) a request of priority -5 is high and one
    of 3 is normal: the 3 moves to make the -5 its headroom, never the -5.
    (Read the other way round, the -5 would be the one to move.)"""
    vip = make_request("vip", prompt=4 * 16, output=0, priority=-5)      # 4 blocks
    bg = make_request("bg", prompt=12 * 16, output=0, priority=3)        # 12 blocks
    snap = make_cluster(make_instance("i0", vip, bg, num_blocks=20), make_instance("i1"))  # 4 free
    cfg = ctx(high_priority_headroom_blocks=10, **WIDE).cfg
    assert cfg.is_high(-5) and not cfg.is_high(3) and not cfg.is_high(0)
    plans = make_headroom(snap, ctx(high_priority_headroom_blocks=10, **WIDE))
    assert moves(plans) == [("bg", "i0", "i1")]


def test_priority_moves_the_least_important_normal_request_first():
    """Among normal requests, the largest priority value moves first, before
    the cheaper or lower-id ones at vLLM's default 0."""
    vip = make_request("vip", prompt=16, output=0, priority=HIGH)
    a0 = make_request("a0", prompt=10 * 16, output=0)                    # default priority 0
    z3 = make_request("z3", prompt=10 * 16, output=5, priority=3)        # as large, slightly dearer
    snap = make_cluster(make_instance("i0", vip, a0, z3, num_blocks=40, free=14), make_instance("i1"))
    assert moves(make_headroom(snap, hp_ctx(**WIDE))) == [("z3", "i0", "i1")]


def test_priority_does_not_push_normal_requests_into_another_headroom():
    vip = make_request("vip", prompt=16, output=0, priority=HIGH)
    n = make_request("n", prompt=4 * 16, output=0)
    other = make_instance("i1", make_request("vip2", prompt=16, priority=HIGH), num_blocks=22)  # 21 free
    snap = make_cluster(make_instance("i0", vip, n, num_blocks=20, free=10), other)
    assert make_headroom(snap, hp_ctx()) == []


# -- drain -------------------------------------------------------------------------------------
def test_drain_moves_everything_spread_high_priority_first():
    reqs = [make_request("vip", prompt=300, priority=HIGH)] + [make_request(f"n{k}") for k in range(3)]
    snap = make_cluster(make_instance("i0", *reqs, draining=True), make_instance("i1"), make_instance("i2"))
    plans = drain(snap, ctx(high_priority_threshold=HIGH, max_migrations_out=4, max_migrations_in=2))
    assert plans[0].request_id == "vip" and {p.reason for p in plans} == {"drain"}
    assert sorted(p.request_id for p in plans) == ["n0", "n1", "n2", "vip"]
    assert sorted(p.destination for p in plans) == ["i1", "i1", "i2", "i2"]


def test_drain_moves_the_lowest_priority_value_first():
    """Drain moves the most important first: vLLM's lowest priority value."""
    reqs = [make_request("a", priority=3), make_request("b"), make_request("c", priority=-5)]
    snap = make_cluster(make_instance("i0", *reqs, draining=True), make_instance("i1"))
    plans = drain(snap, ctx(max_migrations_out=4, max_migrations_in=4))
    assert [p.request_id for p in plans] == ["c", "b", "a"]
    assert [p.priority for p in plans] == [-5, 0, 3]


def test_drain_ignores_thresholds_and_cooldown_but_not_limits_or_room():
    r = make_request("r")
    hist = MigrationHistory().record("r", "i1", "i0", at=NOW - 1)   # just came from i1
    busy = make_instance("i1", *(make_request(f"b{k}") for k in range(30)), free=6)  # freeness 0.2
    snap = make_cluster(make_instance("i0", r, draining=True), busy)
    assert moves(drain(snap, ctx(hist))) == [("r", "i0", "i1")]
    assert drain(snap, ctx(hist, max_migrations_in=0)) == []
    full = make_instance("i1", free=1)
    assert drain(make_cluster(make_instance("i0", r, draining=True), full), ctx()) == []


def test_disabled_policies_plan_nothing():
    snap = make_cluster(make_instance("i0", make_request("r"), draining=True), make_instance("i1"))
    assert plan_migrations(snap, make_config(migration_policies={"balance"})) == []
