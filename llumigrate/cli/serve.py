"""Serve N vLLM instances behind vLLM's own OpenAI server, with live migration.

    llumigrate serve [MODEL] --num-instances N [llumigrate options] [`vllm serve` arguments ...]

A drop-in for `vllm serve`: every `vllm serve` argument means what it means
there (frontend arguments to the server, engine arguments to each instance).
MODEL defaults to the built-in tiny model; --host defaults to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from llumigrate.control.server import DEFAULT_ADDRESS
from llumigrate.controller.cluster import RETAIN_FINISHED
from llumigrate.controller.restart import RestartPolicy
from llumigrate.errors import ConfigError, InstanceStartFailed
from llumigrate.migration.protocol import MigrationConfig
from llumigrate.scheduler import DEFAULT_INTERVAL_S, DISPATCH_POLICIES, MIGRATION_POLICIES, SchedulerConfig

# On a CPU-only machine vLLM refuses to size its KV cache by itself.
CPU_KV_CACHE_BYTES = 256 << 20
TINY_ENGINE_DEFAULTS = ("--dtype", "float32", "--enforce-eager")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """llumigrate's own options (`vllm serve`'s are vLLM's parser's)."""
    g = p.add_argument_group("llumigrate")
    g.add_argument("--num-instances", type=int, default=2)
    g.add_argument("--control-address", default=DEFAULT_ADDRESS, help="gRPC control API HOST:PORT")
    g.add_argument("--token", default=os.environ.get("LLUMIGRATE_TOKEN"),
                   help="control API and agent token; needed to bind off loopback")
    g.add_argument("--dispatch-policy", default="least-load", choices=DISPATCH_POLICIES)
    g.add_argument("--migration-policies", default=",".join(MIGRATION_POLICIES),
                   help=f"comma-separated subset of {','.join(MIGRATION_POLICIES)} (empty: none)")
    g.add_argument("--scheduler-interval", type=float, default=DEFAULT_INTERVAL_S,
                   help="seconds between migration rounds")
    g.add_argument("--precopy-stages", type=int, default=MigrationConfig.max_precopy_stages)
    g.add_argument("--precopy-rate-mib-s", type=float, default=MigrationConfig.precopy_rate_mib_s,
                   help="pace pre-copy stages to this many MiB/s so that the copy leaves running "
                        "requests their memory bandwidth (CPU KV; 0: no limit; the final stop-and-copy "
                        "is never paced)")
    g.add_argument("--no-failover", action="store_true", help="fail a lost instance's requests")
    g.add_argument("--max-failovers", type=int, default=1,
                   help="replays of one request when its instance dies; a request whose instance dies "
                        "again after that fails (it may be what kills them), -1: no limit")
    g.add_argument("--no-restart", action="store_true",
                   help="leave a lost instance down (default: start it again, backing off 1 s doubling to "
                        "60 s; given up after 5 starts that fail in a row)")
    g.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "tcp"])
    g.add_argument("--retain-finished", type=int, default=RETAIN_FINISHED,
                   help="finished requests (and migration results) kept listed on the control API "
                        "after they end, the latest first to stay")
    add_engine_spin(g)
    g.add_argument("--run-dir", help="where each instance's log (<instance>.log) goes "
                   "(default: a new temporary directory, printed at start)")


def add_engine_spin(p: Any) -> None:
    p.add_argument("--engine-spin-ms", type=float, default=None,
                   help="how long each engine's internal message-queue readers busy-wait after a "
                        "read (default: 2 on CPU hosts, vLLM's 1000 elsewhere)")


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """MODEL, if the first argument is one, and the rest."""
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def engine_defaults(engine_args: list[str], builtin_model: bool) -> list[str]:
    args = list(engine_args)
    if builtin_model:
        for flag, value in zip(TINY_ENGINE_DEFAULTS[::2], TINY_ENGINE_DEFAULTS[1::2]):
            if flag not in args:
                args += [flag, value]
        if "--enforce-eager" not in args:
            args.append("--enforce-eager")
    import torch
    if not torch.cuda.is_available() and not any(a.startswith("--kv-cache-memory") for a in args):
        args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    return args


def build_config(args: argparse.Namespace):
    """ServeConfig from `parse`'s namespace."""
    from llumigrate.serve.service import ServeConfig

    model = args.model_tag or (args.model if args.model_given else None)
    builtin = model is None
    if builtin:
        from llumigrate.model.tiny import ensure_tiny_model
        model = str(ensure_tiny_model())
    policies = [p for p in args.migration_policies.split(",") if p]
    return ServeConfig(
        model=model, num_instances=args.num_instances,
        engine_args=tuple(engine_defaults(args.vllm_argv, builtin)),
        served_model_name=tuple(args.served_model_name) if args.served_model_name else None,
        host=args.host or "127.0.0.1", port=args.port,
        api_key=tuple(args.api_key) if isinstance(args.api_key, list) else args.api_key,
        control_address=args.control_address, token=args.token,
        scheduler=SchedulerConfig(dispatch_policy=args.dispatch_policy, migration_policies=policies),
        migration=MigrationConfig(max_precopy_stages=args.precopy_stages,
                                  precopy_rate_mib_s=args.precopy_rate_mib_s),
        interval_s=args.scheduler_interval, failover=not args.no_failover,
        kv_transport=args.kv_transport, engine_spin_ms=args.engine_spin_ms,
        retain_finished=args.retain_finished, log_level=str(getattr(args, "log_level", None) or "info").lower(),
        run_dir=args.run_dir, restart=None if args.no_restart else RestartPolicy(),
        max_failovers=None if args.max_failovers < 0 else args.max_failovers,
        api_server_count=args.api_server_count or 1)


async def serve(config) -> int:
    from llumigrate.gcheap import freeze_startup_heap
    from llumigrate.serve.service import Service

    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"[llumigrate] starting {config.num_instances} instance(s) of {config.model} "
          f"(their logs: {service.run_dir}) ...", flush=True)
    try:
        try:
            await service.start()
        except ConfigError as e:  # e.g. an address in use: said before any engine starts
            print(f"llumigrate serve: {e}", file=sys.stderr)
            return 2
        except InstanceStartFailed as e:  # e.g. an engine argument vLLM refuses
            print(f"llumigrate serve: {e}", file=sys.stderr)
            return 1
        freeze_startup_heap()  # imports and startup state: out of every later collection
        print(f"[llumigrate] vLLM's OpenAI endpoint http://{config.host}:{service.http_port}/v1  "
              f"control API {config.control_address.rsplit(':', 1)[0]}:{service.control_port}  "
              f"run dir {service.run_dir}", flush=True)
        await stop.wait()
    finally:
        print("[llumigrate] shutting down ...", flush=True)
        await service.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=str(getattr(args, "log_level", None) or "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
    except ConfigError as e:
        print(f"llumigrate serve: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


def parse_with_engine_args(prog: str, doc: str | None, add: Callable[[argparse.ArgumentParser], None],
                           argv: list[str]) -> argparse.Namespace:
    """[MODEL] plus our options; every argument we do not know is vLLM's
    (`args.engine_args`), as with `vllm serve`."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add(p)
    model, rest = split_argv(argv)
    args, engine_args = p.parse_known_args(rest)
    args.model, args.engine_args = model, engine_args
    return args


def parse(argv: list[str]) -> argparse.Namespace:
    """`vllm serve`'s arguments and ours, on one parser (one --help). The
    namespace also carries `vllm_argv`, vLLM's arguments as given (MODEL,
    ours and the API key taken out), for the instances."""
    from llumigrate.engine.vllm_api import serve_arg_parser, validate_serve_args
    parser = serve_arg_parser("llumigrate serve")
    parser.description = __doc__
    add_arguments(parser)
    args = parser.parse_args(argv)
    validate_serve_args(args)
    ours = argparse.ArgumentParser(add_help=False)
    add_arguments(ours)
    _, vllm_argv = ours.parse_known_args(argv)
    if args.model_tag and vllm_argv and vllm_argv[0] == args.model_tag:
        vllm_argv = vllm_argv[1:]
    # MODEL, host, port, served names and the API key travel in ServeConfig's
    # own fields (the key is a secret the instances need not see).
    for flag in ("--api-key", "--host", "--port", "--served-model-name"):
        vllm_argv = strip_option(vllm_argv, flag)
    args.vllm_argv = vllm_argv
    args.model_given = any(a == "--model" or a.startswith("--model=") for a in vllm_argv)
    return args


def strip_option(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE...` / `flag=VALUE` (the values: up to the next option)."""
    out, skipping = [], False
    for a in argv:
        if skipping and not a.startswith("-"):
            continue
        skipping = a == flag
        if not skipping and not a.startswith(flag + "="):
            out.append(a)
    return out
