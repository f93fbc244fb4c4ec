"""Drain: move every request off instances marked draining.

Balance thresholds, cooldown and the no-return rule do not apply (the
instance is going away); concurrency limits and the destination's free blocks
do. The most important requests go first (the lowest vLLM priority value,
as vLLM serves them), then the cheapest. Each request goes to the instance
that is freest, for its priority, once it holds it, so a drain spreads over
the cluster. Waiting requests (no KV yet) are the shell's to re-dispatch;
requests about to finish are left to finish.
"""

from __future__ import annotations

from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan, can_send, movable
from llumigrate.scheduler.policies.common import best_destination
from llumigrate.scheduler.snapshot import ClusterSnapshot


def drain(snapshot: ClusterSnapshot, ctx: PlanContext) -> list[MigrationPlan]:
    plans: list[MigrationPlan] = []
    for inst in sorted(snapshot.instances, key=lambda i: i.instance_id):
        if not (inst.up and inst.draining):
            continue
        reqs = [r for r in inst.requests if movable(r, ctx, snapshot.now, "drain")]
        for req in sorted(reqs, key=lambda r: (r.priority, ctx.cost.cost(r), r.request_id)):
            if not can_send(snapshot[inst.instance_id], ctx.cfg):
                break
            dst = best_destination(snapshot, req, ctx, "drain")
            if dst is not None:
                plans.append(ctx.plan(req, dst, "drain"))
                snapshot = apply_plan(snapshot, plans[-1])
    return plans

