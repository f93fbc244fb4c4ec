"""Public types of the KV transfer API, shared by the server, the client and
the engine side that calls them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llumigrate.transfer.pacing import MIN_RATE_BYTES_PER_S

# CPU engines. Same host only: "pvm" (the client reads the source's blocks
# with process_vm_readv: one copy; needs ptrace rights) and "shm" (the source
# gathers into shared memory, the client scatters from it). "tcp" works
# anywhere. "auto" picks pvm, else shm, else tcp, by probing each.
CPU_TRANSPORTS = ("pvm", "shm", "tcp")
# CUDA engines (transfer/select.py picks per pair): "ipc" (same host, the
# source's GPU visible here: the client maps the source's KV buffer once and
# copies block ranges device to device) and "nccl" (anywhere: a private
# two-rank communicator per connection). "auto" picks ipc, else nccl.
GPU_TRANSPORTS = ("ipc", "nccl")
# Naming a transport fails the pull when it is unusable.
TRANSPORTS = ("auto", *CPU_TRANSPORTS, *GPU_TRANSPORTS)
# What a CUDA client announces in its Hello for "auto", so that a server
# tells CUDA clients from CPU ones.
GPU_AUTO = "gpu"


@dataclass(frozen=True)
class PullRequest:
    """What a destination asks of a source: `num_blocks` logical blocks of
    request `key`, from logical block `start_block` on.

    `final` marks the last pull of a migration (the provider may fence/wait
    for the request to stop first). `timeout_s` bounds how long the provider
    may block before granting; the server cannot interrupt a provider, so the
    provider must honour it. `max_bytes_per_s` (the puller's own, never
    sent) paces the copy on CPU transports: 0 copies as fast as it can,
    otherwise at least `pacing.MIN_RATE_BYTES_PER_S`. Raises ValueError when a
    field is out of range.
    """

    key: str
    start_block: int
    num_blocks: int
    final: bool = False
    timeout_s: float = 30.0
    max_bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise TypeError(f"key must be a str, got {type(self.key).__name__}")
        if self.start_block < 0 or self.num_blocks < 0:
            raise ValueError(f"start_block and num_blocks must be >= 0, got {self.start_block}, "
                             f"{self.num_blocks}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_bytes_per_s and not self.max_bytes_per_s >= MIN_RATE_BYTES_PER_S:
            raise ValueError(f"max_bytes_per_s must be 0 (no limit) or >= {MIN_RATE_BYTES_PER_S}, "
                             f"got {self.max_bytes_per_s}")


@dataclass(frozen=True)
class Grant:
    """The provider's answer: the source's physical block ids for the pulled
    logical range (exactly `num_blocks` of them, each a valid block of the
    server's layers) and an opaque `payload` handed back to the puller.
    Those blocks must keep their contents until `on_complete` reports this
    grant (the copy happens after the provider returns)."""

    block_ids: list[int]
    payload: bytes = b""


# Called on a server thread for every pull; may block up to req.timeout_s,
# may raise TransferRefused(reason) to refuse.
Provider = Callable[[PullRequest], Grant]
# Called exactly once for every Grant the provider returned: ok=True after the
# client acknowledged its scatter, ok=False when the pull failed after the grant.
CompleteCallback = Callable[[PullRequest, bool], None]
