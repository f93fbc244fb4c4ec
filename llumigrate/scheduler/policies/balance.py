"""Balance: move requests from overloaded instances to free ones.

Sources have freeness below `migrate_out_threshold`, destinations above
`migrate_in_threshold` (normal-priority freeness, so headroom counts). The
most loaded source is paired with the freest destination, the next with the
next, up to `max_balance_pairs`. Within a pair, requests move (the least
important first, i.e. the largest vLLM priority value, on measured cost:
`common.pick`) until the source is no longer below `migrate_out_threshold`
or the concurrency limits are reached. A move is only made if, afterwards,
the destination is still at least as free as the source and is not itself a
source (a move never inverts the imbalance, so it never calls for a move
back), and the move pays for itself: it relieves at least
`balance_min_relief_blocks` (1) more growth shortfall at the source than it
adds at the destination (`load.growth_relief`), i.e. it saves vLLM
preempting within the horizon. A source whose spare blocks cover the growth
of all it holds is left alone however low its freeness: a move would cost a
copy (and the request's blocks held on both ends while it runs) and save
nothing. With the knob at 0, balance also evens out freeness alone, as long
as no move adds shortfall.
"""

from __future__ import annotations

from llumigrate.scheduler.load import freeness, growth_relief
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan, can_receive, can_send, may_go
from llumigrate.scheduler.policies.common import candidates, pick
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot


def balance(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    cfg, now = ctx.cfg, snapshot.now
    load = {i.instance_id: freeness(i, cfg) for i in snapshot.instances}
    sources = sorted((i.instance_id for i in snapshot.instances
                      if not i.draining and can_send(i, cfg) and load[i.instance_id] < cfg.migrate_out_threshold),
                     key=lambda iid: (load[iid], iid))
    dests = sorted((i.instance_id for i in snapshot.instances
                    if can_receive(i, cfg, now) and load[i.instance_id] > cfg.migrate_in_threshold),
                   key=lambda iid: (-load[iid], iid))
    plans: list[MigrationPlan] = []
    for src, dst in list(zip(sources, dests))[:cfg.max_balance_pairs]:
        for plan in _balance_pair(snapshot, src, dst, ctx):
            snapshot = apply_plan(snapshot, plan)
            plans.append(plan)
    return plans


def _balance_pair(snapshot: ClusterSnapshot, src_id: str, dst_id: str,
                  ctx: PlanContext) -> list[MigrationPlan]:
    cfg, plans = ctx.cfg, []
    while True:
        src, dst = snapshot[src_id], snapshot[dst_id]
        if freeness(src, cfg) >= cfg.migrate_out_threshold or not can_send(src, cfg) \
                or not can_receive(dst, cfg, snapshot.now):
            return plans
        options = [(r, dst_id) for r in candidates(src, ctx, snapshot.now, "balance")
                   if may_go(r, dst, ctx, snapshot.now, "balance") and _improves(snapshot, r, dst_id, ctx)]
        if not options:
            return plans
        req, _ = pick(options, ctx, lambda rs: _lifts_source(src, rs, ctx))
        plans.append(ctx.plan(req, dst_id, "balance"))
        snapshot = apply_plan(snapshot, plans[-1])


def _improves(snapshot: ClusterSnapshot, req: RequestSnapshot, dst_id: str, ctx: PlanContext) -> bool:
    """After the move the destination is no source and no less free than the
    source, and the move relieves at least `balance_min_relief_blocks` more
    growth shortfall at the source than it adds at the destination."""
    cfg = ctx.cfg
    src = snapshot[req.instance_id]
    src_after = src.without_request(req)
    dst_after = snapshot[dst_id].with_running(req)
    dst_free = freeness(dst_after, cfg)
    return (dst_free >= cfg.migrate_out_threshold and dst_free >= freeness(src_after, cfg)
            and growth_relief(src, src_after, snapshot[dst_id], dst_after, cfg) >= cfg.balance_min_relief_blocks)


def _lifts_source(src: InstanceSnapshot, reqs: list[RequestSnapshot], ctx: PlanContext) -> bool:
    """Whether the source is no longer below the threshold once `reqs` left."""
    for req in reqs:
        src = src.without_request(req)
    return freeness(src, ctx.cfg) >= ctx.cfg.migrate_out_threshold
