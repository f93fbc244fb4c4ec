"""The load metric: freeness, in the spirit of Llumnix's virtual usage.

    freeness(inst, p) = (free_blocks - waiting_demand_blocks - reserved(inst, p))
                        / max(1, num_running)

    reserved(inst, p) = high_priority_headroom_blocks  if inst runs or queues a
                                                       high-priority request and
                                                       p is not high priority
                        0                              otherwise

Free KV blocks minus what the queue already claims, shared among the running
requests: higher is freer; negative means the instance is overloaded (its queue
cannot start). The headroom protects an instance's high-priority requests
(running or queued; `SchedulerConfig.is_high`: a vLLM priority at or below
`high_priority_threshold`, lower values being more important) from normal
ones: dispatch sends normal requests elsewhere and the priority policy moves
them out, while a high-priority request may use it.
"""

from __future__ import annotations

from llumigrate.scheduler.config import SchedulerConfig
from llumigrate.scheduler.snapshot import InstanceSnapshot, RequestSnapshot, blocks_for


def hosts_high_priority(inst: InstanceSnapshot, cfg: SchedulerConfig) -> bool:
    return any(cfg.is_high(r.priority) for r in inst.requests)


def reserved_blocks(inst: InstanceSnapshot, cfg: SchedulerConfig, priority: int | None = None) -> int:
    """Blocks of `inst` a request of `priority` (None: a normal one) may not count on."""
    if (priority is not None and cfg.is_high(priority)) or not hosts_high_priority(inst, cfg):
        return 0
    return cfg.high_priority_headroom_blocks


def spare_blocks(inst: InstanceSnapshot, cfg: SchedulerConfig, priority: int | None = None) -> int:
    """Free blocks left once the queue and the headroom are served (may be < 0)."""
    return inst.free_blocks - inst.waiting_demand_blocks - reserved_blocks(inst, cfg, priority)


def freeness(inst: InstanceSnapshot, cfg: SchedulerConfig, priority: int | None = None) -> float:
    """The instance's freeness as seen by a request of `priority`; None (the
    default) means a normal-priority request: the load migration balances."""
    return spare_blocks(inst, cfg, priority) / max(1, inst.num_running)


def accepts_work(inst: InstanceSnapshot, cfg: SchedulerConfig, now: float) -> bool:
    """Whether new requests or incoming migrations may go to `inst`: it is up,
    not draining, and (when `stale_report_s` is set) its report is fresh."""
    if not inst.up or inst.draining:
        return False
    return cfg.stale_report_s is None or now - inst.reported_at <= cfg.stale_report_s


def growth_blocks(inst: InstanceSnapshot, horizon_tokens: int) -> int:
    """Blocks the requests listed on `inst` take on beyond their context as
    each generates its next `horizon_tokens` tokens (fewer where it ends
    sooner): what vLLM, which admits a request on its context's blocks alone,
    will need before it must preempt one of them. Queued requests count as
    they will once started (their context is the queue's demand)."""
    total = 0
    for r in inst.requests:
        remaining = r.remaining_tokens
        n = horizon_tokens if remaining is None else min(remaining, horizon_tokens)
        total += blocks_for(r.num_tokens + n, inst.block_size) - r.blocks(inst.block_size)
    return total


def growth_shortfall(inst: InstanceSnapshot, cfg: SchedulerConfig, priority: int | None = None) -> int:
    """Blocks `inst` lacks (beyond its spare blocks for `priority`) for the
    growth of what runs or queues there over `cfg.growth_horizon_tokens`:
    roughly what vLLM will preempt there within the horizon. 0 when it has
    the room."""
    return max(0, growth_blocks(inst, cfg.growth_horizon_tokens) - spare_blocks(inst, cfg, priority))


def keeps_growth_room(inst: InstanceSnapshot, cfg: SchedulerConfig, priority: int | None = None) -> bool:
    """Whether `inst`'s spare blocks (for `priority`) cover the growth of what
    runs or queues there: a request moved in (it is listed in `inst`) keeps
    running without vLLM preempting one there."""
    return growth_shortfall(inst, cfg, priority) == 0


def growth_relief(src_before: InstanceSnapshot, src_after: InstanceSnapshot,
                  dst_before: InstanceSnapshot, dst_after: InstanceSnapshot,
                  cfg: SchedulerConfig, priority: int | None = None) -> int:
    """Growth shortfall a move of a running request (of `priority`) relieves
    at its source minus what it adds at its destination: the blocks vLLM
    would preempt for within the horizon that the move saves, in all.
    Negative when the move trades room for preemptions."""
    added = growth_shortfall(dst_after, cfg, priority) - growth_shortfall(dst_before, cfg, priority)
    relieved = growth_shortfall(src_before, cfg) - growth_shortfall(src_after, cfg)
    return relieved - added


def move_keeps_growth_room(src_before: InstanceSnapshot, src_after: InstanceSnapshot,
                           dst_before: InstanceSnapshot, dst_after: InstanceSnapshot,
                           cfg: SchedulerConfig, priority: int | None = None) -> bool:
    """Whether moving a running request (of `priority`) adds no more growth
    shortfall at its destination than it relieves at its source: the move
    never trades room for preemptions, while a source that must preempt may
    still send work to a destination with less than full growth room."""
    return growth_relief(src_before, src_after, dst_before, dst_after, cfg, priority) >= 0


def time_to_free(inst: InstanceSnapshot, blocks: int) -> float:
    """Seconds until `inst` has `blocks` free blocks with no migration: as
    its running requests finish (each at its `max_tokens`, at its measured
    decode rate) and hand back their blocks, while those still running grow
    into free blocks at theirs. 0 when it has them now; inf when it does not
    happen, or cannot be told (no `max_tokens`). A request whose rate is not
    measured yet (its first tokens) is taken as neither ending nor growing."""
    if inst.free_blocks >= blocks:
        return 0.0
    bs = inst.block_size
    ends = sorted((r.remaining_tokens / r.decode_tokens_per_s, r.request_id, r) for r in inst.running
                  if r.decode_tokens_per_s and r.remaining_tokens is not None)
    freed = 0
    for k, (t, _, req) in enumerate(ends):
        # What finished by then grew into free blocks and handed all back:
        # net, the blocks it holds now. What still runs has grown meanwhile.
        freed += req.blocks(bs)
        grown = sum(blocks_for(r.num_tokens + int(r.decode_tokens_per_s * t), bs) - r.blocks(bs)
                    for _, _, r in ends[k + 1:])
        if inst.free_blocks + freed - grown >= blocks:
            return t
    return float("inf")


def fits(req: RequestSnapshot, inst: InstanceSnapshot) -> bool:
    """Whether `inst` has the free blocks to hold running request `req` now."""
    return req.blocks(inst.block_size) <= inst.free_blocks
