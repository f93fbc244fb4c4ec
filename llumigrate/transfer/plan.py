"""`ChunkPlan`: how one pull's blocks are cut into chunks and laid out in a
staging buffer or a shared-memory ring. Computed identically by both ends
from the `GrantMsg` fields, so only those fields travel."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk i holds blocks [i * chunk_blocks, min(n, (i + 1) * chunk_blocks))
    and, in a ring of `num_slots` slots, lies at byte `slot_offset(i)`."""

    num_blocks: int
    chunk_blocks: int
    bytes_per_block: int  # across all layers
    num_slots: int = 0

    @classmethod
    def make(cls, num_blocks: int, bytes_per_block: int, chunk_bytes: int, max_ring_bytes: int = 0) -> ChunkPlan:
        """Chunks of about `chunk_bytes` (>= 1 block); a ring of at most
        `max_ring_bytes` (>= 2 slots unless one chunk covers everything)."""
        chunk_blocks = max(1, chunk_bytes // bytes_per_block) if bytes_per_block else max(1, num_blocks)
        chunk_blocks = min(chunk_blocks, max(1, num_blocks))
        plan = cls(num_blocks, chunk_blocks, bytes_per_block)
        slot = plan.slot_bytes
        num_slots = min(plan.num_chunks, max(2, max_ring_bytes // slot) if slot else 1)
        return cls(num_blocks, chunk_blocks, bytes_per_block, num_slots)

    def __post_init__(self) -> None:
        if self.num_blocks < 0 or self.chunk_blocks < 1 or self.bytes_per_block < 0 or self.num_slots < 0:
            raise ValueError(f"invalid chunk plan {self}")
        if self.num_chunks and self.num_slots > self.num_chunks:
            raise ValueError(f"{self.num_slots} slots for {self.num_chunks} chunks")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_blocks // self.chunk_blocks)

    @property
    def slot_bytes(self) -> int:
        return self.chunk_blocks * self.bytes_per_block

    @property
    def ring_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def blocks(self, i: int) -> tuple[int, int]:
        """[lo, hi) block indices of chunk i."""
        lo = i * self.chunk_blocks
        return lo, min(self.num_blocks, lo + self.chunk_blocks)

    def chunk_nbytes(self, i: int) -> int:
        lo, hi = self.blocks(i)
        return (hi - lo) * self.bytes_per_block

    def slot_offset(self, i: int) -> int:
        return (i % self.num_slots) * self.slot_bytes
