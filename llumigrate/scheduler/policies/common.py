"""What the migration policies share: which requests to move first, where
to send one, and freeing a number of blocks on one instance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from llumigrate.scheduler.load import freeness, move_keeps_growth_room, spare_blocks
from llumigrate.scheduler.plan import (MigrationPlan, PlanContext, Reason, apply_plan, can_send,
                                       may_go, movable)
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot, blocks_for

# Whether a destination, as it would be once it holds the request, is acceptable.
DestinationCheck = Callable[[InstanceSnapshot], bool]


def cheapest_first(req: RequestSnapshot, ctx: PlanContext) -> tuple:
    """Order of the requests to move: the least important first (the
    largest vLLM priority value: vLLM serves lower values first), then the
    lowest measured cost, then the shortest context, then the id."""
    return (-req.priority, ctx.cost.cost(req), req.num_tokens, req.request_id)


def candidates(inst: InstanceSnapshot, ctx: PlanContext, now: float, reason: Reason,
               accept: Callable[[RequestSnapshot], bool] = lambda r: True) -> list[RequestSnapshot]:
    """The requests of `inst` a policy may move, cheapest first."""
    found = [r for r in inst.requests if movable(r, ctx, now, reason) and accept(r)]
    return sorted(found, key=lambda r: cheapest_first(r, ctx))


def best_destination(snapshot: ClusterSnapshot, req: RequestSnapshot, ctx: PlanContext,
                     reason: Reason, check: DestinationCheck | None = None) -> str | None:
    """The instance `req` may go to that is freest (for `req`'s priority)
    once it holds `req`; ties go to the lowest id. None when there is none."""
    best: tuple[float, str] | None = None
    for dst in snapshot.instances:
        if not may_go(req, dst, ctx, snapshot.now, reason):
            continue
        after = dst.with_running(req)
        if check is not None and not check(after):
            continue
        score = (-freeness(after, ctx.cfg, req.priority), dst.instance_id)
        best = score if best is None or score < best else best
    return None if best is None else best[1]


def keeps_room(snapshot: ClusterSnapshot, ctx: PlanContext, req: RequestSnapshot) -> DestinationCheck:
    """A destination check for moving running `req`: the destination still
    serves its own queue and headroom, does not become a balance source, and
    the move adds no more growth shortfall there than it relieves at the
    source (`load.move_keeps_growth_room`)."""
    cfg = ctx.cfg
    src = snapshot[req.instance_id]
    src_after = src.without_request(req)

    def check(after: InstanceSnapshot) -> bool:
        return (spare_blocks(after, cfg, req.priority) >= 0
                and freeness(after, cfg) >= cfg.migrate_out_threshold
                and move_keeps_growth_room(src, src_after, snapshot[after.instance_id], after, cfg, req.priority))
    return check


def pick(options: list[tuple[RequestSnapshot, str]], ctx: PlanContext,
         enough: Callable[[list[RequestSnapshot]], bool]) -> tuple[RequestSnapshot, str]:
    """The next move among (request, destination) options in `cheapest_first`
    order, on measured cost. Only the least important present (the largest
    priority value) is considered.
    `enough(reqs)` says whether moving all of `reqs` fixes the problem. The
    cheapest single request that is enough alone wins if it costs no more than
    the cheapest-first run that is enough (with a high fixed cost per
    migration, one larger move beats several small ones); else the cheapest."""
    level = [o for o in options if o[0].priority == options[0][0].priority]
    single = next((o for o in level if enough([o[0]])), None)
    if single is None:
        return level[0]
    run: list[RequestSnapshot] = []
    for req, _ in level:
        run.append(req)
        if enough(run):
            break
    run_cost = sum(ctx.cost.cost(r) for r in run) if enough(run) else float("inf")
    return single if ctx.cost.cost(single[0]) <= run_cost else level[0]


def make_room(snapshot: ClusterSnapshot, instance_id: str, need: int, ctx: PlanContext,
              reason: Reason, accept: Callable[[RequestSnapshot], bool] = lambda r: True,
              ) -> list[MigrationPlan]:
    """Plans freeing `need` blocks on `instance_id` by moving its requests
    where `keeps_room` holds, chosen by `pick`, within the concurrency limits
    (the rest is for later rounds). Plans nothing unless the moves, limits
    aside, would free all of `need`: partial room does not start the request."""
    return plan_room(snapshot, instance_id, need, ctx, reason, accept) or []


def plan_room(snapshot: ClusterSnapshot, instance_id: str, need: int, ctx: PlanContext,
              reason: Reason, accept: Callable[[RequestSnapshot], bool] = lambda r: True,
              worth: Callable[[list[MigrationPlan]], bool] | None = None,
              ) -> list[MigrationPlan] | None:
    """`make_room`, telling its two empty answers apart: None when the moves,
    limits aside, could not free all of `need` (or `worth`, given all of
    them, says they are not worth making); [] when they could, but the
    concurrency limits hold every one of them back this round."""
    def holding(r: RequestSnapshot) -> bool:  # a queued request holds no blocks to free
        return r.status == "running" and accept(r)
    dry_run = _free_blocks(snapshot, instance_id, need, _without_limits(ctx), reason, holding)
    freed = sum(blocks_for(p.num_tokens, snapshot[instance_id].block_size) for p in dry_run)
    if freed < need or (worth is not None and not worth(dry_run)):
        return None
    return _free_blocks(snapshot, instance_id, need, ctx, reason, holding)


_NO_LIMIT = 1 << 30


def _without_limits(ctx: PlanContext) -> PlanContext:
    """`ctx` with no migration concurrency limits: what could be done at all."""
    return replace(ctx, cfg=replace(ctx.cfg, max_migrations_out=_NO_LIMIT, max_migrations_in=_NO_LIMIT))


def _free_blocks(snapshot: ClusterSnapshot, instance_id: str, need: int, ctx: PlanContext,
                 reason: Reason, accept: Callable[[RequestSnapshot], bool]) -> list[MigrationPlan]:
    plans: list[MigrationPlan] = []
    while need > 0 and can_send(snapshot[instance_id], ctx.cfg):
        src = snapshot[instance_id]
        options = [(r, d) for r in candidates(src, ctx, snapshot.now, reason, accept)
                   if (d := best_destination(snapshot, r, ctx, reason, keeps_room(snapshot, ctx, r)))]
        if not options:
            break
        req, dst = pick(options, ctx, lambda rs: sum(r.blocks(src.block_size) for r in rs) >= need)
        plans.append(ctx.plan(req, dst, reason))
        snapshot = apply_plan(snapshot, plans[-1])
        need -= req.blocks(src.block_size)
    return plans
