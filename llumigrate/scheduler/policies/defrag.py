"""Defragment: let a blocked head-of-line request start.

vLLM's blocks need not be contiguous, so fragmentation here is across
instances: the request at the head of an instance's queue needs B blocks and
its instance has fewer free, while other instances have room. If another
instance can start it now and keep it running (room beyond its own queue and
headroom for the head and for the growth of what runs there, see
`load.growth_blocks`, and no queue of its own), the head itself moves there:
it holds no KV (not started, or preempted), so this costs a re-dispatch, not
a copy. Without the growth room the move only trades this queue for
preemptions there. Otherwise running requests move off its
instance (low priority first, on measured cost: `common.pick`) to instances
that keep room for their own queue and headroom (`common.keeps_room`, which
also weighs growth room), until B blocks are free there. Nothing is planned
when the moves could not free enough.
"""

from __future__ import annotations

from llumigrate.scheduler.load import keeps_growth_room
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan, movable
from llumigrate.scheduler.policies.common import best_destination, make_room
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot


def defrag(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    plans: list[MigrationPlan] = []
    blocked = [i for i in snapshot.instances
               if i.up and not i.draining and i.head_waiting_blocks > i.free_blocks]
    # The most starved head first: it has the most to gain.
    for inst in sorted(blocked, key=lambda i: (i.free_blocks - i.head_waiting_blocks, i.instance_id)):
        head = inst.head_waiting
        dst = _starts_now(snapshot, head, ctx) if head is not None else None
        if dst is not None:
            plans.append(ctx.plan(head, dst, "defrag"))
            snapshot = apply_plan(snapshot, plans[-1])
            continue
        need = inst.head_waiting_blocks - snapshot[inst.instance_id].free_blocks
        for plan in make_room(snapshot, inst.instance_id, need, ctx, "defrag"):
            snapshot = apply_plan(snapshot, plan)
            plans.append(plan)
    return plans


def _starts_now(snapshot: ClusterSnapshot, head: RequestSnapshot, ctx: PlanContext) -> str | None:
    """An instance where queued `head` would start at once, if any."""
    if not movable(head, ctx, snapshot.now, "defrag"):
        return None

    def check(after: InstanceSnapshot) -> bool:
        return after.waiting_demand_blocks == 0 and keeps_growth_room(after, ctx.cfg, head.priority)
    return best_destination(snapshot, head, ctx, "defrag", check)
