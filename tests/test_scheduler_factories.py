"""Factories for the scheduler's policy tests (hand-built snapshots), and
checks of the snapshot arithmetic the policies rely on."""

from __future__ import annotations

from dataclasses import replace

from llumigrate.scheduler.config import SchedulerConfig
from llumigrate.scheduler.plan import MigrationPlan, apply_plan
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot, blocks_for

NOW = 1000.0


def make_request(rid: str, *, prompt: int = 64, output: int = 16, priority: int = 0,
                 max_tokens: int | None = None, status: str = "running", migrating: bool = False,
                 migratable: bool = True, instance: str = "") -> RequestSnapshot:
    return RequestSnapshot(rid, instance, priority, prompt, output, max_tokens, status,  # type: ignore[arg-type]
                           migrating, migratable)


def make_instance(iid: str, *requests: RequestSnapshot, num_blocks: int = 100,
                  free: int | None = None, block_size: int = 16, waiting_blocks: int = 0,
                  head_blocks: int | None = None, **kw) -> InstanceSnapshot:
    """An instance holding `requests` (re-homed to it). Free blocks default to
    what the running requests leave; the queue's demand to `waiting_blocks`,
    its head to all of it."""
    reqs = tuple(replace(r, instance_id=iid) for r in requests)
    running = [r for r in reqs if r.status == "running"]
    if free is None:
        free = num_blocks - sum(r.blocks(block_size) for r in running)
    kw.setdefault("num_running", len(running))
    kw.setdefault("num_waiting", len(reqs) - len(running) or int(waiting_blocks > 0))
    kw.setdefault("reported_at", NOW)
    head = waiting_blocks if head_blocks is None else head_blocks
    return InstanceSnapshot(iid, num_blocks, free, block_size, waiting_demand_blocks=waiting_blocks,
                            head_waiting_blocks=head, requests=reqs, **kw)


def make_cluster(*instances: InstanceSnapshot, now: float = NOW) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(instances), now)


def idle_cluster(n: int, **kw) -> ClusterSnapshot:
    return make_cluster(*(make_instance(f"i{k}", **kw) for k in range(n)))


def make_config(**kw) -> SchedulerConfig:
    return SchedulerConfig(**kw)


# -- the snapshot arithmetic ----------------------------------------------------------
def test_blocks_round_up():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_make_instance_derives_free_blocks_from_requests():
    inst = make_instance("i0", make_request("a", prompt=20, output=12), make_request("b", prompt=33, output=0))
    assert inst.free_blocks == 100 - 2 - 3 and inst.num_running == 2
    assert all(r.instance_id == "i0" for r in inst.requests)


def test_with_waiting_adds_queue_demand_and_keeps_head():
    inst = make_instance("i0", waiting_blocks=4)
    after = inst.with_waiting(make_request("x", prompt=40, output=0))
    assert (after.num_waiting, after.waiting_demand_blocks, after.head_waiting_blocks) == (2, 7, 4)
    empty = make_instance("i1").with_waiting(make_request("y", prompt=40, output=0))
    assert empty.head_waiting_blocks == 3 and empty.requests[0].status == "waiting"


def test_apply_plan_moves_request_blocks_and_counts_in_flight():
    req = make_request("a", prompt=60, output=4)  # 4 blocks
    snap = make_cluster(make_instance("i0", req), make_instance("i1"))
    after = apply_plan(snap, MigrationPlan("a", "i0", "i1", "balance"))
    assert after["i0"].free_blocks == 100 and after["i0"].num_running == 0
    assert after["i1"].free_blocks == 96 and after["i1"].num_running == 1
    assert (after["i0"].migrations_out, after["i1"].migrations_in) == (1, 1)
    moved = after.request("a")
    assert moved.instance_id == "i1" and moved.migrating
    assert snap["i0"].requests[0].instance_id == "i0"  # the original is untouched
