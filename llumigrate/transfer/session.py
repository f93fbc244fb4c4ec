"""`ServerSession`: the server side of one client connection.

Runs on its own thread: handshake, then pulls until the client leaves, the
connection idles out or the server closes. A failing pull (refused, provider
error, peer gone) never affects other sessions. The session owns its
shared-memory segment and staging buffer and frees both when it ends.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from typing import TYPE_CHECKING

import torch

from llumigrate.errors import TransferError, TransferRefused
from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import gather_blocks, layer_addresses
from llumigrate.transfer import gpu_link
from llumigrate.transfer.api import GPU_AUTO, TRANSPORTS, Grant, PullRequest
from llumigrate.transfer.channel import Channel
from llumigrate.transfer.plan import ChunkPlan
from llumigrate.transfer.shm import Segment
from llumigrate.transfer.wire import (
    MAX_FRAME,
    VERSION,
    Accept,
    Ack,
    Challenge,
    ChunkReady,
    Consumed,
    Failed,
    GrantMsg,
    Hello,
    Pull,
    Ready,
    Refuse,
    host_id,
    mac,
)

if TYPE_CHECKING:
    from llumigrate.transfer.server import KVServer

logger = logging.getLogger(__name__)

MIN_COPY_RATE = 100e6  # bytes/s a pvm client must at least read before we give up on its ack


class ServerSession:
    def __init__(self, server: KVServer, chan: Channel) -> None:
        self.server, self.chan = server, chan
        self.cfg = server.config
        self.transport = ""
        self.segment: Segment | None = None
        self._probe: torch.Tensor | None = None  # read by the client's pvm probe
        self._staging: tuple[bytearray, torch.Tensor] | None = None
        self.gpu: gpu_link.GpuServerLink | None = None  # CUDA KV: ipc/nccl

    def run(self) -> None:
        """Serve until the connection ends; never raises."""
        try:
            if not self._handshake():
                return
            while not self.server.closed:
                self._serve(self.chan.recv(self.cfg.idle_timeout_s, Pull))
        except TransferError as e:
            if not self.server.closed:
                logger.debug("KV connection from %s ended: %s", self.chan.peer, e)
        except Exception:  # a bug ends this connection only, never the server
            logger.exception("KV connection from %s crashed", self.chan.peer)
        finally:
            if self.gpu is not None:
                self.gpu.close(failed=True)
            self._set_segment(None)
            self._staging = self._probe = None
            self.chan.close()

    def stop(self) -> None:
        """From another thread: wake the session and unlink its segment."""
        self.chan.shutdown()
        if self.segment is not None:
            self.segment.unlink()

    # -- handshake -------------------------------------------------------------
    def _handshake(self) -> bool:
        io = self.cfg.io_timeout_s
        nonce = secrets.token_bytes(16)
        self.chan.send(Challenge(VERSION, nonce, host_id(), os.getpid()), io)
        hello = self.chan.recv(io, Hello)
        reason = self._check_hello(hello, nonce)
        if reason is not None:
            logger.warning("refused KV client %s: %s", self.chan.peer, reason)
            self.chan.send(Refuse(-1, reason), io)
            return False
        if gpu_link.is_cuda(self.server.layers):
            self.gpu = gpu_link.GpuServerLink.accept(self.chan, self.server.layers, hello, io)
            self.transport = self.gpu.transport
            return True
        if hello.transport == "tcp" or (hello.transport == "auto" and not self._same_host(hello)):
            self.transport = "tcp"
            self.chan.send(Accept("tcp", b"", None, 0, []), io)
            return True
        # Same host (or the client insists): offer pvm and shm, let it probe.
        probe = secrets.token_bytes(16)
        seg = self._set_segment(Segment.create(len(probe)))
        assert seg.tensor is not None
        seg.tensor[: len(probe)] = self._probe = torch.frombuffer(bytearray(probe), dtype=torch.uint8)
        self.chan.send(Accept("local", probe, seg.name, self._probe.data_ptr(),
                              layer_addresses(self.server.layers)), io)
        self.transport = self.chan.recv(io, Ready).transport
        if self.transport not in ("pvm", "shm", "tcp"):
            raise TransferError(f"client picked unknown transport {self.transport!r}")
        if self.transport != "shm":
            self._set_segment(None)
        return True

    def _check_hello(self, hello: Hello, nonce: bytes) -> str | None:
        if hello.version != VERSION:
            return f"protocol version {hello.version} is not this server's {VERSION}"
        if self.cfg.token and not hmac.compare_digest(hello.auth, mac(self.cfg.token, nonce)):
            return "bad token"
        if hello.transport not in (*TRANSPORTS, GPU_AUTO):
            return f"unknown transport {hello.transport!r}; known: {TRANSPORTS}"
        reason = gpu_link.refusal(self.server.layers, hello.transport)
        if reason is not None:
            return reason
        try:
            theirs = KVLayout.from_wire(hello.layout)
        except ValueError as e:
            return f"malformed KV layout: {e}"
        return self.server.layout.mismatch(theirs)

    def _same_host(self, hello: Hello) -> bool:
        if hello.host_id == host_id():
            return True
        try:
            return ipaddress.ip_address(self.chan.sock.getpeername()[0]).is_loopback
        except (OSError, ValueError):
            return False

    # -- pulls -----------------------------------------------------------------
    def _serve(self, msg: Pull) -> None:
        try:
            req = PullRequest(msg.key, msg.start_block, msg.num_blocks, msg.final, float(msg.timeout_s))
        except ValueError as e:
            self.chan.send(Failed(msg.seq, f"invalid pull: {e}"), self.cfg.io_timeout_s)
            return
        grant = self._ask_provider(msg.seq, req)
        if grant is None:
            return
        ok = False
        try:
            ok = self._send_blocks(msg.seq, grant)
        finally:
            self.server.complete(req, ok)

    def _ask_provider(self, seq: int, req: PullRequest) -> Grant | None:
        """The validated grant, or None after telling the client why not."""
        io = self.cfg.io_timeout_s
        try:
            grant = self.server.provider(req)
        except TransferRefused as e:
            self.chan.send(Refuse(seq, str(e) or "refused"), io)
            return None
        except Exception as e:  # a provider bug fails this pull, not the server
            logger.exception("KV provider failed on pull of %r", req.key)
            self.chan.send(Failed(seq, f"source provider failed: {type(e).__name__}: {e}"), io)
            return None
        reason = self._check_grant(req, grant)
        if reason is None:
            return grant
        logger.error("KV provider returned a bad grant for %r: %s", req.key, reason)
        if isinstance(grant, Grant):
            self.server.complete(req, False)
        self.chan.send(Failed(seq, f"source provider returned a bad grant: {reason}"), io)
        return None

    def _check_grant(self, req: PullRequest, grant: object) -> str | None:
        if not isinstance(grant, Grant):
            return f"{type(grant).__name__} is not a Grant"
        if len(grant.block_ids) != req.num_blocks:
            return f"{len(grant.block_ids)} block ids for {req.num_blocks} blocks"
        limit = self.server.num_blocks
        bad = [b for b in grant.block_ids if not isinstance(b, int) or not 0 <= b < limit]
        if bad:
            return f"block ids {bad[:4]} are not in [0, {limit})"
        if not isinstance(grant.payload, bytes) or len(grant.payload) > MAX_FRAME // 2:
            return f"payload must be bytes of at most {MAX_FRAME // 2}"
        return None

    def _send_blocks(self, seq: int, grant: Grant) -> bool:
        """Stream the granted blocks; True when the client acked its scatter."""
        if self.gpu is not None:
            return self.gpu.send_blocks(seq, grant)
        cfg = self.cfg
        ids = torch.tensor(grant.block_ids, dtype=torch.int64)
        bpb = self.server.layout.bytes_per_block
        if self.transport == "pvm":  # the client reads the blocks itself
            self.chan.send(GrantMsg(seq, len(ids), max(1, len(ids)), grant.payload, None, 0, 0,
                                    ids.numpy().astype("<i8").tobytes()), cfg.io_timeout_s)
            nbytes = len(ids) * self.server.layout.bytes_per_block
            return self._check_ack(seq, self.chan.recv(cfg.io_timeout_s + nbytes / MIN_COPY_RATE, Ack))
        if self.transport == "shm":
            plan = ChunkPlan.make(len(ids), bpb, cfg.chunk_bytes, cfg.max_segment_bytes)
            seg = self._segment_for(plan.ring_bytes)
            self.chan.send(GrantMsg(seq, plan.num_blocks, plan.chunk_blocks, grant.payload,
                                    seg.name if seg else None, seg.size if seg else 0, plan.num_slots, b""),
                           cfg.io_timeout_s)
            return self._send_shm(seq, plan, ids)
        plan = ChunkPlan.make(len(ids), bpb, cfg.chunk_bytes)
        self.chan.send(GrantMsg(seq, plan.num_blocks, plan.chunk_blocks, grant.payload, None, 0, 0, b""),
                       cfg.io_timeout_s)
        return self._send_tcp(seq, plan, ids)

    def _send_shm(self, seq: int, plan: ChunkPlan, ids: torch.Tensor) -> bool:
        # NOTE: slot i % num_slots is rewritten only after the client reported
        # chunk i - num_slots consumed (it reports exactly those chunks); the
        # socket frames order the accesses to the shared memory.
        io, consumed = self.cfg.io_timeout_s, 0
        assert self.segment is not None or plan.num_chunks == 0
        for i in range(plan.num_chunks):
            while consumed <= i - plan.num_slots:  # wait until slot i is free
                consumed = self._recv_consumed(seq, consumed)
            lo, hi = plan.blocks(i)
            off = plan.slot_offset(i)
            assert self.segment is not None and self.segment.tensor is not None
            out = self.segment.tensor[off:off + plan.chunk_nbytes(i)]
            gather_blocks(self.server.layers, ids[lo:hi], out, self.cfg.num_threads)
            self.chan.send(ChunkReady(seq, i), io)
        return self._check_ack(seq, self.chan.recv(io, Ack))

    def _send_tcp(self, seq: int, plan: ChunkPlan, ids: torch.Tensor) -> bool:
        io = self.cfg.io_timeout_s
        raw, staging = self._staging_for(plan.slot_bytes)
        view = memoryview(raw)
        for i in range(plan.num_chunks):
            lo, hi = plan.blocks(i)
            n = plan.chunk_nbytes(i)
            gather_blocks(self.server.layers, ids[lo:hi], staging[:n], self.cfg.num_threads)
            self.chan.send_bytes(view[:n], io)
        return self._check_ack(seq, self.chan.recv(io, Ack))

    def _recv_consumed(self, seq: int, consumed: int) -> int:
        """Wait for the client to report chunk `consumed` done; a failure ack
        from the client ends the pull (raised as TransferError)."""
        msg = self.chan.recv_any(self.cfg.io_timeout_s, Consumed, Ack)
        if isinstance(msg, Ack):
            raise TransferError(f"client gave up pull {msg.seq}: {msg.reason}")
        assert isinstance(msg, Consumed)
        if msg.seq != seq or msg.index != consumed:
            raise TransferError(f"client consumed chunk {msg.seq}/{msg.index}, expected {seq}/{consumed}")
        return consumed + 1

    def _check_ack(self, seq: int, ack: Ack) -> bool:
        if ack.seq != seq:
            raise TransferError(f"unexpected ack {ack.seq}/{ack.ok} for pull {seq}")
        if not ack.ok:
            logger.warning("KV client %s failed pull %d: %s", self.chan.peer, seq, ack.reason)
        return ack.ok

    # -- buffers -----------------------------------------------------------------
    def _segment_for(self, nbytes: int) -> Segment | None:
        """The session's segment, replaced by a bigger one when too small."""
        if nbytes == 0:
            return self.segment
        if self.segment is None or self.segment.size < nbytes:
            size = 1 << (nbytes - 1).bit_length()  # grow by powers of two
            self._set_segment(Segment.create(min(size, max(nbytes, self.cfg.max_segment_bytes))))
        return self.segment

    def _set_segment(self, seg: Segment | None) -> Segment:
        old, self.segment = self.segment, seg
        if old is not None:
            self.server.forget_segment(old)
            old.close()
        if seg is not None:
            self.server.remember_segment(seg)
        return seg  # type: ignore[return-value]

    def _staging_for(self, nbytes: int) -> tuple[bytearray, torch.Tensor]:
        if self._staging is None or len(self._staging[0]) < nbytes:
            raw = bytearray(max(nbytes, 1))
            self._staging = raw, torch.frombuffer(raw, dtype=torch.uint8)
        return self._staging
