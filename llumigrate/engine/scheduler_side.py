"""Scheduler half of the llumigrate KV connector (runs in the EngineCore).

It (1) turns a request's `LoadSpec` into an async KV load of the positions the
destination does not already hold in its prefix cache, (2) streams every
request's block table to the workers so their KV server can serve pulls of a
running request, and (3) holds the blocks of a tracked request when it is
stopped (stop-and-copy) until a worker reports the final pull done, (4)
tells the agent which requests vLLM preempted: they are queued again and hold
no blocks, which the global scheduler must know to see a queue's real head,
and (5) restores a moved request's output tokens (`restore.py`).

A stop is a request finishing at a step boundary: on the agent's `stop`
command (`engine/commands.py`) a running tracked request is capped to end
once its next token is sampled, so no sampled token is thrown away (an abort
lands mid-step and vLLM drops that step's token: one step more downtime).
Requests that are not running are aborted by the agent instead; both end up
held the same way.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from llumigrate.engine.commands import CommandServer
from llumigrate.engine.meta import HeldRequest, LoadJob, SchedulerMeta, WorkerMeta
from llumigrate.engine.notify import Notifier
from llumigrate.engine.params import PARAMS_KEY, RequestTag, plain_stop_reason
from llumigrate.engine.refusal import EngineFacts
from llumigrate.engine.restore import SchedulerRestores
from llumigrate.engine.vllm_compat import (
    cap_output_tokens,
    finish_reason,
    is_aborted,
    is_length_capped,
    is_running,
    is_seeded,
    next_token_cap,
    yield_req_data,
)

# A final load of at most this many blocks runs synchronously, inside the step
# that computes the request's first token on the destination (one engine step
# less downtime than an async load); larger ones load in the background.
SYNC_LOAD_MAX_BLOCKS = 8
# How often the free-block count is checked (and pushed to the agent when it
# changed). vLLM's own stats only come with engine steps, so an idle engine's
# figure would stay stale after an abort freed blocks.
BLOCK_REPORT_S = 0.05


class SchedulerSide:
    def __init__(self, block_size: int, extra: dict[str, Any] | None = None,
                 max_model_len: int | None = None, facts: EngineFacts | None = None) -> None:
        extra = extra or {}
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.restores = SchedulerRestores(facts, max_model_len)
        self.sync_load_max_blocks = int(extra.get("sync_load_max_blocks", SYNC_LOAD_MAX_BLOCKS))
        self.notifier = Notifier(extra.get("notify_path"))
        self._keys: dict[str, str] = {}          # req_id -> key, live requests
        self._tags: dict[str, RequestTag] = {}   # req_id -> tag with load or generator state
        self._matched: dict[str, tuple[int, int, bool]] = {}  # req_id -> (local hit, external, sync)
        self._loads: dict[str, tuple[int, int]] = {}     # req_id -> (local hit, loaded)
        self._failed: set[str] = set()
        self._tracked: set[str] = set()          # keys held when stopped
        self._requests: dict[str, Any] = {}      # key -> vLLM request, live tagged ones
        self._caps: dict[str, tuple[int, int]] = {}  # key -> (output count it stops at, max_tokens)
        # Keys of preempted requests, queued again without blocks: the most
        # recently preempted first, as vLLM re-queues them at the head.
        self._preempted: list[str] = []
        self._meta = SchedulerMeta()
        self._pool: Any = None
        self._reporter: threading.Thread | None = None
        self._commands = CommandServer(extra["command_path"], self._on_command) \
            if extra.get("command_path") else None

    # -- commands (a thread of their own) ---------------------------------------
    def _on_command(self, msg: dict) -> dict:
        if msg.get("kind") == "stop":
            return {"capped": self.cap(str(msg.get("key")))}
        return {"error": f"unknown command {msg.get('kind')!r}"}

    def cap(self, key: str) -> bool:
        """Stop tracked `key` at a step boundary: it finishes once its next
        token is sampled, and is held like an aborted one. False (nothing
        done) unless it is running, decoding (a prefill's next token may be
        many chunks away) and tracked here."""
        request = self._requests.get(key)
        if request is None or key not in self._tracked or not is_running(request) \
                or request.num_output_tokens == 0:
            return False
        cap, before = next_token_cap(request)
        # NOTE: registered before the request can reach it, so that
        # request_finished always tells this stop from a real finish.
        self._caps[key] = (cap, before)
        if cap < before:
            cap_output_tokens(request, cap)
        return True

    def _stopped_at_cap(self, key: str, request: Any) -> bool:
        """Whether `request` finished because `cap` capped it (not for real:
        its own max_tokens, or the model's length, ends it here too)."""
        cap = self._caps.get(key)
        if cap is None or not is_length_capped(request):
            return False
        at_model_len = self.max_model_len is not None and request.num_tokens >= self.max_model_len
        return cap[0] <= request.num_output_tokens < cap[1] and not at_model_len

    def bind_block_pool(self, pool: Any) -> None:
        """vLLM's block pool (public connector hook): report its free blocks."""
        self._pool = pool
        if self.notifier.path and self._reporter is None:
            self._reporter = threading.Thread(target=self._report_blocks, daemon=True,
                                              name="llumigrate-blocks")
            self._reporter.start()

    def _report_blocks(self) -> None:
        last = None
        while True:
            # NOTE: a read of the pool's free count from another thread: one
            # int, at worst one step stale; the engine thread is not disturbed.
            free = int(self._pool.get_num_free_blocks())
            if free != last:
                self.notifier.send("blocks", "", free=free)
                last = free
            time.sleep(BLOCK_REPORT_S)

    # -- admission ---------------------------------------------------------
    def on_new_request(self, request: Any) -> None:
        tag = RequestTag.from_params(request.kv_transfer_params)
        if tag is None:
            return
        self._keys[request.request_id] = tag.key
        self._requests[tag.key] = request
        self._meta.keys[request.request_id] = tag.key
        if tag.load is not None or tag.generator_state is not None:
            self._tags[request.request_id] = tag
        if tag.output_tokens:
            # NOTE: vLLM calls this right after queueing the request, before
            # any prefix lookup: the restored outputs are in its block hashes.
            self.restores.on_new_request(request, tag.output_tokens)

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens past `num_computed_tokens` this connector loads (and
        whether asynchronously). None: not schedulable now (a restored
        request whose grammar refused its outputs; it fails next step)."""
        if not self.restores.admit(request):
            return None, False
        tag = self._tags.get(request.request_id)
        if tag is None or tag.load is None:
            return 0, False
        if request.request_id in self._loads:
            # Asked again: vLLM preempted the request after its load and now
            # re-admits it. The source may have freed what it held (a final
            # load releases it), so recompute from here like vLLM would.
            return 0, False
        # NOTE: vLLM must compute at least one token itself, so never claim the
        # last position even if the source has it.
        limit = min(tag.load.num_tokens, request.num_tokens - 1)
        n = limit - num_computed_tokens
        if n <= 0:
            self._loads[request.request_id] = (num_computed_tokens, 0)
            return 0, False
        sync = tag.load.final and -(-n // self.block_size) <= self.sync_load_max_blocks
        self._matched[request.request_id] = (num_computed_tokens, n, sync)
        return n, not sync

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens == 0 or matched is None:
            return
        local, n, sync = matched
        assert n == num_external_tokens, (n, num_external_tokens)
        assert local % self.block_size == 0, "local prefix hits are block aligned"
        block_ids = blocks.get_block_ids()[0]
        start = local // self.block_size
        end = -(-(local + n) // self.block_size)
        tag = self._tags[request.request_id]
        assert tag.load is not None
        self._meta.loads.append(LoadJob(request.request_id, tag.load, start, list(block_ids[start:end]),
                                        sync=sync))
        self._loads[request.request_id] = (local, n)

    # -- per step ------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any) -> SchedulerMeta:
        meta = self._meta
        for req_id, new_ids, resumed in yield_req_data(scheduler_output):
            if req_id in self._keys and new_ids is not None:
                meta.block_updates.append((req_id, list(new_ids[0]), bool(resumed)))
        for new_req in scheduler_output.scheduled_new_reqs:
            tag = self._tags.get(new_req.req_id)
            if tag is not None and tag.generator_state is not None:
                meta.generator_states[new_req.req_id] = tag.generator_state
        meta.restored_outputs = self.restores.take_scheduled(scheduler_output)
        meta.tracked = frozenset(self._tracked)
        meta.idle = getattr(scheduler_output, "total_num_scheduled_tokens", None) == 0
        self._meta = SchedulerMeta()
        self._note_preemptions(scheduler_output)
        return meta

    def _note_preemptions(self, scheduler_output: Any) -> None:
        """Update the preempted keys from one step's output (scheduled again:
        no longer preempted; newly preempted: to the front) and push the list
        to the agent when it changed."""
        scheduled = {self._keys.get(req_id) for req_id, _, _ in yield_req_data(scheduler_output)}
        # NOTE: a field of vLLM's SchedulerOutput (0.32); read leniently so
        # that a vLLM without it only loses this report.
        preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
        fresh = [self._keys[r] for r in preempted if r in self._keys]
        kept = [k for k in self._preempted if k not in scheduled and k not in fresh]
        self._set_preempted([k for k in fresh if k not in scheduled] + kept)

    def _set_preempted(self, keys: list[str]) -> None:
        """Replace the preempted keys; tell the agent when they changed."""
        if keys != self._preempted:
            self._preempted = keys
            self.notifier.send("preempted", "", keys=list(keys))

    def update_connector_output(self, output: Any) -> None:
        wm = output.kv_connector_worker_meta
        if isinstance(wm, WorkerMeta):
            for key in wm.track - self._tracked:
                self.notifier.send("tracked", key)
            self._tracked |= wm.track
            self._tracked -= wm.untrack
            self._failed |= wm.failed_loads
        if output.failed_recving:
            self._failed |= set(output.failed_recving)

    # -- completion --------------------------------------------------------
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        req_id = request.request_id
        key = self._keys.pop(req_id, None)
        self._tags.pop(req_id, None)
        self._matched.pop(req_id, None)
        load = self._loads.pop(req_id, None)
        failed = req_id in self._failed
        self._failed.discard(req_id)
        report: dict = {}
        if load is not None:
            report.update(hit=load[0], loaded=load[1], failed=failed)
        report.update(self.restores.finished(req_id) or {})
        params = {PARAMS_KEY: report} if report else None
        if key is not None:
            self._requests.pop(key, None)
        stopped = key is not None and (is_aborted(request) or self._stopped_at_cap(key, request))
        if key is not None:
            self._caps.pop(key, None)
            self._set_preempted([k for k in self._preempted if k != key])
        if key is None or key not in self._tracked:
            return False, params
        self._tracked.discard(key)
        if not stopped:
            # It finished for real in the step the stop reached: there is
            # nothing to hold, but the stop's waiter needs the final tokens
            # (the abort may have cut the output stream before they came).
            self.notifier.send("held", key, tokens=list(request.all_token_ids),
                               num_prompt_tokens=request.num_prompt_tokens,
                               finished=finish_reason(request),
                               stop_reason=plain_stop_reason(request.stop_reason))
            return False, params
        held = HeldRequest(req_id, key, list(request.all_token_ids), request.num_prompt_tokens,
                           request.num_computed_tokens, list(block_ids))
        self._meta.held.append(held)
        self.notifier.send("held", key, tokens=held.tokens, num_prompt_tokens=held.num_prompt_tokens,
                           num_computed_tokens=held.num_computed_tokens,
                           num_blocks=len(held.block_ids), seeded=is_seeded(request))
        return held.holds_blocks, params

