"""`ClientConnection`: the client side of one connection to a KV server:
handshake, then one pull at a time, each scattered straight into the
client's blocks (from the server's shared-memory ring, or from a staging
buffer filled from the socket)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llumigrate.errors import TransferError, TransferRefused
from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import read_remote_blocks, scatter_blocks
from llumigrate.transfer.api import PullRequest
from llumigrate.transfer.channel import Channel, client_hello
from llumigrate.transfer.pacing import Pacer, pieces
from llumigrate.transfer.plan import ChunkPlan
from llumigrate.transfer.shm import Segment, pid_alive, remove_stale_segments, unlink
from llumigrate.transfer.wire import (
    Accept,
    Ack,
    ChunkReady,
    Consumed,
    Failed,
    GrantMsg,
    Pull,
    Ready,
    Refuse,
)

logger = logging.getLogger(__name__)

FAULT_KINDS = ("drop", "stall")
# A paced pvm pull reads this much per call, then sleeps as the pacer says.
PACED_PIECE_BYTES = 4 << 20


@dataclass(frozen=True)
class InjectedFault:
    """A one-shot transfer fault (stress testing only; see `KVClient.arm_fault`).

    drop: the connection is closed right after the source granted the pull.
    stall: the connection goes silent for `seconds` after the grant, then the
    pull fails as a timed-out one would. Either way the source sees the
    connection end mid-pull and the pull fails with TransferError."""

    kind: str
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.seconds < 0:
            raise ValueError(f"fault seconds must be >= 0, got {self.seconds}")


class ClientConnection:
    """Not thread-safe: the client hands each connection to one pull at a time.

    `healthy` is True between pulls when the connection can be reused (a
    refused or failed pull leaves it healthy; any I/O or protocol error not).
    """

    def __init__(self, chan: Channel, layers: list[torch.Tensor], layout: KVLayout, num_threads: int,
                 io_timeout_s: float) -> None:
        self.chan, self.layers, self.layout = chan, layers, layout
        self.num_threads, self.io = num_threads, io_timeout_s
        self.transport = ""
        self.server_pid = 0
        self.healthy = False
        self._seq = 0
        self._segment: Segment | None = None
        self._layer_addrs: list[int] = []  # pvm: the server's layer addresses
        self._staging: tuple[bytearray, torch.Tensor] | None = None

    @classmethod
    def open(cls, address: tuple[str, int], token: str | None, transport: str, layers: list[torch.Tensor],
             layout: KVLayout, num_threads: int, io_timeout_s: float) -> ClientConnection:
        """Connect and handshake. Raises TransferRefused when the server
        refuses us (token, layout), TransferError on anything else."""
        conn = cls(Channel.connect(address, io_timeout_s), layers, layout, num_threads, io_timeout_s)
        try:
            conn._handshake(token, transport)
        except BaseException:
            conn.close()
            raise
        conn.healthy = True
        return conn

    def _handshake(self, token: str | None, transport: str) -> None:
        io = self.io
        reply, self.server_pid = client_hello(self.chan, io, token, self.layout, transport)
        if reply.transport != "local":
            if transport not in ("auto", "tcp"):
                raise TransferError(f"KV server {self.chan.peer} offers only tcp, not {transport}")
            self.transport = "tcp"
            return
        self.transport = self._pick_local(reply, transport)
        self.chan.send(Ready(self.transport), io)

    def _pick_local(self, accept: Accept, transport: str) -> str:
        """The first usable of pvm and shm that `transport` allows, else tcp
        for "auto"; raises TransferError when the named one is unusable."""
        problems = []
        for name, probe in (("pvm", self._probe_pvm), ("shm", self._probe_shm)):
            if transport in ("auto", name):
                problem = probe(accept)
                if problem is None:
                    return name
                problems.append(f"{name}: {problem}")
        if transport != "auto":
            raise TransferError(f"{transport} transport to {self.chan.peer} unusable: {'; '.join(problems)}")
        logger.info("same-host transports to %s unusable (%s); using tcp", self.chan.peer, "; ".join(problems))
        return "tcp"

    def _probe_pvm(self, accept: Accept) -> str | None:
        """Read the server's probe bytes out of its memory; None when it works."""
        addrs = accept.layer_addrs
        if len(addrs) != len(self.layers) or not all(isinstance(a, int) and a > 0 for a in addrs):
            return "bad layer addresses"
        local = torch.zeros(1, len(accept.probe), dtype=torch.uint8)
        try:
            read_remote_blocks(self.server_pid, [accept.probe_addr], [0], [0], [local])
        except RuntimeError as e:
            return str(e).splitlines()[0]
        if bytes(local[0].tolist()) != accept.probe:
            return f"process {self.server_pid} here is not the server"
        self._layer_addrs = list(addrs)
        return None

    def _probe_shm(self, accept: Accept) -> str | None:
        """Open the server's probe segment; None when it holds the probe."""
        if accept.segment is None:
            return "no probe segment"
        try:
            seg = Segment.open(accept.segment, len(accept.probe), creator_pid=self.server_pid)
        except (OSError, ValueError) as e:
            return f"cannot map {accept.segment}: {e}"
        assert seg.tensor is not None
        if bytes(seg.tensor[: len(accept.probe)].tolist()) != accept.probe:
            seg.close()
            return f"{accept.segment} is another host's segment"
        self._segment = seg
        return None

    # -- one pull ----------------------------------------------------------------
    def pull(self, req: PullRequest, dest: torch.Tensor, fault: InjectedFault | None = None) -> bytes:
        """Run one pull into blocks `dest` (int64, validated); returns the payload.
        With `fault`, the pull fails mid-transfer as the fault says (the
        connection is unusable afterwards)."""
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
        if fault is not None:
            self._fail_injected(fault)
        plan = self._plan(reply, req)
        pacer = Pacer(req.max_bytes_per_s)
        try:
            if self.transport == "pvm":
                self._read_pvm(reply, dest, pacer)
            elif self.transport == "shm":
                self._recv_shm(reply, plan, dest, pacer)
            else:
                self._recv_tcp(plan, dest, pacer)
        except RuntimeError as e:  # a copy op failed: tell the server, drop the connection
            reason = str(e).splitlines()[0]
            self.chan.send(Ack(seq, False, reason), io)
            raise TransferError(reason) from e
        self.chan.send(Ack(seq, True, ""), io)
        self.healthy = True
        return reply.payload

    def _fail_injected(self, fault: InjectedFault) -> None:
        if fault.kind == "stall":
            time.sleep(fault.seconds)
        self.chan.shutdown()
        raise TransferError(f"connection {fault.kind} (injected fault"
                            + (f", {fault.seconds:.1f}s)" if fault.kind == "stall" else ")"))

    def _plan(self, grant: GrantMsg, req: PullRequest) -> ChunkPlan:
        if grant.num_blocks != req.num_blocks:
            raise TransferError(f"source granted {grant.num_blocks} blocks for {req.num_blocks}")
        try:
            plan = ChunkPlan(grant.num_blocks, grant.chunk_blocks, self.layout.bytes_per_block, grant.num_slots)
        except ValueError as e:
            raise TransferError(f"bad grant: {e}") from None
        if self.transport == "shm" and plan.num_chunks and (plan.num_slots < 1 or grant.segment is None
                                                            or grant.segment_size < plan.ring_bytes):
            raise TransferError(f"bad grant: ring of {plan.num_slots} slots in {grant.segment_size} bytes")
        return plan

    def _recv_shm(self, grant: GrantMsg, plan: ChunkPlan, dest: torch.Tensor, pacer: Pacer) -> None:
        """Scatter every chunk as it is ready; report a slot free (`Consumed`)
        only when the server will write it again."""
        if plan.num_chunks == 0:
            return
        assert grant.segment is not None
        ring = self._map(grant.segment, grant.segment_size)
        for i in range(plan.num_chunks):
            msg = self.chan.recv_any(self.io, ChunkReady, Failed)
            if isinstance(msg, Failed):
                raise TransferError(f"source failed mid-pull: {msg.reason}")
            assert isinstance(msg, ChunkReady)
            if msg.seq != grant.seq or msg.index != i:
                raise TransferError(f"chunk {msg.seq}/{msg.index} out of order, expected {grant.seq}/{i}")
            lo, hi = plan.blocks(i)
            off = plan.slot_offset(i)
            scatter_blocks(ring[off:off + plan.chunk_nbytes(i)], dest[lo:hi], self.layers, self.num_threads)
            pacer.spent(plan.chunk_nbytes(i))
            if i + plan.num_slots < plan.num_chunks:
                self.chan.send(Consumed(grant.seq, i), self.io)

    def _read_pvm(self, grant: GrantMsg, dest: torch.Tensor, pacer: Pacer) -> None:
        """Read the granted blocks out of the server: in one call, or paced in
        pieces of PACED_PIECE_BYTES."""
        if len(grant.block_ids) != 8 * grant.num_blocks:
            raise TransferError(f"bad grant: {len(grant.block_ids)} bytes of ids for {grant.num_blocks} blocks")
        if not grant.num_blocks:
            return
        src = torch.frombuffer(bytearray(grant.block_ids), dtype=torch.int64)
        bpb = self.layout.bytes_per_block
        step = max(1, PACED_PIECE_BYTES // bpb) if pacer.limited else grant.num_blocks
        for lo, hi in pieces(grant.num_blocks, step):
            read_remote_blocks(self.server_pid, self._layer_addrs, src[lo:hi], dest[lo:hi], self.layers,
                               self.num_threads)
            pacer.spent((hi - lo) * bpb)

    def _recv_tcp(self, plan: ChunkPlan, dest: torch.Tensor, pacer: Pacer) -> None:
        raw, staging = self._staging_for(plan.slot_bytes)
        view = memoryview(raw)
        for i in range(plan.num_chunks):
            lo, hi = plan.blocks(i)
            n = plan.chunk_nbytes(i)
            self.chan.recv_into(view[:n], self.io)
            scatter_blocks(staging[:n], dest[lo:hi], self.layers, self.num_threads)
            pacer.spent(n)

    def _map(self, name: str, size: int) -> torch.Tensor:
        """The server's ring, mapped once per segment (remapped on growth)."""
        seg = self._segment
        if seg is None or seg.name != name or seg.size < size:
            if seg is not None:
                seg.close()
            self._segment = None
            try:
                seg = Segment.open(name, size, creator_pid=self.server_pid)
            except (OSError, ValueError) as e:
                raise TransferError(f"cannot map the source's segment {name}: {e}") from e
            self._segment = seg
        assert seg.tensor is not None
        return seg.tensor

    def _staging_for(self, nbytes: int) -> tuple[bytearray, torch.Tensor]:
        if self._staging is None or len(self._staging[0]) < nbytes:
            raw = bytearray(max(nbytes, 1))
            self._staging = raw, torch.frombuffer(raw, dtype=torch.uint8)
        return self._staging

    def close(self) -> None:
        """Drop mappings and the socket. After a failure, also unlink this
        connection's segment (no one else uses it; a server that was killed
        cannot) and any other segment of the server if it has died."""
        if self._segment is not None:
            if not self.healthy:
                unlink(self._segment.name)
            self._segment.close()
            self._segment = None
        self._staging = None
        self.chan.close()
        if self.transport == "shm" and not self.healthy and self.server_pid and not pid_alive(self.server_pid):
            removed = remove_stale_segments(self.server_pid)
            if removed:
                logger.info("removed %d segments of dead KV server %d", len(removed), self.server_pid)
