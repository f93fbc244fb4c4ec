"""`EngineRuntime`: one vLLM `AsyncLLM` configured for llumigrate.

It adds llumigrate's KV connector and worker extension to the operator's
engine arguments, turns wire-level sampling dicts into `SamplingParams`, and
exposes a small async surface the agent uses (generate, abort, worker RPCs,
load figures). vLLM arguments pass through unchanged otherwise.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from llumigrate.engine.params import PARAMS_KEY, RequestTag
from llumigrate.engine.vllm_compat import abort_in_engine_core, check_version, is_cpu_platform
from llumigrate.errors import ConfigError

# How long an engine's shm message-queue readers busy-wait after a read, on
# CPU hosts (vLLM's own 1 s starves the forward there; see
# `vllm_compat.bound_mq_spin`). Accelerator hosts keep vLLM's default.
CPU_ENGINE_SPIN_MS = 2.0

CONNECTOR = "LlumigrateConnector"
CONNECTOR_MODULE = "llumigrate.engine.connector"
WORKER_EXTENSION = "llumigrate.engine.worker_ext.LlumigrateWorkerExtension"

# Sampling fields accepted from the wire, with the SamplingParams name.
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
    "stop", "stop_token_ids", "ignore_eos", "logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
    "allowed_token_ids", "bad_words", "structured_outputs",
)


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
    # Requests (agent ids) preempted and not resumed yet: queued again, holding
    # no blocks; the head of vLLM's queue first.
    preempted: list[str] = field(default_factory=list)


@dataclass
class Delta:
    """New output of one engine request."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: Any
    kv_params: dict | None
    num_prompt_tokens: int
    # Per new token, when the request asked for logprobs: [[token_id, logprob,
    # rank], ...], the sampled token first, then the top ones.
    logprobs: list[list[list]] | None = None


class _LoadLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, *, sink: Load,
                 lock: threading.Lock) -> None:
        self.sink, self.lock = sink, lock
        self.sink.num_blocks = max(0, int(vllm_config.cache_config.num_gpu_blocks or 0) - 1)
        self.sink.free_blocks = self.sink.num_blocks  # no step has run yet: all free

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        with self.lock:
            s = self.sink
            s.num_running = scheduler_stats.num_running_reqs
            s.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            s.steps += 1
            if iteration_stats is not None:
                s.num_preempted += int(getattr(iteration_stats, "num_preempted_reqs", 0) or 0)

    def log_engine_initialized(self) -> None:
        pass


def parse_engine_args(model: str, engine_argv: list[str], *, kv_host: str = "127.0.0.1",
                      kv_token: str | None = None, kv_transport: str = "auto",
                      notify_path: str | None = None, command_path: str | None = None,
                      engine_spin_ms: float | None = None) -> AsyncEngineArgs:
    """vLLM engine args from `vllm serve`-style argv, plus llumigrate's hooks.
    `engine_spin_ms` bounds the engine's message-queue busy-wait; None picks
    `CPU_ENGINE_SPIN_MS` on a CPU host and vLLM's default elsewhere."""
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="llumigrate-engine"))
    ns = parser.parse_args(["--model", model, *engine_argv])
    args = AsyncEngineArgs.from_cli_args(ns)
    if args.kv_transfer_config is not None:
        raise ConfigError("llumigrate installs its own --kv-transfer-config; remove yours")
    if args.enable_prefix_caching is False:
        raise ConfigError("llumigrate needs prefix caching (pre-copied blocks land in it)")
    if args.worker_extension_cls:
        raise ConfigError("llumigrate installs its own --worker-extension-cls; remove yours")
    extra = {"kv_host": kv_host, "kv_transport": kv_transport}
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


def wire_logprobs(positions: Any) -> list[list[list]] | None:
    """vLLM's sample logprobs (per position, {token_id: Logprob}) as plain
    lists for msgpack: per position [[token_id, logprob, rank], ...]."""
    if positions is None:
        return None
    return [[[int(t), float(lp.logprob), lp.rank] for t, lp in (pos or {}).items()]
            for pos in positions]


def sampling_params(d: dict, tag: RequestTag, *, stream: bool = True) -> SamplingParams:
    unknown = set(d) - set(SAMPLING_FIELDS)
    if unknown:
        raise ConfigError(f"unknown sampling fields {sorted(unknown)}; allowed: {list(SAMPLING_FIELDS)}")
    kwargs = dict(d)
    if kwargs.get("structured_outputs") is not None:
        from vllm.sampling_params import StructuredOutputsParams
        kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
    try:
        sp = SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad sampling parameters: {e}") from e
    sp.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    # The agent streams token ids; text is made where the client is (the
    # frontend, over every hop). Detokenizing here too would only cost CPU,
    # unless the caller asked the engine itself for stop strings.
    if not sp.stop:
        sp.detokenize = False
    sp.extra_args = {**(sp.extra_args or {}), "kv_transfer_params": tag.to_params()}
    return sp


class EngineRuntime:
    def __init__(self, args: AsyncEngineArgs) -> None:
        check_version()
        self.load = Load()
        self._lock = threading.Lock()
        factory = lambda cfg, idx=0: _LoadLogger(cfg, idx, sink=self.load, lock=self._lock)  # noqa: E731
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[factory])
        self.block_size = int(self.llm.vllm_config.cache_config.block_size)
        self.max_model_len = int(self.llm.model_config.max_model_len)

    async def rpc(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        return (await self.llm.collective_rpc(method, timeout=timeout, args=args))[0]

    async def generate(self, request_id: str, prompt_token_ids: list[int], sp: SamplingParams,
                       priority: int = 0) -> AsyncIterator[Delta]:
        prompt = {"prompt_token_ids": list(prompt_token_ids)}
        async for out in self.llm.generate(prompt, sp, request_id, priority=priority):
            c = out.outputs[0]
            kvp = out.kv_transfer_params.get(PARAMS_KEY) if out.kv_transfer_params else None
            yield Delta(list(c.token_ids), out.finished, c.finish_reason, c.stop_reason, kvp,
                        len(out.prompt_token_ids or ()), wire_logprobs(c.logprobs))

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def abort_in_engine_core(self, request_id: str) -> bool:
        """Abort in the engine core only: the output of the step in flight
        still streams (see `vllm_compat.abort_in_engine_core`); `abort` ends
        the stream after."""
        return await abort_in_engine_core(self.llm, request_id)

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
            return dataclasses.replace(self.load)

    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def shutdown(self) -> None:
        self.llm.shutdown()
