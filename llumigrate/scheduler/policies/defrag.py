"""Defragment: let a blocked head-of-line request start where it waits.

vLLM's blocks need not be contiguous, so fragmentation here is across
instances: the request at the head of an instance's queue needs B blocks and
its instance has fewer free, while other instances have room. Running requests
move off that instance (low priority first, on measured cost: `common.pick`)
to instances that keep room for their own queue and headroom, until B blocks
are free there. Nothing is planned when the moves could not free enough.
"""

from __future__ import annotations

from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan
from llumigrate.scheduler.policies.common import make_room
from llumigrate.scheduler.snapshot import ClusterSnapshot


def defrag(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    plans: list[MigrationPlan] = []
    blocked = [i for i in snapshot.instances
               if i.up and not i.draining and i.head_waiting_blocks > i.free_blocks]
    # The most starved head first: it has the most to gain.
    for inst in sorted(blocked, key=lambda i: (i.free_blocks - i.head_waiting_blocks, i.instance_id)):
        need = inst.head_waiting_blocks - snapshot[inst.instance_id].free_blocks
        for plan in make_room(snapshot, inst.instance_id, need, ctx, "defrag"):
            snapshot = apply_plan(snapshot, plan)
            plans.append(plan)
    return plans
