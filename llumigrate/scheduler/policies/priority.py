"""Priority: keep the headroom of instances that run high-priority requests.

An instance running or queueing a request whose priority is high
(`SchedulerConfig.is_high`: a vLLM priority at or below
`high_priority_threshold`, lower values being more important) should have
`high_priority_headroom_blocks` free beyond what its queue needs, so its
high-priority requests grow without being preempted. When it has less, its
normal-priority requests move away (the least important first, i.e. the
largest priority value, then the cheapest: `common.pick`) to instances that
keep room for their own queue and headroom (`common.keeps_room`, which also
weighs growth room). High-priority requests are never moved by this policy.
"""

from __future__ import annotations

from llumigrate.scheduler.load import hosts_high_priority, spare_blocks
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan
from llumigrate.scheduler.policies.common import make_room
from llumigrate.scheduler.snapshot import ClusterSnapshot


def make_headroom(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    cfg, plans = ctx.cfg, []
    for inst in sorted(snapshot.instances, key=lambda i: i.instance_id):
        if not inst.up or inst.draining or not hosts_high_priority(inst, cfg):
            continue
        # spare as a high-priority request sees it: free minus the queue's demand
        short = cfg.high_priority_headroom_blocks - spare_blocks(snapshot[inst.instance_id], cfg,
                                                                 cfg.high_priority_threshold)
        if short <= 0:
            continue
        for plan in make_room(snapshot, inst.instance_id, short, ctx, "priority",
                              accept=lambda r: not cfg.is_high(r.priority)):
            snapshot = apply_plan(snapshot, plan)
            plans.append(plan)
    return plans
