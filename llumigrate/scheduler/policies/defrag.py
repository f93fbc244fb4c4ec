"""Defragment: let a blocked queue start.

vLLM's blocks need not be contiguous, so fragmentation here is across
instances: the request at the head of an instance's queue needs B blocks and
its instance has fewer free, while other instances have room. vLLM serves its
queue in order, so everything queued behind that head waits too, however
little it needs.

If another instance with no queue of its own can start the head now and
keep it running (room beyond its headroom for the head and for the growth
of what is listed there, see `load.growth_blocks`), the head itself moves
there: it holds no KV (not started, or preempted), so this costs a
re-dispatch, not a copy. Without the growth room the move only trades this
queue for preemptions there. Otherwise running requests move off its
instance (the least important first, i.e. the largest vLLM priority value,
on measured cost: `common.pick`) to instances that keep room for their own
queue and headroom (`common.keeps_room`, which also weighs growth room),
until B blocks are free there; nothing is planned
when the moves could not free enough, nor when they would take longer
(the cost model's estimates, one after another) than the instance takes to
free the room itself as its requests finish (`load.time_to_free`, at their
measured decode rates): the head then starts sooner without them.

While the queue stays blocked, the requests behind its head that another
instance can start now (the same test as for the head) are re-dispatched
there, in queue order: they jump a head that did not fit there, or may not
move now (cooling down, just came from there, not migratable).

A re-dispatch copies nothing, so it takes no migration slot
(`plan.needs_slot`): a blocked queue drains to other instances in one round,
not one request per round trip. Moves of running requests to make room are
held to the concurrency limits.
"""

from __future__ import annotations

from llumigrate.scheduler.load import keeps_growth_room, time_to_free
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan, movable
from llumigrate.scheduler.policies.common import best_destination, plan_room
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot


def defrag(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    plans: list[MigrationPlan] = []
    # Destinations with a queue of their own take nothing: blocks aside, an
    # engine may be held back by limits the snapshot does not show (its
    # sequence limit, its token budget). This round's own re-dispatches do
    # not count as such a queue.
    unqueued = {i.instance_id for i in snapshot.instances if i.waiting_demand_blocks == 0}
    blocked = [i for i in snapshot.instances if i.up and not i.draining and _is_blocked(i)]
    # The most starved head first: it has the most to gain.
    for inst in sorted(blocked, key=lambda i: (i.free_blocks - i.head_waiting_blocks, i.instance_id)):
        iid, head = inst.instance_id, inst.head_waiting
        dst = _starts_now(snapshot, head, ctx, unqueued) if head is not None else None
        if dst is not None:
            room = [ctx.plan(head, dst, "defrag")]
        else:
            cur = snapshot[iid]  # as the plans of more starved instances left it
            planned = plan_room(snapshot, iid, cur.head_waiting_blocks - cur.free_blocks, ctx, "defrag",
                                worth=lambda moves: _copy_time(moves) < time_to_free(cur, cur.head_waiting_blocks))
            if planned == []:
                continue  # room can be made once a migration slot frees: nothing jumps the head
            room = planned or []
        for plan in room:
            snapshot = apply_plan(snapshot, plan)
            plans.append(plan)
        if room and dst is None:
            continue  # the head starts once the moves land, and the rest of the queue after it
        # The rest of the queue while it stays blocked: behind a head that
        # could not move, or behind the next head once it did.
        tried = head.request_id if head is not None and dst is None else None
        for req in snapshot[iid].queue:
            if not _is_blocked(snapshot[iid]):
                break
            to = _starts_now(snapshot, req, ctx, unqueued) if req.request_id != tried else None
            if to is not None:
                plans.append(ctx.plan(req, to, "defrag"))
                snapshot = apply_plan(snapshot, plans[-1])
    return plans


def _copy_time(moves: list[MigrationPlan]) -> float:
    """Estimated seconds until `moves` have all landed: one after another,
    as the source's migration slot allows by default."""
    return sum(p.est_cost_s for p in moves)


def _is_blocked(inst: InstanceSnapshot) -> bool:
    """The head of `inst`'s queue cannot start there now (nor, in vLLM's
    order, anything queued behind it)."""
    return inst.head_waiting_blocks > inst.free_blocks


def _starts_now(snapshot: ClusterSnapshot, req: RequestSnapshot, ctx: PlanContext,
                unqueued: set[str]) -> str | None:
    """An instance of `unqueued` where queued `req` would start at once and
    keep growing, if any: its spare blocks cover `req`, what this round
    already sent there, and the growth of all of it and of what runs there."""
    if not movable(req, ctx, snapshot.now, "defrag"):
        return None

    def check(after: InstanceSnapshot) -> bool:
        return after.instance_id in unqueued and keeps_growth_room(after, ctx.cfg, req.priority)
    return best_destination(snapshot, req, ctx, "defrag", check)
