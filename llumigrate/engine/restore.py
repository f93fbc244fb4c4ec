"""Restoring a moved request: the destination holds it exactly as its source did.

The destination engine gets the request with its original prompt P and
sampling parameters, and its tag carries the output tokens O it produced on
the source (`RequestTag.output_tokens`). Both connector halves then give vLLM
the state it would have had, had it produced O itself:

1. Scheduler (`SchedulerRestores`, EngineCore thread): when the request is
   queued, O is appended to its output tokens, before any scheduling or prefix
   lookup: block hashes cover P+O (prefix hits, and the connector's matched
   tokens, span them), and max_tokens, min_tokens and stop checks count O.
2. Grammar: structured output compiles asynchronously; the scheduler takes
   the request out of WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR only once it is
   compiled and then asks the connector for matched tokens in the same pass.
   That first ask advances the grammar over O, before the request's first
   bitmask. A grammar that refuses O fails the request ("error").
3. Worker (`WorkerRestores`): vLLM's V1 runner builds a new request's state
   from the prompt only. The step's metadata names the restored requests that
   enter the batch in this step, with O; `handle_preemptions` (before the
   runner's `_update_states`) stashes them and a hook on the input batch's
   `add_request` extends the request state's output tokens with O just before
   it enters the batch, so vLLM fills token ids, penalties, bad words and the
   logits processors' state (min_tokens, logit bias) itself.

The engine emits only the tokens sampled after O. What cannot be restored
exactly is refused (`refusal.migration_refusal`); a request that reaches an
engine anyway fails there with the reason logged.
"""

from __future__ import annotations

import logging
from typing import Any

from llumigrate.engine.refusal import EngineFacts, migration_refusal
from llumigrate.engine.vllm_compat import (
    advance_grammar,
    fail_waiting_request,
    install_add_request_hook,
    restore_output_tokens,
)

logger = logging.getLogger(__name__)


class SchedulerRestores:
    """The scheduler half: restored requests from queueing to first schedule."""

    def __init__(self, facts: EngineFacts | None = None, max_model_len: int | None = None) -> None:
        self.facts = facts or EngineFacts()
        self.max_model_len = max_model_len
        self._outputs: dict[str, tuple[int, ...]] = {}  # req_id -> O, until first scheduled
        self._grammar: set[str] = set()                  # req_ids whose grammar has not seen O
        self._restored: dict[str, int] = {}              # req_id -> len(O), live restored requests
        self._cached: dict[str, int] = {}                # req_id -> tokens not computed when scheduled

    def on_new_request(self, request: Any, tokens: tuple[int, ...]) -> None:
        """Give just-queued `request` its output tokens `tokens`, or make it
        fail at its next schedule if they cannot be restored exactly."""
        reason = self._refusal(request, tokens)
        if reason is not None:
            logger.error("cannot restore request %s: %s; failing it", request.request_id, reason)
            fail_waiting_request(request, f"llumigrate restore refused: {reason}")
            return
        restore_output_tokens(request, list(tokens))
        self._outputs[request.request_id] = tokens
        self._restored[request.request_id] = len(tokens)
        if request.use_structured_output:
            self._grammar.add(request.request_id)

    def _refusal(self, request: Any, tokens: tuple[int, ...]) -> str | None:
        if request.sampling_params is None:
            return "not a generation request"
        embeds = request.prompt_token_ids is None or getattr(request, "prompt_embeds", None) is not None
        reason = migration_refusal(request.sampling_params, engine=self.facts, prompt_embeds=embeds)
        if reason is not None:
            return reason
        if request.num_output_tokens or request.num_computed_tokens:
            return "it already has output tokens"
        if min(tokens) < 0:
            return "negative token ids"
        if len(tokens) >= request.max_tokens:
            return f"{len(tokens)} output tokens leave none of max_tokens={request.max_tokens}"
        if self.max_model_len is not None and request.num_tokens + len(tokens) >= self.max_model_len:
            return f"{request.num_tokens}+{len(tokens)} tokens leave no room in {self.max_model_len}"
        return None

    def admit(self, request: Any) -> bool:
        """Called when the scheduler asks the connector for `request`'s
        matched tokens (its grammar, if any, is compiled by then). The first
        time, advance its grammar over the restored tokens; False if that
        failed, and the request then fails at its next schedule."""
        req_id = request.request_id
        if req_id not in self._grammar:
            return True
        self._grammar.discard(req_id)
        reason = advance_grammar(request, list(self._outputs.get(req_id, ())), self.facts)
        if reason is None:
            return True
        logger.error("restored request %s cannot continue: %s; failing it", req_id, reason)
        fail_waiting_request(request, f"llumigrate restore failed: {reason}")
        return False

    def take_scheduled(self, scheduler_output: Any) -> dict[str, list[int]]:
        """req_id -> restored output tokens, for restored requests this step
        schedules for the first time (they enter the workers' batch now)."""
        out: dict[str, list[int]] = {}
        for new_req in scheduler_output.scheduled_new_reqs:
            tokens = self._outputs.pop(new_req.req_id, None)
            # NOTE: vLLM asks for matched tokens (`admit`) before it schedules
            # a request that has computed nothing, so its grammar saw O.
            assert new_req.req_id not in self._grammar, new_req.req_id
            if tokens is not None:
                out[new_req.req_id] = list(tokens)
                self._cached[new_req.req_id] = int(new_req.num_computed_tokens)
        return out

    def finished(self, req_id: str) -> dict | None:
        """Forget `req_id`; what to report of its restore, or None if it was
        not restored: {"restored": len(O), "cached": positions of P+O it did
        not compute (prefix hits and loads)}."""
        self._outputs.pop(req_id, None)
        self._grammar.discard(req_id)
        cached = self._cached.pop(req_id, None)
        restored = self._restored.pop(req_id, None)
        if restored is None:
            return None
        return {"restored": restored, "cached": cached}


class WorkerRestores:
    """The worker half: restored output tokens of the requests that enter
    this step's input batch."""

    def __init__(self) -> None:
        self._pending: dict[str, list[int]] = {}

    def install(self, model_runner: Any) -> None:
        """Hook `model_runner`'s input batch (idempotent; re-run each step
        that restores, as the runner may re-create its batch)."""
        install_add_request_hook(model_runner, self.before_add)

    def stash(self, model_runner: Any, outputs: dict[str, list[int]]) -> None:
        """Keep this step's restored outputs until their requests enter the
        batch. Called before the runner updates its states."""
        if not outputs:
            return
        if model_runner is None:
            raise RuntimeError(f"restored requests {sorted(outputs)} arrived before the llumigrate "
                               "worker extension was attached (llumigrate_attach); they would "
                               "run without their output tokens")
        self.install(model_runner)
        self._pending.update(outputs)

    def before_add(self, req_state: Any) -> None:
        tokens = self._pending.pop(req_state.req_id, None)
        if tokens is None:
            return
        assert not req_state.output_token_ids, f"{req_state.req_id} already has output tokens"
        req_state.output_token_ids.extend(tokens)

    def check_applied(self) -> None:
        """After the runner updated its states: every stashed request entered the batch."""
        # NOTE: the scheduler names a restored request in the step that first
        # schedules it, and the runner adds every newly scheduled request to
        # its batch in that step's `_update_states`.
        assert not self._pending, f"restored requests missed the input batch: {sorted(self._pending)}"
