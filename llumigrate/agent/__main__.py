"""Run one instance agent: `python -m llumigrate.agent --model M [--] [vLLM engine args]`.

Writes `{"host", "port", "pid"}` as JSON to --ready-file once serving. Exits
on SIGTERM/SIGINT, on the `shutdown` RPC, when its parent dies (when
--exit-with-parent is given), shutting its engine down first, or with status
1 when its engine died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="llumigrate-agent")
    p.add_argument("--model", required=True)
    p.add_argument("--instance-id", default=f"agent-{os.getpid()}")
    p.add_argument("--host", default="127.0.0.1", help="control RPC bind address")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token", default=os.environ.get("LLUMIGRATE_TOKEN"))
    p.add_argument("--kv-host", default="127.0.0.1", help="KV server bind address")
    p.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "tcp"])
    p.add_argument("--engine-spin-ms", type=float, default=None,
                   help="how long the engine's internal message-queue readers busy-wait after a "
                        "read (default: 2 on CPU hosts, vLLM's 1000 elsewhere)")
    p.add_argument("--ready-file")
    p.add_argument("--exit-with-parent", action="store_true")
    args, engine_argv = p.parse_known_args(argv)
    if engine_argv and engine_argv[0] == "--":
        engine_argv = engine_argv[1:]
    return args, engine_argv


async def _main(args: argparse.Namespace, engine_argv: list[str]) -> int:
    from llumigrate.agent.server import Agent
    from llumigrate.engine.commands import CommandClient
    from llumigrate.engine.notify import NotifyListener
    from llumigrate.engine.runtime import EngineRuntime, parse_engine_args
    from llumigrate.gcheap import freeze_startup_heap

    notify = NotifyListener()
    await notify.start()
    commands = CommandClient(notify.sibling_path("commands.sock"))
    engine_args = parse_engine_args(args.model, engine_argv, kv_host=args.kv_host,
                                    kv_token=args.token, kv_transport=args.kv_transport,
                                    notify_path=notify.path, command_path=commands.path,
                                    engine_spin_ms=args.engine_spin_ms)
    runtime = EngineRuntime(engine_args)
    agent = Agent(args.instance_id, runtime, notify, commands)
    notify.on("blocks", lambda msg: runtime.set_free_blocks(int(msg["free"])))
    notify.on("preempted", lambda msg: runtime.set_preempted(list(msg["keys"])))
    agent.server.token = args.token
    stop = agent.shutdown_event
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = await agent.start(args.host, args.port)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"host": host, "port": port, "pid": os.getpid(), **agent.kv}, f)
        os.replace(tmp, args.ready_file)
    parent = os.getppid()

    async def watch_parent() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                stop.set()
            await asyncio.sleep(0.5)

    if args.exit_with_parent:
        loop.create_task(watch_parent())
    freeze_startup_heap()  # the engine client and its imports: out of every later collection
    await stop.wait()
    await agent.server.close()  # controllers see this instance go before the engine is torn down
    runtime.shutdown()
    await commands.close()
    await notify.close()
    return 1 if agent.engine_dead else 0


def main(argv: list[str] | None = None) -> int:
    args, engine_argv = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("LLUMIGRATE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s [agent %(process)d] %(name)s: %(message)s")
    return asyncio.run(_main(args, engine_argv))


if __name__ == "__main__":
    sys.exit(main())
