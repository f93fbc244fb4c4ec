"""The ipc/nccl half of the pull protocol, for workers whose KV is on CUDA.

Handshake, after the usual Challenge/Hello (a CUDA client announces "ipc",
"nccl" or GPU_AUTO): server → `Accept("gpu")` then a `gpu_offer` frame (its
`Endpoint`, and its IPC export when the client is on this host); client →
`gpu_pick` (from `select.choose_transport`); for nccl, server → `gpu_nccl`
(a fresh unique id) and both ends join a two-rank communicator. Per pull, as
for pvm: client → Pull; server → GrantMsg (ipc: the source block ids); ipc:
the client copies from its mapping of the source's KV; nccl: the server
gathers each chunk on its side stream and sends it, the client receives and
scatters; last, client → Ack. GPU frames use the wire framing (4-byte length,
msgpack map with "t"), never pickle; they are read only by this module.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import torch

from llumigrate.errors import TransferError
from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import gather_blocks
from llumigrate.transfer import nccl
from llumigrate.transfer.api import GPU_AUTO, GPU_TRANSPORTS, Grant
from llumigrate.transfer.channel import Channel
from llumigrate.transfer.cuda_ipc import export_layers, gpu_uuid, visible_gpus
from llumigrate.transfer.gpu_stream import run_on_side_stream
from llumigrate.transfer.plan import ChunkPlan
from llumigrate.transfer.select import Endpoint
from llumigrate.transfer.wire import MAX_FRAME, Accept, Ack, GrantMsg, Hello, host_id

# Field types of each GPU frame.
FRAMES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "gpu_offer": {"endpoint": dict, "ipc": (dict, type(None))},
    "gpu_pick": {"transport": str},
    "gpu_nccl": {"uid": bytes},
}
CHUNK_BYTES = 64 << 20  # nccl: bytes gathered and sent per chunk
MIN_COPY_RATE = 1e9      # bytes/s a GPU pull must at least move before an ack times out


def send_frame(chan: Channel, timeout: float, t: str, **fields: Any) -> None:
    assert set(fields) == set(FRAMES[t]), (t, fields)
    body = msgpack.packb({"t": t, **fields}, use_bin_type=True)
    chan.send_bytes(len(body).to_bytes(4, "big") + body, timeout, t)


def recv_frame(chan: Channel, timeout: float, t: str) -> dict[str, Any]:
    """The next frame, which must be a well-formed `t`; TransferError otherwise."""
    header = bytearray(4)
    chan.recv_into(memoryview(header), timeout, "a frame header")
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise TransferError(f"{chan.peer} sent a {size}-byte control frame (max {MAX_FRAME})")
    body = bytearray(size)
    chan.recv_into(memoryview(body), timeout, t)
    try:
        d = msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise TransferError(f"bad frame from {chan.peer}: {e}") from None
    if not isinstance(d, dict) or d.get("t") != t:
        raise TransferError(f"expected {t!r} from {chan.peer}, got {d.get('t') if isinstance(d, dict) else d!r}")
    for name, kind in FRAMES[t].items():
        if not isinstance(d.get(name), kind):
            raise TransferError(f"{t}.{name} from {chan.peer} is {type(d.get(name)).__name__}")
    return d


def is_cuda(layers: list[torch.Tensor]) -> bool:
    return bool(layers) and layers[0].is_cuda


def local_endpoint(layers: list[torch.Tensor]) -> Endpoint:
    """This worker as a peer sees it."""
    if not is_cuda(layers):
        return Endpoint(host_id(), os.getpid())
    return Endpoint(host_id(), os.getpid(), "cuda", gpu_uuid(layers[0].device), visible_gpus(), nccl.available())


def refusal(layers: list[torch.Tensor], hello_transport: str) -> str | None:
    """Why a server over `layers` refuses a client announcing `hello_transport`."""
    gpu_client = hello_transport in (GPU_AUTO, *GPU_TRANSPORTS)
    if is_cuda(layers) and not gpu_client:
        return f"KV here is on cuda; {hello_transport!r} is a CPU transport"
    if not is_cuda(layers) and gpu_client:
        return f"KV here is on the CPU; {hello_transport!r} is a CUDA transport"
    return None


class GpuServerLink:
    """The server side of one GPU connection (owned by its ServerSession)."""

    def __init__(self, chan: Channel, layers: list[torch.Tensor], transport: str, io_timeout_s: float,
                 comm: nccl.PairComm | None = None) -> None:
        self.chan, self.layers, self.transport, self.io = chan, layers, transport, io_timeout_s
        self.comm = comm
        self.bytes_per_block = KVLayout.from_layers(layers).bytes_per_block

    @classmethod
    def accept(cls, chan: Channel, layers: list[torch.Tensor], hello: Hello, io: float) -> GpuServerLink:
        """Run the GPU handshake after a Hello that `refusal` accepted."""
        chan.send(Accept("gpu", b"", None, 0, []), io)
        same_host = hello.host_id == host_id()
        send_frame(chan, io, "gpu_offer", endpoint=local_endpoint(layers).to_wire(),
                   ipc=export_layers(layers) if same_host else None)
        pick = recv_frame(chan, io, "gpu_pick")["transport"]
        if pick == "ipc" and same_host:
            return cls(chan, layers, "ipc", io)
        if pick == "nccl":
            uid = nccl.unique_id()
            send_frame(chan, io, "gpu_nccl", uid=uid)
            return cls(chan, layers, "nccl", io, nccl.PairComm(uid, 0, layers[0].device))
        raise TransferError(f"client picked unusable GPU transport {pick!r}")

    def send_blocks(self, seq: int, grant: Grant) -> bool:
        """Serve one granted pull; True when the client acked its copy."""
        ids = torch.tensor(grant.block_ids, dtype=torch.int64)
        # NOTE: the engine may still be writing these blocks on any of its
        # streams; wait for all queued work on the device before they leave.
        torch.cuda.synchronize(self.layers[0].device)
        nbytes = len(ids) * self.bytes_per_block
        if self.transport == "ipc":
            self.chan.send(GrantMsg(seq, len(ids), max(1, len(ids)), grant.payload, None, 0, 0,
                                    ids.numpy().astype("<i8").tobytes()), self.io)
        else:
            plan = ChunkPlan.make(len(ids), self.bytes_per_block, CHUNK_BYTES)
            self.chan.send(GrantMsg(seq, plan.num_blocks, plan.chunk_blocks, grant.payload, None, 0, 0, b""),
                           self.io)
            run_on_side_stream(self.layers[0].device, lambda: self._send_chunks(plan, ids))
        ack = self.chan.recv(self.io + nbytes / MIN_COPY_RATE, Ack)
        if ack.seq != seq:
            raise TransferError(f"unexpected ack {ack.seq}/{ack.ok} for pull {seq}")
        return ack.ok

    def _send_chunks(self, plan: ChunkPlan, ids: torch.Tensor) -> None:
        assert self.comm is not None
        staging = torch.empty(plan.slot_bytes, dtype=torch.uint8, device=self.layers[0].device)
        for i in range(plan.num_chunks):
            lo, hi = plan.blocks(i)
            chunk = staging[:plan.chunk_nbytes(i)]
            gather_blocks(self.layers, ids[lo:hi], chunk)
            self.comm.send(chunk)

    def close(self, failed: bool = False) -> None:
        if self.comm is not None:
            self.comm.close(abort=failed)
