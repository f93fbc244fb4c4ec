"""Defragment: let a blocked queue start.

vLLM's blocks need not be contiguous, so fragmentation here is across
instances: the request at the head of an instance's queue needs B blocks and
its instance has fewer free, while other instances have room. vLLM serves its
queue in order, so everything queued behind that head waits too, however
little it needs.

If another instance can start the head now and keep it running (room beyond
its own queue and headroom for the head and for the growth of what is listed
there, see `load.growth_blocks`), the head itself moves there: it holds no
KV (not started, or preempted), so this costs a re-dispatch, not a copy.
Without the growth room the move only trades this queue for preemptions
there. Otherwise running requests move off its instance (low priority first,
on measured cost: `common.pick`) to instances that keep room for their own
queue and headroom (`common.keeps_room`, which also weighs growth room),
until B blocks are free there; nothing is planned when the moves could not
free enough.

While the queue stays blocked, the requests behind its head that another
instance can start now (the same test as for the head) are re-dispatched
there, in queue order: they jump a head that could not use that room anyway.
"""

from __future__ import annotations

from llumigrate.scheduler.load import keeps_growth_room
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan, can_send, movable
from llumigrate.scheduler.policies.common import best_destination, make_room
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot


def defrag(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    plans: list[MigrationPlan] = []
    blocked = [i for i in snapshot.instances
               if not i.draining and can_send(i, ctx.cfg) and _is_blocked(i)]
    # The most starved head first: it has the most to gain.
    for inst in sorted(blocked, key=lambda i: (i.free_blocks - i.head_waiting_blocks, i.instance_id)):
        iid, head = inst.instance_id, inst.head_waiting
        dst = _starts_now(snapshot, head, ctx) if head is not None else None
        if dst is not None:
            room = [ctx.plan(head, dst, "defrag")]
        else:
            room = make_room(snapshot, iid, inst.head_waiting_blocks - inst.free_blocks, ctx, "defrag")
        for plan in room:
            snapshot = apply_plan(snapshot, plan)
            plans.append(plan)
        if room and dst is None:
            continue  # the head starts once the moves land, and the rest of the queue after it
        for req in snapshot[iid].queue:  # behind the head, or a new head that may be blocked too
            if not _is_blocked(snapshot[iid]) or not can_send(snapshot[iid], ctx.cfg):
                break
            dst = _starts_now(snapshot, req, ctx)
            if dst is not None:
                plans.append(ctx.plan(req, dst, "defrag"))
                snapshot = apply_plan(snapshot, plans[-1])
    return plans


def _is_blocked(inst: InstanceSnapshot) -> bool:
    """The head of `inst`'s queue cannot start there now (nor, in vLLM's
    order, anything queued behind it)."""
    return inst.head_waiting_blocks > inst.free_blocks


def _starts_now(snapshot: ClusterSnapshot, req: RequestSnapshot, ctx: PlanContext) -> str | None:
    """An instance where queued `req` would start at once and keep growing,
    if any: its free blocks cover its own queue (which `req` does not delay)
    and `req`, with growth room for `req` and what runs there."""
    if not movable(req, ctx, snapshot.now, "defrag"):
        return None

    def check(after: InstanceSnapshot) -> bool:  # its spare blocks cover its queue and the growth
        return keeps_growth_room(after, ctx.cfg, req.priority)
    return best_destination(snapshot, req, ctx, "defrag", check)
