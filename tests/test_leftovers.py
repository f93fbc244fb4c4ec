"""What killed processes leave behind, and its removal: `controller.shmreap`
over a real process group that holds multiprocessing shared memory and a
named semaphore, as vLLM's engine does, then is killed (the stress test
checks the same end to end on real engines); the private directories of
killed agents (`engine.notify.remove_stale_dirs`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from llumigrate.controller import shmreap

HOLDER = """
import multiprocessing as mp, sys, time
from multiprocessing import shared_memory
seg = shared_memory.SharedMemory(create=True, size=1 << 20)
lock = mp.get_context("spawn").Lock()   # a named semaphore, kept until shutdown
print(seg.name, lock._semlock.name, flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder():
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    seg, sem = proc.stdout.readline().split()
    paths = {f"/dev/shm/{seg}", f"/dev/shm/sem.{sem.lstrip('/')}"}
    yield proc, paths
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


def test_what_a_killed_group_held_is_removed_once_it_is_gone(holder):
    proc, paths = holder
    owned = shmreap.owned_by_group(proc.pid)
    assert set(owned) == paths            # the segment and the semaphore, nothing else
    assert shmreap.release(owned) == []   # mapped by a live process: kept
    assert all(os.path.exists(p) for p in paths)
    os.killpg(proc.pid, signal.SIGKILL)   # its resource tracker dies with it
    proc.wait()
    assert set(shmreap.release_after_group(proc.pid, owned, wait_s=10)) == paths
    assert not any(os.path.exists(p) for p in paths)
    assert shmreap.release(owned) == []   # twice is harmless


def test_a_name_that_now_holds_another_file_is_kept(holder):
    proc, paths = holder
    owned = shmreap.owned_by_group(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reused = sorted(paths)[0]
    os.unlink(reused)
    with open(reused, "wb") as f:         # same name, another file (inode)
        f.write(b"x")
    removed = shmreap.release_after_group(proc.pid, owned, wait_s=10)
    assert reused not in removed and os.path.exists(reused)
    assert set(removed) == paths - {reused}


def test_left_behind_names_only_new_unmapped_files(holder):
    proc, paths = holder
    before = shmreap.engine_files()
    assert shmreap.left_behind(before) == set()
    assert shmreap.left_behind({}) & paths == set()   # mapped: not left behind
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert shmreap.left_behind({}) >= paths
    assert shmreap.left_behind(before) & paths == set()   # there before: not this run's


def test_a_killed_agents_private_dir_is_removed_by_the_next_one(tmp_path):
    from llumigrate.engine.notify import DIR_PREFIX, remove_stale_dirs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{DIR_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{DIR_PREFIX}{os.getpid()}-abc"      # its agent still runs
    other = tmp_path / "llumigrate-notify-olderformat"       # not named by pid: not ours to judge
    for d in (stale, live, other):
        d.mkdir()
        (d / "engine.sock").write_bytes(b"")
    assert remove_stale_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()
