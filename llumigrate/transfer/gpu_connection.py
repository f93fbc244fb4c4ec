"""`GpuConnection`: the client side of one connection between CUDA workers
(protocol in `gpu_link`): picks ipc or nccl for the pair, then runs one pull
at a time straight into the client's device blocks. Same interface as
`ClientConnection`, so `KVClient` pools both alike."""

from __future__ import annotations

import torch

from llumigrate.errors import TransferError, TransferRefused
from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import scatter_blocks
from llumigrate.transfer import nccl
from llumigrate.transfer.api import PullRequest
from llumigrate.transfer.channel import Channel, client_hello
from llumigrate.transfer.cuda_ipc import PEERS, IpcMapping, ipc_copy
from llumigrate.transfer.gpu_link import local_endpoint, recv_frame, send_frame
from llumigrate.transfer.gpu_stream import run_on_side_stream
from llumigrate.transfer.plan import ChunkPlan
from llumigrate.transfer.select import Endpoint, choose_transport, hello_transport
from llumigrate.transfer.wire import Ack, Failed, GrantMsg, Pull, Refuse


class GpuConnection:
    """Not thread-safe: the client hands each connection to one pull at a time.
    `healthy` as in ClientConnection; `transport` is "ipc" or "nccl"."""

    def __init__(self, chan: Channel, layers: list[torch.Tensor], layout: KVLayout, io_timeout_s: float) -> None:
        self.chan, self.layers, self.layout, self.io = chan, layers, layout, io_timeout_s
        self.device = layers[0].device
        self.transport = ""
        self.server_pid = 0
        self.healthy = False
        self._seq = 0
        self._ipc: tuple[tuple, IpcMapping] | None = None
        self._comm: nccl.PairComm | None = None

    @classmethod
    def open(cls, address: tuple[str, int], token: str | None, transport: str, layers: list[torch.Tensor],
             layout: KVLayout, io_timeout_s: float) -> GpuConnection:
        """Connect and handshake. Raises TransferRefused when the server
        refuses us, TransferError on anything else (no usable transport)."""
        conn = cls(Channel.connect(address, io_timeout_s), layers, layout, io_timeout_s)
        try:
            conn._handshake(token, transport)
        except BaseException:
            conn.close()
            raise
        conn.healthy = True
        return conn

    def _handshake(self, token: str | None, transport: str) -> None:
        io = self.io
        reply, self.server_pid = client_hello(self.chan, io, token, self.layout, hello_transport(transport, "cuda"))
        if reply.transport != "gpu":
            raise TransferError(f"KV server {self.chan.peer} does not serve CUDA KV (it offered {reply.transport})")
        offer = recv_frame(self.chan, io, "gpu_offer")
        remote = Endpoint.from_wire(offer["endpoint"])
        pick = choose_transport(transport, local_endpoint(self.layers), remote)
        if pick == "ipc" and offer["ipc"] is None:
            raise TransferError(f"KV server {self.chan.peer} sent no IPC export")
        send_frame(self.chan, io, "gpu_pick", transport=pick)
        if pick == "ipc":
            self._ipc = PEERS.acquire(offer["ipc"], self.device)
        else:
            self._comm = nccl.PairComm(recv_frame(self.chan, io, "gpu_nccl")["uid"], 1, self.device)
        self.transport = pick

    def pull(self, req: PullRequest, dest: torch.Tensor) -> bytes:
        """Run one pull into blocks `dest` (int64, validated); returns the
        payload once the blocks have landed on the device."""
        self.healthy = False
        self._seq += 1
        seq, io = self._seq, self.io
        self.chan.send(Pull(seq, req.key, req.start_block, req.num_blocks, req.final, req.timeout_s), io)
        reply = self.chan.recv_any(req.timeout_s + io, GrantMsg, Refuse, Failed)
        assert isinstance(reply, (GrantMsg, Refuse, Failed))
        if reply.seq != seq:
            raise TransferError(f"reply to pull {reply.seq} while waiting for pull {seq}")
        if not isinstance(reply, GrantMsg):
            self.healthy = True  # the connection stays usable after a refused or failed pull
            raise (TransferRefused if isinstance(reply, Refuse) else TransferError)(reply.reason)
        if reply.num_blocks != req.num_blocks:
            raise TransferError(f"source granted {reply.num_blocks} blocks for {req.num_blocks}")
        try:
            if self.transport == "ipc":
                self._copy_ipc(reply, dest)
            else:
                self._recv_nccl(reply, dest)
        except RuntimeError as e:  # a copy failed (NcclError is not one: the link is broken then)
            reason = str(e).splitlines()[0]
            self.chan.send(Ack(seq, False, reason), io)
            raise TransferError(reason) from e
        self.chan.send(Ack(seq, True, ""), io)
        self.healthy = True
        return reply.payload

    def _copy_ipc(self, grant: GrantMsg, dest: torch.Tensor) -> None:
        if len(grant.block_ids) != 8 * grant.num_blocks:
            raise TransferError(f"bad grant: {len(grant.block_ids)} bytes of ids for {grant.num_blocks} blocks")
        if grant.num_blocks:
            assert self._ipc is not None
            src = torch.frombuffer(bytearray(grant.block_ids), dtype=torch.int64)
            ipc_copy(self._ipc[1], src, dest, self.layers)

    def _recv_nccl(self, grant: GrantMsg, dest: torch.Tensor) -> None:
        try:
            plan = ChunkPlan(grant.num_blocks, grant.chunk_blocks, self.layout.bytes_per_block)
        except ValueError as e:
            raise TransferError(f"bad grant: {e}") from None
        comm = self._comm
        assert comm is not None

        def receive() -> None:
            staging = torch.empty(plan.slot_bytes, dtype=torch.uint8, device=self.device)
            for i in range(plan.num_chunks):
                lo, hi = plan.blocks(i)
                chunk = staging[:plan.chunk_nbytes(i)]
                comm.recv(chunk)
                scatter_blocks(chunk, dest[lo:hi], self.layers)

        run_on_side_stream(self.device, receive)

    def close(self) -> None:
        """Release the peer's IPC mapping (unmapped with its last user), end
        the communicator (aborted after a failure) and the socket."""
        if self._ipc is not None:
            PEERS.release(self._ipc[0])
            self._ipc = None
        if self._comm is not None:
            self._comm.close(abort=not self.healthy)
            self._comm = None
        self.chan.close()
