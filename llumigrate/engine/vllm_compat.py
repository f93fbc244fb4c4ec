"""Every vLLM import of llumigrate, and the only access to vLLM internals.

Public extension points (KVConnectorBase_V1, worker extensions, AsyncLLM) are
re-exported here. The private accesses llumigrate needs (a worker request's
sampler generator and output count, for exact seeded migration; the engine
message queue's spin; the frontend's request-id table, to abort a request in
the engine core without dropping its last step's output; a scheduler
request's `max_tokens`, to stop one at a step boundary; restoring a moved
request's output tokens in the scheduler, its grammar and the worker's input
batch) are isolated below and checked against the supported version at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llumigrate.engine.version import check_vllm_version

check_vllm_version()  # before any other vLLM import: one clear message on another version

from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.sampling_params import SamplingType, StructuredOutputsParams
from vllm.v1.request import RequestStatus
from vllm.v1.structured_output.backend_types import StructuredOutputGrammar
from vllm.v1.structured_output.request import StructuredOutputRequest

from llumigrate.engine.refusal import EngineFacts

__all__ = [
    "KVConnectorBase_V1", "KVConnectorMetadata", "KVConnectorRole", "KVConnectorWorkerMetadata",
    "get_kv_transfer_group", "has_kv_transfer_group", "yield_req_data", "check_version",
    "is_aborted", "finish_reason", "is_seeded", "request_sampler_state", "bound_mq_spin", "is_cpu_platform",
    "is_running", "next_token_cap", "cap_output_tokens", "is_length_capped",
    "engine_facts", "restore_output_tokens", "fail_waiting_request", "advance_grammar",
    "install_add_request_hook",
]


def check_version() -> None:
    """Fail clearly on a vLLM release whose internals we have not checked."""
    check_vllm_version()


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    return bool(current_platform.is_cpu())


def is_aborted(request: Any) -> bool:
    return request.status == RequestStatus.FINISHED_ABORTED


def is_running(request: Any) -> bool:
    return request.status == RequestStatus.RUNNING


def is_length_capped(request: Any) -> bool:
    return request.status == RequestStatus.FINISHED_LENGTH_CAPPED


def next_token_cap(request: Any) -> tuple[int, int]:
    """(the output count at which scheduler request `request` ends if capped
    now: after its next sampled token, its max_tokens now)."""
    before = int(request.max_tokens)
    return min(before, request.num_output_tokens + 1), before


def cap_output_tokens(request: Any, cap: int) -> None:
    """Make `request` finish (as length-capped) once it has `cap` output
    tokens. Safe from another thread: one attribute store; a step whose stop
    check already ran finishes it one token later.

    PRIVATE: `Request.max_tokens`, which `check_stop` reads after each step."""
    request.max_tokens = cap


def finish_reason(request: Any) -> str | None:
    """A finished scheduler request's reason as the API names it ("length",
    "stop", ...), or None while it runs."""
    reason = request.get_finished_reason()
    return None if reason is None else str(reason)


def is_seeded(request: Any) -> bool:
    """True if the request samples with its own seeded generator (whose state
    a migration must carry)."""
    sp = getattr(request, "sampling_params", None)
    return sp is not None and sp.sampling_type == SamplingType.RANDOM_SEED


def request_sampler_state(model_runner: Any, req_id: str) -> Any | None:
    """The worker's cached state of a request (`generator`, `output_token_ids`),
    or None. PRIVATE: `GPUModelRunner.requests` of the V1 model runner (the CPU
    runner subclasses it). Model Runner V2 keeps this elsewhere."""
    requests = getattr(model_runner, "requests", None)
    if requests is None:
        raise RuntimeError("this vLLM model runner has no `requests` table (Model Runner V2?)")
    return requests.get(req_id)


def bound_mq_spin(spin_s: float, recheck_s: float = 0.02) -> bool:
    """Bound how long vLLM's shared-memory message-queue readers busy-wait.

    The engine core and each worker exchange every step over a shm ring
    buffer whose reader spins (`sched_yield`) for 1 s after each read before
    it sleeps on a ZMQ notification, re-checking every 5 s. On a CPU host the
    model's forward needs the very cores the idle sides spin on: measured here
    (2 cores, 2 engines), single steps stalled for 0.5-6 s. With a short spin
    the reader sleeps on the notification almost at once, and a missed
    notification costs at most `recheck_s`.

    PRIVATE: `shm_broadcast.SpinCondition.wait` reads `busy_loop_s` (1 s) and
    `SHM_READER_RECHECK_INTERVAL_MS` (5000). Call in each engine process (the
    connector does, in both roles). Returns False, changing nothing, where
    this vLLM has no such reader.
    """
    try:
        from vllm.distributed.device_communicators import shm_broadcast as sb
    except ImportError:  # pragma: no cover
        return False
    cond = getattr(sb, "SpinCondition", None)
    if cond is None or not hasattr(sb, "SHM_READER_RECHECK_INTERVAL_MS"):
        return False
    sb.SHM_READER_RECHECK_INTERVAL_MS = max(1, int(recheck_s * 1000))
    original = getattr(cond, "_llumigrate_original_wait", cond.wait)

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        self.busy_loop_s = spin_s
        original(self, timeout_ms)

    cond._llumigrate_original_wait = original
    cond.wait = wait
    return True


def engine_facts(vllm_config: Any) -> EngineFacts:
    """The facts of this engine's configuration that decide what a restore
    can carry (`refusal.migration_refusal`)."""
    so = vllm_config.structured_outputs_config
    return EngineFacts(
        speculative=vllm_config.speculative_config is not None,
        model_runner_v2=bool(getattr(vllm_config, "use_v2_model_runner", False)),
        async_scheduling=bool(vllm_config.scheduler_config.async_scheduling),
        reasoning_parser=bool(so.reasoning_parser),
        structured_in_reasoning=bool(so.enable_in_reasoning),
    )


def restore_output_tokens(request: Any, tokens: list[int]) -> None:
    """Give a just-queued scheduler request (nothing computed, no outputs)
    the output tokens it had on its source, before any prefix lookup.

    PRIVATE: `Request.append_output_token_ids` (extends its output and all
    token lists and hashes the new full blocks, so the prefix lookup and the
    connector see prompt + outputs; `num_output_tokens` counts them for
    max_tokens, min_tokens and stop checks). And `Request.prefill_stats`, set
    to None: vLLM's prompt-only prefill accounting asserts that the prefix hit
    lies within the prompt (`Scheduler.schedule`, `PrefillStats.set`), which
    a restored request's hit over prompt + outputs does not."""
    assert request.num_output_tokens == 0 and request.num_computed_tokens == 0, request.request_id
    request.append_output_token_ids(list(tokens))
    request.prefill_stats = None


def fail_waiting_request(request: Any, reason: str) -> None:
    """Make the scheduler finish `request`, waiting and never scheduled, with
    FINISHED_ERROR (finish reason "error" to its client) at its next schedule.

    PRIVATE: vLLM's path for a grammar that failed to compile. A request in
    WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR whose `structured_output_request.
    grammar` is an Exception is put in `grammar_compile_error_reqs` by
    `Scheduler._handle_blocked_waiting_request` and finished in
    `update_from_output`. A request without structured output is given a
    stand-in structured-output record that only carries the error."""
    so = request.structured_output_request
    if so is None:
        so = request.structured_output_request = StructuredOutputRequest(
            params=StructuredOutputsParams(regex=".*"))
    so.grammar = RuntimeError(reason)
    request.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR


def advance_grammar(request: Any, tokens: list[int], facts: EngineFacts) -> str | None:
    """Advance `request`'s compiled grammar over its restored output tokens as
    the source's `update_from_output` advanced it (`StructuredOutputManager.
    accept_tokens`); None if it did, else why not. Call once, when the grammar
    is compiled and before the request's first bitmask.

    Exact only where vLLM constrains the output from its first token (no
    reasoning parser, `enable_in_reasoning`, or the frontend found reasoning
    already ended): there, feeding the tokens together equals feeding them one
    per step. Where a reasoning parser decides where the grammar starts, the
    answer is a refusal, not a guess.

    PRIVATE: `Request.structured_output_request` (`grammar`, `reasoning_ended`),
    `StructuredOutputGrammar.accept_tokens`."""
    so = request.structured_output_request
    if so is None or not tokens:
        return None
    grammar = so.grammar
    if not isinstance(grammar, StructuredOutputGrammar):
        return f"its grammar is not compiled ({type(grammar).__name__})"
    if facts.reasoning_parser and not facts.structured_in_reasoning and not so.reasoning_ended:
        return "a reasoning parser decides where its grammar starts; a restore cannot replay that"
    so.reasoning_ended = True  # as accept_tokens latches it on a constrained output
    if not grammar.accept_tokens(request.request_id, list(tokens)):
        return "its grammar rejected the restored output tokens"
    return None


def install_add_request_hook(model_runner: Any, before_add: Callable[[Any], None]) -> None:
    """Call `before_add(req_state)` just before each request's cached state
    (`CachedRequestState`) enters the model runner's persistent input batch.
    Idempotent; call it again on each step that needs it, since the runner
    may re-create its input batch (`may_reinitialize_input_batch`).

    PRIVATE: the V1 runner's `input_batch` and `InputBatch.add_request`,
    which `GPUModelRunner._update_states` calls for every new (and resumed)
    request after building its state with `output_token_ids=[]` from
    `NewRequestData` (prompt only). `add_request` copies the state's
    `output_token_ids` into the batch's token ids and output lists
    (penalties, bad words) and hands the same list to the logits processors
    (min_tokens, logit bias): extended here, vLLM fills all of it natively.
    The CPU runner subclasses the V1 runner; Model Runner V2 has no such
    batch and raises here."""
    batch = getattr(model_runner, "input_batch", None)
    add = getattr(batch, "add_request", None)
    if add is None:
        raise RuntimeError("this vLLM model runner has no V1 input batch (Model Runner V2?); "
                           "cannot restore a moved request's output tokens")
    if getattr(batch, "_llumigrate_before_add", None) == before_add:  # bound methods: ==, not is
        return
    original = getattr(batch, "_llumigrate_original_add", add)

    def add_request(request: Any) -> int:
        before_add(request)
        return original(request)

    batch._llumigrate_original_add = original
    batch._llumigrate_before_add = before_add
    batch.add_request = add_request
