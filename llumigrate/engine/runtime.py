"""`EngineRuntime`: one vLLM engine core driven through vLLM's own
engine-core client, configured for llumigrate.

The agent runs no vLLM frontend: requests arrive as vLLM `EngineCoreRequest`s
already processed by the serve process's `AsyncLLM` (tokenized, validated,
sampling parameters completed), and the engine core's `EngineCoreOutputs` go
back as they are, to be detokenized there. This module adds llumigrate's KV
connector and worker extension to the operator's engine arguments, keeps the
load figures the global scheduler reads, and exposes the small async surface
the agent uses (add, abort, outputs, worker RPCs, engine utilities).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from llumigrate.engine.vllm_api import (
    AsyncEngineArgs,
    EngineCoreOutputs,
    EngineCoreRequest,
    engine_args_from_argv,
    make_engine_core_client,
    num_preempted,
)
from llumigrate.engine.vllm_compat import check_version, engine_facts, is_cpu_platform
from llumigrate.errors import ConfigError

# How long an engine's shm message-queue readers busy-wait after a read, on
# CPU hosts (vLLM's own 1 s starves the forward there; see
# `vllm_compat.bound_mq_spin`). Accelerator hosts keep vLLM's default.
CPU_ENGINE_SPIN_MS = 2.0

CONNECTOR = "LlumigrateConnector"
CONNECTOR_MODULE = "llumigrate.engine.connector"
WORKER_EXTENSION = "llumigrate.engine.worker_ext.LlumigrateWorkerExtension"


@dataclass
class Load:
    """Latest scheduler figures of this engine (updated every step)."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0          # usable blocks (vLLM's null block excluded)
    free_blocks: int = 0
    kv_cache_usage: float = 0.0
    steps: int = 0
    num_preempted: int = 0       # requests vLLM preempted for lack of KV blocks, all time
    # Requests (engine request ids) preempted and not resumed yet: queued
    # again, holding no blocks; the head of vLLM's queue first.
    preempted: list[str] = field(default_factory=list)


def parse_engine_args(model: str | None, argv: list[str], *, kv_host: str = "127.0.0.1",
                      kv_token: str | None = None, kv_transport: str = "auto",
                      notify_path: str | None = None, command_path: str | None = None,
                      engine_spin_ms: float | None = None) -> AsyncEngineArgs:
    """vLLM engine args from `vllm serve`'s own argv (frontend arguments are
    accepted and left to the frontend), plus llumigrate's hooks.
    `engine_spin_ms` bounds the engine's message-queue busy-wait; None picks
    `CPU_ENGINE_SPIN_MS` on a CPU host and vLLM's default elsewhere."""
    args = engine_args_from_argv(model, argv)
    if args.kv_transfer_config is not None:
        raise ConfigError("llumigrate installs its own --kv-transfer-config; remove yours")
    if args.enable_prefix_caching is False:
        raise ConfigError("llumigrate needs prefix caching (pre-copied blocks land in it)")
    if args.worker_extension_cls:
        raise ConfigError("llumigrate installs its own --worker-extension-cls; remove yours")
    extra: dict[str, Any] = {"kv_host": kv_host, "kv_transport": kv_transport}
    if kv_token:
        extra["kv_token"] = kv_token
    if notify_path:
        extra["notify_path"] = notify_path
    if command_path:
        extra["command_path"] = command_path
    if engine_spin_ms is None and is_cpu_platform():
        engine_spin_ms = CPU_ENGINE_SPIN_MS
    if engine_spin_ms is not None:
        if engine_spin_ms < 0:
            raise ConfigError(f"engine spin must be >= 0 ms, got {engine_spin_ms}")
        extra["engine_spin_s"] = engine_spin_ms / 1000.0
    return dataclasses.replace(
        args,
        enable_prefix_caching=True,
        worker_extension_cls=WORKER_EXTENSION,
        kv_transfer_config={
            "kv_connector": CONNECTOR,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "fail",
            "kv_connector_extra_config": extra,
        },
        disable_log_stats=False,
    )


class EngineRuntime:
    """One engine core and its workers, through vLLM's `AsyncMPClient`."""

    def __init__(self, args: AsyncEngineArgs) -> None:
        check_version()
        self.load = Load()
        self._lock = threading.Lock()
        self.vllm_config, self.core = make_engine_core_client(args)
        cache = self.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.max_model_len = int(self.vllm_config.model_config.max_model_len)
        self.load.num_blocks = max(0, int(cache.num_gpu_blocks or 0) - 1)
        self.load.free_blocks = self.load.num_blocks  # no step has run yet: all free
        # What decides which requests a restore can carry here (refusal.EngineFacts fields).
        self.engine_facts = dataclasses.asdict(engine_facts(self.vllm_config))

    # -- requests ----------------------------------------------------------
    async def add(self, request: EngineCoreRequest) -> None:
        await self.core.add_request_async(request)

    async def abort(self, request_ids: list[str]) -> None:
        await self.core.abort_requests_async(list(request_ids))

    async def outputs(self) -> EngineCoreOutputs:
        """The engine core's next batch of outputs (raises EngineDeadError
        once the engine died); its load figures are noted first."""
        outs = await self.core.get_output_async()
        self._note(outs)
        return outs

    def _note(self, outs: EngineCoreOutputs) -> None:
        stats = outs.scheduler_stats
        with self._lock:
            s = self.load
            s.num_preempted += num_preempted(outs)
            if stats is not None:
                s.num_running = stats.num_running_reqs
                s.num_waiting = stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
                s.steps += 1

    # -- engine utilities and worker RPCs ---------------------------------------
    async def rpc(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """Call worker-extension `method` on every worker; rank 0's answer."""
        return (await self.core.collective_rpc_async(method, timeout=timeout, args=args))[0]

    async def utility(self, method: str, *args: Any) -> Any:
        """An EngineCore utility method (e.g. `add_lora`, `reset_prefix_cache`)."""
        return await self.core.call_utility_async(method, *args)

    # -- load figures ------------------------------------------------------
    def set_free_blocks(self, free: int) -> None:
        """The block pool's own free count (pushed by the connector): exact
        even while the engine is idle, when vLLM's stats go stale."""
        with self._lock:
            s = self.load
            s.free_blocks = max(0, min(s.num_blocks, free))
            s.kv_cache_usage = 1.0 - s.free_blocks / s.num_blocks if s.num_blocks else 0.0

    def set_preempted(self, keys: list[str]) -> None:
        """The requests vLLM holds preempted (pushed by the connector)."""
        with self._lock:
            self.load.preempted = [str(k) for k in keys]

    def snapshot(self) -> Load:
        with self._lock:
            return dataclasses.replace(self.load, preempted=list(self.load.preempted))

    @property
    def errored(self) -> bool:
        return bool(self.core.resources.engine_dead)

    def shutdown(self) -> None:
        self.core.shutdown()
