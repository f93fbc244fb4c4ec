"""Shared-memory segments for same-host KV transfer.

A segment is a file `/dev/shm/llumigrate-<pid>-<16 hex>` (mode 0600) created
by a KV server process `pid` and mapped with mmap by it and by its clients.
The creator unlinks it when the connection using it ends, on error and when
the server closes; `remove_stale_segments` cleans up after killed servers.
(multiprocessing.shared_memory is avoided: its resource tracker unlinks or
warns about segments of other processes.)
"""

from __future__ import annotations

import mmap
import os
import re
import secrets

import torch

from llumigrate.procfs import SHM_DIR, pid_alive

PREFIX = "llumigrate-"
_NAME = re.compile(r"^llumigrate-(\d+)-[0-9a-f]{16}$")


class Segment:
    """One mapped segment; `tensor` is a uint8 view of all of it.

    Unmapping happens when the last tensor viewing the mapping is freed, so a
    view that outlives `close()` stays valid (no dangling pointer, ever).
    `unlink` only removes the name and is safe from any thread.
    """

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.name, self.size, self.owner = name, size, owner
        self.tensor: torch.Tensor | None = torch.frombuffer(mm, dtype=torch.uint8)

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new segment of at least `size` bytes owned by this process."""
        size = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=True)

    @classmethod
    def open(cls, name: str, size: int, creator_pid: int | None = None) -> Segment:
        """Map someone else's segment `name`, which must hold >= `size` bytes
        (and be created by `creator_pid` when given). Raises ValueError for a
        name that is not a llumigrate segment, OSError when it cannot be mapped."""
        pid = segment_pid(name)
        if pid is None or (creator_pid is not None and pid != creator_pid):
            raise ValueError(f"{name!r} is not a llumigrate segment of process {creator_pid}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise OSError(f"segment {name} holds {actual} bytes, expected >= {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    def unlink(self) -> None:
        """Remove the name (owner only; idempotent). Mappings stay valid."""
        if self.owner:
            unlink(self.name)

    def close(self) -> None:
        """Drop this process's mapping; the owner also unlinks. Idempotent."""
        self.unlink()
        self.tensor = None


def segment_pid(name: str) -> int | None:
    """The creator pid encoded in a segment name, or None if not ours."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def unlink(name: str) -> None:
    """Remove segment `name` if it exists."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def list_segments(pid: int | None = None) -> list[str]:
    """Names of existing llumigrate segments (of process `pid` when given)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if (p := segment_pid(n)) is not None and (pid is None or p == pid))


def remove_stale_segments(pid: int | None = None) -> list[str]:
    """Unlink the segments whose creator is dead (only `pid`'s when given).
    Returns the names removed. A pid is judged in this process's pid namespace."""
    removed = []
    for name in list_segments(pid):
        p = segment_pid(name)
        if p is not None and not pid_alive(p):
            unlink(name)
            removed.append(name)
    return removed
