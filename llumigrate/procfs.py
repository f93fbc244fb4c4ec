"""Process helpers over /proc (Linux): an agent's engine processes, process
groups, what is still alive, and the shared-memory files processes map."""

from __future__ import annotations

import os
import signal


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first)."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _stat(p)
        if st is not None:
            children.setdefault(st[1], []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            out.append(c)
            todo.append(c)
    return out


def kill_descendants(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every descendant of `pid` (not `pid` itself); the pids signalled."""
    hit = []
    for c in descendants(pid):
        try:
            os.kill(c, sig)
            hit.append(c)
        except ProcessLookupError:
            pass
    return hit


def group_members(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes in any of the process groups `pgids`."""
    out = []
    for p in _all_pids():
        st = _stat(p)
        if st is not None and st[2] in pgids and st[0] != "Z":
            out.append(p)
    return sorted(out)


def pid_alive(pid: int) -> bool:
    """True when process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = _stat(pid)
    return st is None or st[0] != "Z"


def alive(pids: set[int]) -> list[int]:
    """The pids of `pids` that still run (zombies count as gone)."""
    return sorted(p for p in pids if (st := _stat(p)) is not None and st[0] != "Z")


SHM_DIR = "/dev/shm"


def shm_mapped(pids: list[int] | None = None) -> set[int]:
    """The inodes of the /dev/shm files that `pids` (None: every process we
    may read) have mapped now, unlinked ones included: a POSIX semaphore is
    mapped under the temporary name it was created as. Processes that
    vanish or hide their maps are skipped."""
    out: set[int] = set()
    prefix = SHM_DIR + "/"
    for p in _all_pids() if pids is None else pids:
        try:
            with open(f"/proc/{p}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(prefix):
                        out.add(int(fields[4]))
        except (OSError, ValueError):
            continue
    return out
