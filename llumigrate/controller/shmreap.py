"""Shared memory that a killed engine leaves behind.

vLLM's engine keeps its message queues in /dev/shm: multiprocessing's
`psm_*` segments (hundreds of MiB of address space each) and `sem.mp-*`
semaphores. It removes them when it shuts down; killed (the OOM killer, a
SIGKILL, a crash of its agent's process group) it leaves them until the host
reboots, and every such loss adds more. The controller records which of them
each local agent's process group maps once it is up (`owned_by_group`, by
inode: a semaphore is mapped under the temporary name it was created as)
and, once the instance is gone, removes those that no live process maps any
more (`release`): a file some process still maps, or a name that now holds
another file, is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import time

from llumigrate import procfs

logger = logging.getLogger(__name__)

# What multiprocessing names its segments and semaphores (vLLM's queues use it).
_ENGINE_SHM = re.compile(r"^(psm_[0-9a-f]+|sem\.mp-[\w-]+)$")


def engine_files() -> dict[str, int]:
    """Every engine shared-memory file of this user on this host now: path -> inode."""
    try:
        names = os.listdir(procfs.SHM_DIR)
    except OSError:
        return {}
    out, uid = {}, os.getuid()
    for name in names:
        if _ENGINE_SHM.match(name):
            path = os.path.join(procfs.SHM_DIR, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_uid == uid:
                out[path] = st.st_ino
    return out


def owned_by_group(pgid: int) -> dict[str, int]:
    """The engine shared-memory files the live processes of group `pgid` map."""
    mapped = procfs.shm_mapped(procfs.group_members({pgid}))
    return {path: ino for path, ino in engine_files().items() if ino in mapped}


def left_behind(before: dict[str, int]) -> set[str]:
    """This user's engine shared-memory files created since `before` was
    taken that no live process maps: what killed engines left (a check for
    tests)."""
    live = procfs.shm_mapped()
    return {p for p, ino in engine_files().items() if before.get(p) != ino and ino not in live}


def release(owned: dict[str, int]) -> list[str]:
    """Remove the files of `owned` (path -> inode) that still are that file
    and that no live process maps; the ones removed."""
    if not owned:
        return []
    live = procfs.shm_mapped()
    removed = []
    for path, ino in sorted(owned.items()):
        if not _ENGINE_SHM.match(os.path.basename(path)) or ino in live:
            continue
        try:
            if os.stat(path).st_ino != ino:
                continue  # the name holds another file now
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass  # it shut down cleanly after all
        except OSError as e:  # never let cleanup break a shutdown
            logger.warning("cannot remove %s: %s", path, e)
    return removed


def release_after_group(pgid: int, owned: dict[str, int], wait_s: float) -> list[str]:
    """`release(owned)` once group `pgid` has no live process left (waiting up
    to `wait_s`; a member still alive then keeps what it maps)."""
    deadline = time.monotonic() + wait_s
    while procfs.group_members({pgid}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return release(owned)
