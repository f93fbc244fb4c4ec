"""Immutable snapshots of the cluster that every scheduling policy reads.

The scheduler shell builds one `ClusterSnapshot` from the latest load report
of each instance plus the controller's own request table; policies never see
anything else. Snapshots are frozen: "what if" questions (a dispatch not yet
reported, a planned migration) are answered by building a new snapshot with
`with_waiting`, `without_request` / `with_running` or `ClusterSnapshot.with_instances`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal

Status = Literal["running", "waiting"]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens (vLLM blocks are fixed-size)."""
    assert block_size > 0 and num_tokens >= 0
    return math.ceil(num_tokens / block_size)


@dataclass(frozen=True)
class RequestSnapshot:
    """One in-flight request as the controller knows it.

    `priority`: vLLM's, unchanged: lower values are served first (more
    important); 0 is vLLM's default.
    `migrating`: a migration of it is in flight (it is still listed on its
    source). `migratable`: the controller would accept `Cluster.migrate` for
    it now (prefill done, no sampling feature that cannot be carried).
    `decode_tokens_per_s`: how fast it is generating lately, as measured by
    the controller (None when not yet known).
    """

    request_id: str
    instance_id: str
    priority: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    max_tokens: int | None = None
    status: Status = "running"
    migrating: bool = False
    migratable: bool = True
    decode_tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        assert self.num_prompt_tokens >= 0 and self.num_output_tokens >= 0
        assert self.status in ("running", "waiting"), self.status

    @property
    def num_tokens(self) -> int:
        """Context length: prompt plus generated tokens (what its KV holds)."""
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def remaining_tokens(self) -> int | None:
        """Tokens still to generate at most; None when unbounded."""
        if self.max_tokens is None:
            return None
        return max(0, self.max_tokens - self.num_output_tokens)

    def blocks(self, block_size: int) -> int:
        """Blocks its context occupies on an instance of that block size."""
        return blocks_for(self.num_tokens, block_size)


@dataclass(frozen=True)
class InstanceSnapshot:
    """One instance's last load report plus the requests placed on it.

    `free_blocks` is of `num_blocks` (usable blocks). `waiting_demand_blocks`
    is what the queued requests need to start; `head_waiting_blocks` what the
    first of them needs (0 when none waits). `migrations_in`/`_out` count
    migrations in flight with this instance as destination/source.
    `num_running` comes from the engine and may exceed the listed requests
    (migration carriers run there too).
    """

    instance_id: str
    num_blocks: int
    free_blocks: int
    block_size: int = 16
    num_running: int = 0
    num_waiting: int = 0
    waiting_demand_blocks: int = 0
    head_waiting_blocks: int = 0
    draining: bool = False
    up: bool = True
    migrations_in: int = 0
    migrations_out: int = 0
    requests: tuple[RequestSnapshot, ...] = ()
    reported_at: float = 0.0
    head_waiting_id: str | None = None   # the head of the queue, when the controller knows it

    def __post_init__(self) -> None:
        assert self.block_size > 0 and self.num_blocks >= 0
        assert min(self.num_running, self.num_waiting, self.waiting_demand_blocks,
                   self.head_waiting_blocks, self.migrations_in, self.migrations_out) >= 0
        assert all(r.instance_id == self.instance_id for r in self.requests)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 1.0

    @property
    def running(self) -> tuple[RequestSnapshot, ...]:
        return tuple(r for r in self.requests if r.status == "running")

    def with_waiting(self, req: RequestSnapshot) -> InstanceSnapshot:
        """This instance after `req` was dispatched to it (queued, not started)."""
        need = req.blocks(self.block_size)
        req = replace(req, instance_id=self.instance_id, status="waiting")
        head_id = self.head_waiting_id if self.head_waiting_blocks else req.request_id
        return replace(self, num_waiting=self.num_waiting + 1,
                       waiting_demand_blocks=self.waiting_demand_blocks + need,
                       head_waiting_blocks=self.head_waiting_blocks or need,
                       head_waiting_id=head_id, requests=self.requests + (req,))

    def without_waiting(self, req: RequestSnapshot) -> InstanceSnapshot:
        """This instance after queued request `req` left it (re-dispatched);
        the next queued request it lists becomes the head."""
        rest = tuple(r for r in self.requests if r.request_id != req.request_id)
        assert len(rest) == len(self.requests) - 1 and req.status == "waiting"
        head_blocks, head_id = self.head_waiting_blocks, self.head_waiting_id
        if head_id == req.request_id:
            head = next((r for r in rest if r.status == "waiting"), None)
            head_blocks = head.blocks(self.block_size) if head else 0
            head_id = head.request_id if head else None
        return replace(self, num_waiting=max(0, self.num_waiting - 1),
                       waiting_demand_blocks=max(0, self.waiting_demand_blocks - req.blocks(self.block_size)),
                       head_waiting_blocks=head_blocks, head_waiting_id=head_id, requests=rest)

    @property
    def queue(self) -> tuple[RequestSnapshot, ...]:
        """The queued requests listed here, in vLLM's order: the head first,
        then the others as listed (the shell lists them in queue order)."""
        waiting = [r for r in self.requests if r.status == "waiting"]
        return tuple(sorted(waiting, key=lambda r: r.request_id != self.head_waiting_id))

    @property
    def head_waiting(self) -> RequestSnapshot | None:
        """The queued request at the head, when it is listed here."""
        return next((r for r in self.requests if r.request_id == self.head_waiting_id
                     and r.status == "waiting"), None)

    def without_request(self, req: RequestSnapshot) -> InstanceSnapshot:
        """This instance after running request `req` left it (blocks freed)."""
        rest = tuple(r for r in self.requests if r.request_id != req.request_id)
        assert len(rest) == len(self.requests) - 1 and req.status == "running"
        free = min(self.num_blocks, self.free_blocks + req.blocks(self.block_size))
        return replace(self, free_blocks=free, num_running=max(0, self.num_running - 1),
                       requests=rest)

    def with_running(self, req: RequestSnapshot) -> InstanceSnapshot:
        """This instance after running request `req` arrived (blocks taken)."""
        req = replace(req, instance_id=self.instance_id, status="running")
        return replace(self, free_blocks=self.free_blocks - req.blocks(self.block_size),
                       num_running=self.num_running + 1, requests=self.requests + (req,))


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every instance at time `now` (the scheduler's clock, seconds)."""

    instances: tuple[InstanceSnapshot, ...]
    now: float = 0.0
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {inst.instance_id: n for n, inst in enumerate(self.instances)}
        assert len(index) == len(self.instances), "instance ids must be unique"
        object.__setattr__(self, "_index", index)

    def __getitem__(self, instance_id: str) -> InstanceSnapshot:
        return self.instances[self._index[instance_id]]

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._index

    def request(self, request_id: str) -> RequestSnapshot:
        return next(r for r in self.requests() if r.request_id == request_id)

    def requests(self) -> Iterator[RequestSnapshot]:
        for inst in self.instances:
            yield from inst.requests

    def with_instances(self, *updated: InstanceSnapshot) -> ClusterSnapshot:
        """A snapshot with those instances (matched by id) swapped in."""
        new = list(self.instances)
        for inst in updated:
            new[self._index[inst.instance_id]] = inst
        return ClusterSnapshot(tuple(new), self.now)

    def with_dispatch(self, instance_id: str, req: RequestSnapshot) -> ClusterSnapshot:
        """The snapshot after dispatching `req` to `instance_id`.

        The shell applies every dispatch to its snapshot until the instance's
        next report supersedes it, so a burst of requests between two reports
        spreads instead of piling onto the instance that looked freest."""
        return self.with_instances(self[instance_id].with_waiting(req))
