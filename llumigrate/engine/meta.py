"""Metadata passed between llumigrate's scheduler-side and worker-side
connector halves (inside one vLLM engine; vLLM carries these objects)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llumigrate.engine.params import LoadSpec
from llumigrate.engine.vllm_compat import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadJob:
    """Pull logical blocks [start_block, start_block + len(dest_block_ids)) of
    `spec.src_key` into this engine's `dest_block_ids` for request `req_id`."""

    req_id: str
    spec: LoadSpec
    start_block: int
    dest_block_ids: list[int]
    sync: bool = False   # run in start_load_kv, before this step's forward


@dataclass
class HeldRequest:
    """A tracked source request that was stopped; its blocks stay allocated
    until the worker reports `req_id` as finished sending."""

    req_id: str
    key: str
    tokens: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int]

    @property
    def holds_blocks(self) -> bool:
        """False for a request stopped before it had any KV (nothing to free later)."""
        return bool(self.block_ids)


@dataclass
class SchedulerMeta(KVConnectorMetadata):
    """One step's news from the scheduler to the workers."""

    keys: dict[str, str] = field(default_factory=dict)            # req_id -> key
    block_updates: list[tuple[str, list[int], bool]] = field(default_factory=list)  # (req_id, ids, replace)
    loads: list[LoadJob] = field(default_factory=list)
    held: list[HeldRequest] = field(default_factory=list)
    generator_states: dict[str, bytes] = field(default_factory=dict)  # req_id -> state
    # Restored requests scheduled for the first time in this step: req_id ->
    # the output tokens they had on their source (see engine/restore.py).
    restored_outputs: dict[str, list[int]] = field(default_factory=dict)
    tracked: frozenset[str] = frozenset()                         # keys the scheduler holds on abort
    # The step schedules no tokens: vLLM steps only to poll the connector
    # (loads in flight, blocks held), and the worker may wait for news.
    idle: bool = False


@dataclass
class WorkerMeta(KVConnectorWorkerMetadata):
    """One step's news from the workers to the scheduler."""

    track: set[str] = field(default_factory=set)
    untrack: set[str] = field(default_factory=set)
    failed_loads: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, WorkerMeta)
        return WorkerMeta(self.track | other.track, self.untrack | other.untrack,
                          self.failed_loads | other.failed_loads)
