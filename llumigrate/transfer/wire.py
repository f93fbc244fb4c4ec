"""Control messages of the KV transfer protocol.

Each frame is a 4-byte big-endian length then a msgpack map {"t": TYPE,
**fields} (plain data only, never pickle). KV bytes never travel inside a
frame: they follow a `GrantMsg` raw on TCP, or sit in a shared-memory segment.

Connection life: server → `Challenge`; client → `Hello` (MAC of the challenge
nonce under the token, layout, wanted transport); server → `Accept` or
`Refuse`. A "local" Accept (same host) offers pvm (the server's layer
addresses and a probe buffer to read) and shm (a probe segment); the client
probes and confirms its pick with `Ready`. Then per pull: client → `Pull`;
server → `Refuse` | `Failed` | `GrantMsg`; shm: server → `ChunkReady` per
chunk, client → `Consumed` for each ring slot the server must write again;
tcp: the raw bytes of every chunk;
pvm: the client reads the granted blocks itself; last, client → `Ack`.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

VERSION = 1
MAX_FRAME = 4 << 20  # control frames are small: payloads (RNG states) are KBs,
                     # pvm grants carry 8 bytes per block id


class WireError(ValueError):
    """A frame that is not a valid message."""


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def encode(self) -> bytes:
        """The whole frame: length prefix and body."""
        d = {"t": self.TYPE}
        for name in _FIELDS[type(self)]:
            d[name] = getattr(self, name)
        body = msgpack.packb(d, use_bin_type=True)
        return len(body).to_bytes(4, "big") + body


@dataclass(frozen=True)
class Challenge(Message):
    TYPE: ClassVar[str] = "challenge"
    version: int
    nonce: bytes
    host_id: str
    pid: int


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    version: int
    auth: bytes          # mac(token, challenge nonce); empty without a token
    layout: dict
    transport: str
    host_id: str
    pid: int


@dataclass(frozen=True)
class Accept(Message):
    TYPE: ClassVar[str] = "accept"
    transport: str       # "local" (pick with Ready) or "tcp"
    probe: bytes         # local: held by the probe segment and at probe_addr
    segment: str | None  # local: the probe segment, holding `probe` at offset 0
    probe_addr: int      # local: address of `probe` in the server process
    layer_addrs: list    # local: address of block 0 of every server layer


@dataclass(frozen=True)
class Ready(Message):
    TYPE: ClassVar[str] = "ready"
    transport: str       # the client's pick: "pvm", "shm" or "tcp"


@dataclass(frozen=True)
class Refuse(Message):
    TYPE: ClassVar[str] = "refuse"
    seq: int             # -1 during the handshake
    reason: str


@dataclass(frozen=True)
class Failed(Message):
    TYPE: ClassVar[str] = "failed"
    seq: int
    reason: str


@dataclass(frozen=True)
class Pull(Message):
    TYPE: ClassVar[str] = "pull"
    seq: int
    key: str
    start_block: int
    num_blocks: int
    final: bool
    timeout_s: float


@dataclass(frozen=True)
class GrantMsg(Message):
    TYPE: ClassVar[str] = "grant"
    seq: int
    num_blocks: int
    chunk_blocks: int    # blocks per chunk (the last chunk may hold fewer)
    payload: bytes
    segment: str | None  # shm: segment holding `num_slots` chunk slots
    segment_size: int
    num_slots: int       # shm: chunk i lies in slot i % num_slots
    block_ids: bytes     # pvm: the source's block ids, int64 little-endian


@dataclass(frozen=True)
class ChunkReady(Message):
    TYPE: ClassVar[str] = "chunk"
    seq: int
    index: int


@dataclass(frozen=True)
class Consumed(Message):
    TYPE: ClassVar[str] = "consumed"
    seq: int
    index: int


@dataclass(frozen=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    seq: int
    ok: bool
    reason: str


_TYPES: dict[str, type[Message]] = {c.TYPE: c for c in (
    Challenge, Hello, Accept, Ready, Refuse, Failed, Pull, GrantMsg, ChunkReady, Consumed, Ack)}
_HINTS = {c: typing.get_type_hints(c) for c in _TYPES.values()}
_FIELDS = {c: tuple(f.name for f in fields(c)) for c in _TYPES.values()}


def decode(body: bytes | bytearray) -> Message:
    """Parse one frame body; raises WireError when it is not a valid message."""
    try:
        d = msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"undecodable frame: {e}") from None
    if not isinstance(d, dict) or d.get("t") not in _TYPES:
        raise WireError(f"unknown message {d.get('t') if isinstance(d, dict) else type(d).__name__!r}")
    cls = _TYPES[d["t"]]
    hints = _HINTS[cls]
    kwargs = {}
    for name in _FIELDS[cls]:
        if name not in d:
            raise WireError(f"{cls.TYPE} lacks {name!r}")
        value = d[name]
        if not _matches(value, hints[name]):
            raise WireError(f"{cls.TYPE}.{name} has type {type(value).__name__}")
        kwargs[name] = value
    return cls(**kwargs)


def _matches(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_matches(value, h) for h in hint.__args__)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def mac(token: str | None, nonce: bytes) -> bytes:
    """Proof of the token bound to one challenge (the token never travels)."""
    return hmac.new(token.encode(), nonce, hashlib.sha256).digest() if token else b""


def host_id() -> str:
    """Equal on every process of one machine during one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
