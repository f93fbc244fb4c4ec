"""vLLM's public surface as llumigrate uses it outside the engine processes:
`vllm serve`'s argument parser, the engine-core client an agent drives, the
wire codec of vLLM's own engine-core messages, and the `AsyncLLM` frontend
the serve process runs over the cluster.

`vllm_compat.py` holds what runs inside the engine (connector, worker); this
module what runs beside it. The one private access (building `AsyncLLM` over
a client of ours) is isolated in `make_frontend_llm`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from llumigrate.engine.version import check_vllm_version

check_vllm_version()  # before any other vLLM import: one clear message on another version

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.lora.request import LoRARequest
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine import (
    EngineCoreEventType,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
)
from vllm.v1.engine.core_client import EngineCoreClient
from vllm.v1.executor import Executor
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

__all__ = [
    "AsyncEngineArgs", "EngineCoreClient", "EngineCoreOutput", "EngineCoreOutputs", "EngineCoreRequest",
    "FinishReason", "LoRARequest", "PoolingParams", "RequestOutputKind", "SamplingParams",
    "StructuredOutputsParams",
    "serve_arg_parser", "make_engine_core_client", "num_preempted", "encode", "decode_request",
    "decode_outputs", "decode_any", "frontend_config", "make_frontend_llm", "finish_reason_name",
    "finish_reason_from_name", "strip_end", "finished_output", "renamed_output", "keep_preemptions",
    "drop_first_tokens", "terminal_output", "token_output", "retagged", "carrier", "TokenRequests",
    "engine_args_from_argv", "core_refusal", "utility_args", "engine_args_from_namespace", "build_vllm_app",
    "make_http_server", "validate_serve_args", "parse_vllm_serve_args", "logprob_rows",
]


def serve_arg_parser(prog: str) -> FlexibleArgumentParser:
    """`vllm serve`'s own parser: frontend and engine arguments, positional MODEL."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser(prog=prog))


def parse_vllm_serve_args(argv: list[str]) -> Any:
    """`vllm serve`'s parsed and validated arguments (ConfigError if vLLM refuses them)."""
    from llumigrate.errors import ConfigError
    parser = serve_arg_parser("llumigrate serve")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:
        raise ConfigError(f"vLLM refused the arguments {argv}") from e
    if getattr(ns, "model_tag", None):
        ns.model = ns.model_tag
    validate_serve_args(ns)
    return ns


def make_engine_core_client(args: AsyncEngineArgs) -> tuple[Any, Any]:
    """(vllm_config, AsyncMPClient): start one engine core process (and its
    workers) the way `AsyncLLM` does, without vLLM's frontend. Call from a
    running event loop."""
    vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    executor_class = Executor.get_class(vllm_config)
    client = EngineCoreClient.make_async_mp_client(vllm_config, executor_class, log_stats=True)
    return vllm_config, client


def num_preempted(outs: EngineCoreOutputs) -> int:
    """Requests this batch of outputs reports preempted (vLLM's PREEMPTED events)."""
    n = 0
    for o in outs.outputs:
        if o.events:
            n += sum(1 for e in o.events if e.type == EngineCoreEventType.PREEMPTED)
    return n


def finish_reason_name(reason: FinishReason | None) -> str | None:
    """The API's name of a finish reason ("stop", "length", ...), or None."""
    return None if reason is None else str(reason)


def finish_reason_from_name(name: str) -> FinishReason:
    for reason in FinishReason:
        if str(reason) == name:
            return reason
    raise ValueError(f"unknown finish reason {name!r}")


def strip_end(output: EngineCoreOutput) -> EngineCoreOutput:
    """`output`'s tokens without its end (a stopped request continues elsewhere)."""
    return msgspec.structs.replace(output, finish_reason=None, stop_reason=None, kv_transfer_params=None)


def finished_output(request_id: str, token_ids: list[int], reason: str,
                    stop_reason: int | str | None = None) -> EngineCoreOutput:
    """An output that ends `request_id` with `token_ids` (tokens recovered from
    an engine's record, which carry no logprobs)."""
    return EngineCoreOutput(request_id=request_id, new_token_ids=list(token_ids),
                            finish_reason=finish_reason_from_name(reason), stop_reason=stop_reason)


def renamed_output(output: EngineCoreOutput, request_id: str) -> EngineCoreOutput:
    return msgspec.structs.replace(output, request_id=request_id)


def keep_preemptions(output: EngineCoreOutput) -> EngineCoreOutput:
    """`output` from a request's later hop, as the frontend must see it: its
    queueing and scheduling events and prefill stats describe the hop (the
    first hop's already reached the frontend), and its connector report
    (`kv_transfer_params`: what the hop loaded) is llumigrate's, not the
    client's; its preemptions still count."""
    if output.events is None and output.prefill_stats is None and output.kv_transfer_params is None:
        return output
    events = [e for e in output.events or () if e.type == EngineCoreEventType.PREEMPTED]
    return msgspec.structs.replace(output, events=events or None, prefill_stats=None, kv_transfer_params=None)


def drop_first_tokens(output: EngineCoreOutput, n: int) -> EngineCoreOutput:
    """`output` without its first `n` tokens (and their logprobs)."""
    lp = output.new_logprobs
    if lp is not None:
        lp = type(lp)(lp.logprob_token_ids[n:], lp.logprobs[n:], lp.sampled_token_ranks[n:], None)
    return msgspec.structs.replace(output, new_token_ids=list(output.new_token_ids[n:]), new_logprobs=lp)


def logprob_rows(lp: Any, n: int) -> list[list[list]] | None:
    """The last `n` positions of vLLM's LogprobsLists as plain rows: per
    token [[token_id, logprob, rank], ...], the sampled token first (its
    rank), then the top ones (ranks 1, 2, ...). None without logprobs."""
    if lp is None:
        return None
    ids, lps, ranks = lp.logprob_token_ids.tolist(), lp.logprobs.tolist(), lp.sampled_token_ranks.tolist()
    rows = []
    for i in range(len(ids) - n, len(ids)):
        row = [[int(ids[i][0]), float(lps[i][0]), int(ranks[i])]]
        row += [[int(t), float(v), j] for j, (t, v) in enumerate(zip(ids[i][1:], lps[i][1:]), start=1)]
        rows.append(row)
    return rows


def token_output(request_id: str, token_ids: list[int], reason: str | None) -> EngineCoreOutput:
    """An output of tokens only (an agent's `progress` item)."""
    return EngineCoreOutput(request_id=request_id, new_token_ids=list(token_ids),
                            finish_reason=None if reason is None else finish_reason_from_name(reason))


def terminal_output(request_id: str, reason: str, stop_reason: int | str | None = None) -> EngineCoreOutput:
    """An output that only ends `request_id` (no new token)."""
    return finished_output(request_id, [], reason, stop_reason)


def retagged(core: EngineCoreRequest, request_id: str, kv_params: dict, *,
             continued: bool = False) -> EngineCoreRequest:
    """`core` as engine request `request_id`, whose connector parameters are
    `kv_params` only: whatever a client put there is dropped (they instruct
    llumigrate's connector: KV loads, restored outputs). A `continued` hop
    (one restoring output tokens) computes no prompt logprobs: the first hop
    returned them, and they would keep the moved KV out of the prefix cache."""
    sp = core.sampling_params
    if sp is not None:
        sp = copy.copy(sp)
        sp.extra_args = {**(sp.extra_args or {}), "kv_transfer_params": kv_params}
        if continued and (sp.prompt_logprobs is not None or sp.prompt_logprob_token_ids is not None):
            sp.prompt_logprobs = sp.prompt_logprob_token_ids = None
            sp.skip_reading_prefix_cache = False
    return msgspec.structs.replace(core, request_id=request_id, sampling_params=sp)


def carrier(core: EngineCoreRequest, request_id: str, token_ids: list[int],
            kv_params: dict) -> EngineCoreRequest:
    """A pre-copy carrier for `core`: prompt `token_ids`, one greedy token,
    and what keys its blocks in the prefix cache (LoRA adapter, cache salt)
    kept, so the moved request finds them there."""
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                        extra_args={"kv_transfer_params": kv_params})
    sp.output_kind = RequestOutputKind.FINAL_ONLY
    return EngineCoreRequest(request_id=request_id, prompt_token_ids=list(token_ids), mm_features=None,
                             sampling_params=sp, pooling_params=None, arrival_time=time.time(),
                             lora_request=core.lora_request, cache_salt=core.cache_salt,
                             data_parallel_rank=None, priority=core.priority)


def core_refusal(core: EngineCoreRequest, engine_facts: dict | None = None) -> str | None:
    """Why engine request `core` cannot be continued exactly on another
    engine (whose configuration `engine_facts` describes, `EngineFacts`
    fields), or None if it can."""
    from llumigrate.engine.refusal import EngineFacts, migration_refusal
    if core.pooling_params is not None:
        return "a pooling request has no decoding state to move"
    if core.mm_features:
        return "a multimodal request cannot be migrated (its encoder inputs are not carried)"
    if core.resumable:
        return "a streaming-input request cannot be migrated"
    return migration_refusal(core.sampling_params, prompt_embeds=core.prompt_embeds is not None,
                             engine=EngineFacts(**engine_facts) if engine_facts else None)


# -- wire -----------------------------------------------------------------------
# vLLM's own msgpack codec for its engine-core messages: typed msgspec structs,
# tensors inline (one buffer a message), and never pickle: without
# VLLM_ALLOW_INSECURE_SERIALIZATION its decoder refuses pickled payloads.
_INLINE = 1 << 62
_encoder = MsgpackEncoder(size_threshold=_INLINE)
_request_decoder = MsgpackDecoder(EngineCoreRequest)
_outputs_decoder = MsgpackDecoder(EngineCoreOutputs)
_any_decoder = MsgpackDecoder()


def encode(obj: Any) -> bytes:
    """One vLLM message (an EngineCoreRequest, EngineCoreOutputs, a utility's
    arguments or result) as bytes."""
    bufs = _encoder.encode(obj)
    assert len(bufs) == 1, "every array is encoded inline"
    return bytes(bufs[0])


def decode_request(data: bytes) -> EngineCoreRequest:
    return _request_decoder.decode(data)


def decode_outputs(data: bytes) -> EngineCoreOutputs:
    return _outputs_decoder.decode(data)


def decode_any(data: bytes) -> Any:
    """Untyped: plain values (utility arguments and results)."""
    return _any_decoder.decode(data)


def utility_args(name: str, args: Any) -> tuple:
    """An engine utility's arguments as decoded untyped, with the typed ones
    converted back (a LoRA adapter's request)."""
    args = tuple(args or ())
    if name == "add_lora" and args:
        return (msgspec.convert(args[0], LoRARequest), *args[1:])
    return args


# -- the serve process's frontend ---------------------------------------------------
def frontend_config(args: AsyncEngineArgs) -> Any:
    """The VllmConfig the serve process's frontend runs with (no engine is
    started from it)."""
    return args.create_engine_config(UsageContext.OPENAI_API_SERVER)


def engine_args_from_argv(model: str | None, argv: list[str]) -> AsyncEngineArgs:
    """AsyncEngineArgs from `vllm serve`'s argv (frontend arguments ignored)."""
    ns = serve_arg_parser("llumigrate").parse_args([*(["--model", model] if model else []), *argv])
    if getattr(ns, "model_tag", None):
        ns.model = ns.model_tag
    return AsyncEngineArgs.from_cli_args(ns)


class TokenRequests:
    """Engine requests from token ids and sampling parameters, completed by
    vLLM's own input processor as `vllm serve` completes a request (default
    max_tokens, the model's generation config, stop tokens): the Python API's
    way in."""

    def __init__(self, model: str, engine_argv: list[str]) -> None:
        from vllm.v1.engine.input_processor import InputProcessor
        self.vllm_config = frontend_config(engine_args_from_argv(model, engine_argv))
        self.processor = InputProcessor(self.vllm_config)

    def make(self, request_id: str, token_ids: list[int], sampling: Any = None, *,
             priority: int = 0) -> EngineCoreRequest:
        sp = sampling if isinstance(sampling, SamplingParams) else SamplingParams(**(sampling or {}))
        sp.output_kind = RequestOutputKind.DELTA
        core = self.processor.process_inputs(request_id, {"prompt_token_ids": list(token_ids)}, sp,
                                             supported_tasks=("generate",), priority=priority)
        core.external_req_id = request_id
        return core


def engine_args_from_namespace(ns: Any) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(ns)


async def build_vllm_app(llm: Any, args: Any) -> Any:
    """vLLM's own OpenAI-compatible FastAPI app (every route `vllm serve`
    has for this model's tasks) over engine client `llm`, as `vllm serve`
    builds it."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    tasks = await llm.get_supported_tasks()
    app = build_app(args, tasks, llm.model_config)
    await init_app_state(llm, app.state, args, tasks)
    return app


def make_http_server(app: Any, args: Any) -> Any:
    """A uvicorn server for `app` with `vllm serve`'s settings (TLS, limits,
    logging), that installs no signal handlers: serve it with
    `await server.serve(sockets=[sock])`, stop it with `server.should_exit = True`."""
    import uvicorn
    from vllm import envs
    from vllm.entrypoints.launchers.launcher import NoSignalServer
    from vllm.entrypoints.launchers.utils.constants import (H11_MAX_HEADER_COUNT_DEFAULT,
                                                            H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT)
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    kwargs: dict[str, Any] = {}
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        kwargs["log_config"] = log_config
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs, ssl_ciphers=args.ssl_ciphers, **kwargs)
    config.h11_max_incomplete_event_size = args.h11_max_incomplete_event_size or \
        H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT
    config.h11_max_header_count = args.h11_max_header_count or H11_MAX_HEADER_COUNT_DEFAULT
    config.load()
    server = NoSignalServer(config)
    app.state.server = server
    return server


def validate_serve_args(args: Any) -> None:
    """`vllm serve`'s own checks of its parsed arguments."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    validate_parsed_serve_args(args)


@contextlib.contextmanager
def _client_override(client: Any) -> Iterator[None]:
    original = EngineCoreClient.__dict__["make_async_mp_client"]
    EngineCoreClient.make_async_mp_client = staticmethod(lambda *a, **k: client)  # type: ignore[method-assign]
    try:
        yield
    finally:
        EngineCoreClient.make_async_mp_client = original  # type: ignore[method-assign]


def make_frontend_llm(vllm_config: Any, client: Any, *, log_stats: bool = True,
                      log_requests: bool = False, stat_loggers: list | None = None) -> Any:
    """vLLM's `AsyncLLM` (input processing, output processing: detokenization,
    stop strings, logprobs, n > 1 fan-out; stat logging) over `client`, an
    `EngineCoreClient` of ours, instead of one that starts an engine core.

    PRIVATE: `AsyncLLM.__init__` gets its client from the static
    `EngineCoreClient.make_async_mp_client`, replaced for the duration of
    the call (the event loop's thread only; nothing else constructs one
    meanwhile)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    with _client_override(client):
        return AsyncLLM(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config),
                        log_stats=log_stats, log_requests=log_requests,
                        usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers)
