"""Run one vLLM instance that joins a running `llumigrate serve` (e.g. from another host).

    llumigrate instance MODEL --scheduler HOST:PORT [--host BIND] [--token T] [vLLM engine arguments ...]

Starts an instance agent, registers it with the scheduler's control API, and
serves until SIGINT/SIGTERM; then it leaves cleanly: the scheduler drains it
(its running requests migrate to other instances) and removes it, and only
then does the engine stop. Binding a non-loopback address needs `--token`
(the cluster's token; the same one authenticates the control API calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llumigrate.cli.serve import add_engine_spin, engine_defaults, parse_with_engine_args
from llumigrate.control.server import DEFAULT_ADDRESS
from llumigrate.controller import shmreap
from llumigrate.controller.instance import spin_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=DEFAULT_ADDRESS, help="the control API of `llumigrate serve`")
    p.add_argument("--instance-id", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the agent and its KV server")
    p.add_argument("--advertise-host", help="address the scheduler and peers reach us at (default: --host)")
    p.add_argument("--port", type=int, default=0, help="agent RPC port (0: any free one)")
    p.add_argument("--token", default=os.environ.get("LLUMIGRATE_TOKEN"))
    p.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "tcp"])
    add_engine_spin(p)
    p.add_argument("--leave-timeout", type=float, default=120.0, help="seconds to drain on exit")


def parse(argv: list[str]) -> argparse.Namespace:
    return parse_with_engine_args("llumigrate instance", __doc__, add_arguments, argv)


def _start_agent(args: argparse.Namespace, model: str, engine_args: list[str],
                 run_dir: Path) -> tuple[subprocess.Popen, dict]:
    ready = run_dir / "agent.ready"
    cmd = [sys.executable, "-m", "llumigrate.agent", "--model", model, "--instance-id",
           args.instance_id, "--host", args.host, "--kv-host", args.host, "--port", str(args.port),
           "--ready-file", str(ready), "--exit-with-parent", "--kv-transport", args.kv_transport,
           *spin_args(args.engine_spin_ms), "--", *engine_args]
    env = {**os.environ, **({"LLUMIGRATE_TOKEN": args.token} if args.token else {})}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    t0 = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"llumigrate instance: the agent exited with {proc.returncode}")
        if int(time.monotonic() - t0) % 10 == 0:
            print(f"[instance] starting the engine ... {time.monotonic() - t0:.0f}s", flush=True)
        time.sleep(1.0)
    return proc, json.loads(ready.read_text())


async def _membership(args: argparse.Namespace, host: str, port: int, stop: asyncio.Event) -> int:
    from llumigrate.control.client import ControlClient

    async with ControlClient(args.scheduler, token=args.token) as ctl:
        await ctl.register_instance(args.instance_id, host, port)
        print(f"[instance] {args.instance_id} joined {args.scheduler} as {host}:{port}", flush=True)
        await stop.wait()
        print(f"[instance] leaving: draining {args.instance_id} ...", flush=True)
        await ctl.deregister_instance(args.instance_id, args.leave_timeout)
        print(f"[instance] {args.instance_id} left the cluster", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    import grpc

    from llumigrate.model.tiny import ensure_tiny_model

    model = args.model or str(ensure_tiny_model())
    engine_args = engine_defaults(args.engine_args, args.model is None)
    run_dir = Path(tempfile.mkdtemp(prefix="llumigrate-instance-"))
    proc, addr = _start_agent(args, model, engine_args, run_dir)
    engine_shm = shmreap.owned_by_group(proc.pid)   # removed at the end if the engine could not

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await _membership(args, args.advertise_host or addr["host"], int(addr["port"]), stop)

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as e:
        print(f"llumigrate instance: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shmreap.release_after_group(proc.pid, engine_shm, wait_s=10.0)
