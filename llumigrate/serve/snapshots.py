"""Cluster state -> the scheduler's immutable snapshots (`scheduler.snapshot`).

Load figures come from each instance's latest pushed report. Requests come
from the controller's own handles, which know more than a report does: a
request dispatched after the last report is counted as waiting demand there
even though the engine has not said so yet, and the blocks of a migration in
flight to an instance are not free there: from the moment it is started
until it commits (the request is then listed there), so that neither
dispatch nor another migration counts on them meanwhile.
"""

from __future__ import annotations

from llumigrate.controller.cluster import Cluster
from llumigrate.controller.instance import Instance
from llumigrate.controller.request import RequestHandle
from llumigrate.scheduler import ClusterSnapshot, InstanceSnapshot, RequestSnapshot
from llumigrate.scheduler.snapshot import blocks_for

DEFAULT_BLOCK_SIZE = 16


def request_snapshot(h: RequestHandle, waiting: bool, engine_facts: dict | None = None) -> RequestSnapshot:
    migratable = h.migration_refusal(engine_facts) is None
    return RequestSnapshot(h.request_id, h.instance_id, h.priority, len(h.prompt_token_ids),
                           len(h.output_token_ids), h.max_tokens,
                           "waiting" if waiting else "running", h.migrating, migratable,
                           None if waiting else h.decode_rate())


def instance_snapshot(inst: Instance, handles: list[RequestHandle]) -> InstanceSnapshot:
    load = inst.load or {}
    bs = int(inst.info.get("block_size") or DEFAULT_BLOCK_SIZE)
    # vLLM's queue, head first: the requests it preempted (re-queued at the
    # head, holding no blocks; the engine lists them), then those not started
    # yet, in the order they joined this instance's queue (a re-dispatched
    # request joins at the tail): among the engine's reported waiting count,
    # or sent after the last report (the engine could not count them).
    order = {rid: n for n, rid in enumerate(load.get("preempted") or ())}
    preempted = sorted((h for h in handles if h.engine_rid in order), key=lambda h: order[h.engine_rid])
    rest = [h for h in handles if h.engine_rid not in order and not h.output_token_ids]
    fresh = [h for h in rest if h.queued_at > inst.reported_at]
    num_waiting = int(load.get("num_waiting", 0))
    queued = sorted((h for h in rest if h.queued_at <= inst.reported_at),
                    key=lambda h: h.queued_at)[: max(0, num_waiting - len(preempted))]
    queue = preempted + sorted(queued + fresh, key=lambda h: h.queued_at)
    waiting_ids = {id(h) for h in queue}
    facts = inst.info.get("engine_facts")
    queued_snaps = tuple(request_snapshot(h, True, facts) for h in queue)  # listed in queue order
    reqs = queued_snaps + tuple(request_snapshot(h, False, facts) for h in handles if id(h) not in waiting_ids)
    demand = sum(r.blocks(bs) for r in queued_snaps)
    head = queued_snaps[0] if queued_snaps else None
    num_blocks = int(load.get("num_blocks", 0))
    spoken_for = sum(blocks_for(len(h.all_token_ids), bs) for h in inst.incoming.values()
                     if h.instance_id != inst.instance_id)
    free = max(0, min(num_blocks, int(load.get("free_blocks", 0))) - spoken_for)
    return InstanceSnapshot(
        inst.instance_id, num_blocks, free, bs,
        int(load.get("num_running", 0)), num_waiting + len(fresh), demand,
        head.blocks(bs) if head else 0, inst.draining, inst.up,
        inst.migrations_in, inst.migrations_out, reqs, inst.reported_at,
        head.request_id if head else None)


def cluster_snapshot(cluster: Cluster, now: float) -> ClusterSnapshot:
    by_instance: dict[str, list[RequestHandle]] = {iid: [] for iid in cluster.instances}
    for h in cluster.requests.values():
        if not h.finished and h.instance_id in by_instance:
            by_instance[h.instance_id].append(h)
    return ClusterSnapshot(tuple(instance_snapshot(inst, by_instance[iid])
                                 for iid, inst in sorted(cluster.instances.items())), now)
