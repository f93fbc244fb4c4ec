"""`Instance`: the controller's handle on one agent (a local child process it
started, or a remote agent it connected to)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llumigrate.agent.rpc import RpcClient
from llumigrate.controller import shmreap
from llumigrate.controller.startlog import start_failure_cause
from llumigrate.controller.request import RequestHandle
from llumigrate.errors import InstanceLost, InstanceStartFailed

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    instance_id: str
    host: str
    port: int
    info: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    client: RpcClient | None = None
    up: bool = True
    draining: bool = False
    removed: bool = False        # left the cluster on purpose (not lost)
    load: dict = field(default_factory=dict)    # latest pushed load report
    reported_at: float = 0.0     # event-loop time of that report
    migrations_in: int = 0       # migrations in flight to / from here
    migrations_out: int = 0
    # Requests a migration is bringing here, by id: until it commits, they are
    # listed on their source and this engine cannot count their blocks yet.
    incoming: dict[str, RequestHandle] = field(default_factory=dict)
    # The engine's shared memory (a local agent's), removed once it is gone
    # in case it was killed and could not (`shmreap`).
    shm_files: dict[str, int] = field(default_factory=dict)   # path -> inode

    @property
    def kv_address(self) -> tuple[str, int]:
        return self.info["kv_host"], int(self.info["kv_port"])

    @property
    def block_size(self) -> int:
        return int(self.info["block_size"])

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers (0 when the engine did not say)."""
        return int(self.info.get("block_bytes", 0)) * int(self.info.get("num_layers", 1))

    async def call(self, method: str, rpc_timeout: float | None = 60.0, **args: Any) -> Any:
        if self.client is None or not self.up:
            raise InstanceLost(f"instance {self.instance_id} is down")
        return await self.client.call(method, rpc_timeout=rpc_timeout, **args)

    async def connect(self, on_event: Callable[[dict], None], on_lost: Callable[[], None],
                      token: str | None = None) -> None:
        self.client = RpcClient(on_event=on_event, on_lost=on_lost)
        await self.client.connect(self.host, self.port, token=token)
        self.info = await self.call("info")
        self.load = dict(self.info.get("load") or {})
        self.reported_at = asyncio.get_running_loop().time()

    async def refresh(self) -> dict:
        self.info = await self.call("info")
        return self.info

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the agent and its engine processes (test and fault injection)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    async def close(self, timeout: float = 30.0) -> None:
        if self.client is not None and self.up:
            try:
                await self.call("shutdown", rpc_timeout=5)
            except Exception:
                pass
            await self.client.close()
        self.up = False
        if self.process is not None:
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                await asyncio.to_thread(self.process.wait)
            else:  # reap engine children left in the agent's process group
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        await self.release_shm()

    async def release_shm(self, wait_s: float = 10.0) -> list[str]:
        """Remove the shared memory this local instance's engine left behind,
        once its processes are gone (up to `wait_s`): nothing is left when it
        was killed. What a live process still maps stays."""
        if self.process is None or not self.shm_files:
            return []
        owned, pgid = dict(self.shm_files), self.process.pid
        try:
            removed = await asyncio.to_thread(shmreap.release_after_group, pgid, owned, wait_s)
        except Exception:  # cleanup never breaks a shutdown or a failover
            logger.exception("instance %s: removing its engine's shared memory failed", self.instance_id)
            return []
        self.shm_files = {p: ino for p, ino in self.shm_files.items() if p not in removed and os.path.exists(p)}
        if removed:
            logger.info("instance %s: removed %d shared-memory file(s) its engine left: %s",
                        self.instance_id, len(removed), " ".join(os.path.basename(p) for p in removed))
        return removed


def _ready_from(ready: Path, pid: int) -> bool:
    """Whether `ready` says agent `pid` serves (not another's, in a shared run dir)."""
    try:
        return json.loads(ready.read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _end_group(proc: subprocess.Popen, wait_s: float) -> None:
    """Kill what is left of a failed agent's process group (its engine may
    outlive it) and remove the shared memory it held (waiting up to `wait_s`
    for the group to be gone). Blocking: run it off the event loop."""
    owned = shmreap.owned_by_group(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    shmreap.release_after_group(proc.pid, owned, wait_s)


def spin_args(engine_spin_ms: float | None) -> list[str]:
    """The agent's `--engine-spin-ms` (none: the agent's own default)."""
    return [] if engine_spin_ms is None else ["--engine-spin-ms", str(float(engine_spin_ms))]


async def spawn_agent(instance_id: str, model: str, engine_argv: list[str], run_dir: Path,
                      *, token: str | None = None, kv_transport: str = "auto",
                      env: dict[str, str] | None = None, start_timeout: float = 300.0,
                      engine_spin_ms: float | None = None) -> Instance:
    """Start a local agent process and wait until it serves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ready = run_dir / f"{instance_id}.ready"
    ready.unlink(missing_ok=True)
    log_path = run_dir / f"{instance_id}.log"
    cmd = [sys.executable, "-m", "llumigrate.agent", "--model", model, "--instance-id", instance_id,
           "--ready-file", str(ready), "--exit-with-parent", "--kv-transport", kv_transport,
           *spin_args(engine_spin_ms), "--", *engine_argv]
    env = {**os.environ, **(env or {})}
    if token:
        env["LLUMIGRATE_TOKEN"] = token
    with open(log_path, "ab") as log:
        log_start = log.tell()   # a reused run dir keeps earlier runs' logs: only this one's counts
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + start_timeout
    try:
        while not _ready_from(ready, proc.pid):
            exited = proc.poll() is not None
            if exited or time.monotonic() > deadline:
                how = f"exit status {proc.returncode}" if exited else f"not ready in {start_timeout:g}s"
                await asyncio.to_thread(_end_group, proc, 10.0)
                raise InstanceStartFailed(instance_id, how,
                                          start_failure_cause(_read_from(log_path, log_start)), str(log_path))
            await asyncio.sleep(0.2)
    except asyncio.CancelledError:   # e.g. the cluster closes while this start is under way
        _end_group(proc, 2.0)        # on the loop: a cancelled task can no longer await
        raise
    addr = json.loads(ready.read_text())
    # The agent's engine is up by now (the agent says ready after it): note
    # the shared memory its processes hold, to remove if they are killed.
    shm_files = await asyncio.to_thread(shmreap.owned_by_group, proc.pid)
    return Instance(instance_id, addr["host"], int(addr["port"]), process=proc, log_path=log_path,
                    shm_files=shm_files)
