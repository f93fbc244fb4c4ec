"""What the migration policies share: which requests to move first, where
to send one, and freeing a number of blocks on one instance."""

from __future__ import annotations

from collections.abc import Callable

from llumigrate.scheduler.load import freeness, spare_blocks
from llumigrate.scheduler.plan import (MigrationPlan, PlanContext, Reason, apply_plan, can_send,
                                       may_go, movable)
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot

# (destination before, destination after the move) -> acceptable
DestinationCheck = Callable[[InstanceSnapshot, InstanceSnapshot], bool]


def cheapest_first(req: RequestSnapshot, ctx: PlanContext) -> tuple:
    """Order of the requests to move: low priority before high, then the
    lowest measured cost, then the shortest context, then the id."""
    return (req.priority, ctx.cost.cost(req), req.num_tokens, req.request_id)


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
        if check is not None and not check(dst, after):
            continue
        score = (-freeness(after, ctx.cfg, req.priority), dst.instance_id)
        best = score if best is None or score < best else best
    return None if best is None else best[1]


def keeps_room(ctx: PlanContext, req: RequestSnapshot) -> DestinationCheck:
    """A destination check: the destination still serves its own queue and
    headroom, and does not become a balance source."""
    cfg = ctx.cfg

    def check(before: InstanceSnapshot, after: InstanceSnapshot) -> bool:
        return (spare_blocks(after, cfg, req.priority) >= 0
                and freeness(after, cfg) >= cfg.migrate_out_threshold)
    return check


def pick(options: list[tuple[RequestSnapshot, str]],
         enough: Callable[[RequestSnapshot, str], bool]) -> tuple[RequestSnapshot, str]:
    """From (request, destination) options in `cheapest_first` order: among
    those of the lowest priority, the first that is `enough` alone, else the
    first (the cheapest). Never a higher priority while a lower one remains."""
    level = [o for o in options if o[0].priority == options[0][0].priority]
    return next((o for o in level if enough(*o)), level[0])


def make_room(snapshot: ClusterSnapshot, instance_id: str, need: int, ctx: PlanContext,
              reason: Reason, accept: Callable[[RequestSnapshot], bool] = lambda r: True,
              ) -> list[MigrationPlan]:
    """Plans freeing `need` blocks on `instance_id` by moving its requests
    where `keeps_room` holds. Prefers the cheapest single request that frees
    enough, else the cheapest one, and repeats. Plans nothing when all
    movable requests together could not free `need`."""
    plans: list[MigrationPlan] = []
    while need > 0 and can_send(snapshot[instance_id], ctx.cfg):
        src = snapshot[instance_id]
        options = [(r, d) for r in candidates(src, ctx, snapshot.now, reason, accept)
                   if (d := best_destination(snapshot, r, ctx, reason, keeps_room(ctx, r)))]
        if not options or (not plans and sum(r.blocks(src.block_size) for r, _ in options) < need):
            break
        req, dst = pick(options, lambda r, _: r.blocks(src.block_size) >= need)
        plans.append(ctx.plan(req, dst, reason))
        snapshot = apply_plan(snapshot, plans[-1])
        need -= req.blocks(src.block_size)
    return plans
