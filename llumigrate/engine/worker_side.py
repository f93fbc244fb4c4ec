"""Worker half of the llumigrate KV connector (runs in each vLLM worker).

Owns this engine's KV server (serves pulls of running and held requests from
the block tables the scheduler half streams over, and holds stopped requests'
blocks until their final pull) and a KV client, through which `kv_loads.
LoadRunner` runs the loads the scheduler half plans. The tables are shared
between the engine thread (`bind`, `get_finished`, RPCs) and the KV server's
threads, under `self._lock`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from llumigrate.engine.kv_loads import LoadRunner
from llumigrate.engine.meta import HeldRequest, SchedulerMeta, WorkerMeta
from llumigrate.engine.notify import Notifier
from llumigrate.engine.params import SealedRequest
from llumigrate.engine.restore import WorkerRestores
from llumigrate.engine.sampler_state import SamplerStates, install_sampler_state
from llumigrate.errors import TransferRefused
from llumigrate.transfer import Grant, KVClient, KVServer, PullRequest
from llumigrate.transfer.connection import InjectedFault

logger = logging.getLogger(__name__)

# How long an idle step waits for a load to end or a hold to be released.
IDLE_WAIT_S = 0.02


@dataclass
class _Entry:
    key: str
    block_ids: list[int] = field(default_factory=list)
    epoch: int = 0


@dataclass
class _Held:
    req: HeldRequest
    generator_state: bytes | None
    deadline: float


class WorkerSide:
    def __init__(self, block_size: int, extra: dict[str, Any]) -> None:
        self.block_size = block_size
        self.host = str(extra.get("kv_host", "127.0.0.1"))
        self.token = extra.get("kv_token")
        self.transport = str(extra.get("kv_transport", "auto"))
        self.hold_lease_s = float(extra.get("hold_lease_s", 120.0))
        self.model_runner: Any = None
        self.notifier = Notifier(extra.get("notify_path"))
        # Set when a background load ends or held blocks are released: an
        # idle step waits for it (see `get_finished`).
        self._news = threading.Event()
        self.idle_wait_s = float(extra.get("idle_wait_s", IDLE_WAIT_S))
        self.loads = LoadRunner(float(extra.get("load_timeout_s", 30.0)), on_finished=self._news.set)
        self._idle_step = False
        self._lock = threading.Condition()
        self._entries: dict[str, _Entry] = {}        # req_id -> live block table
        self._by_key: dict[str, str] = {}            # key -> req_id
        self._held: dict[str, _Held] = {}            # key -> held stopped request
        # Recently departed keys and why (named in a refused pull's error).
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._tracked: set[str] = set()
        self._scheduler_tracked: frozenset[str] = frozenset()
        self._new_track: set[str] = set()
        self._new_untrack: set[str] = set()
        # Untracks sent that the scheduler's `tracked` set does not show yet.
        self._untrack_sent: set[str] = set()
        self._sampler = SamplerStates()
        self.restores = WorkerRestores()
        self._released: set[str] = set()             # req_ids to report finished_sending
        self._release_pending: dict[str, float] = {}  # key -> until: release when held arrives
        self.server: KVServer | None = None
        self.client: KVClient | None = None
        self.layers: list[torch.Tensor] = []
        self.stats = {"pulls_served": 0}

    # -- setup -------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layers = list(kv_caches.values())
        self.server = KVServer(self.layers, self._provide, host=self.host, token=self.token,
                               on_complete=self._on_pull_complete)
        self.server.start()
        self.client = self.loads.client = KVClient(self.layers, token=self.token, transport=self.transport)

    def attach(self, model_runner: Any) -> dict:
        """Take this worker's model runner (the worker extension's
        `llumigrate_attach`); returns `info()` plus whether restored requests
        can be held here ("restores": the runner has a V1 input batch)."""
        self.model_runner = model_runner
        try:
            self.restores.install(model_runner)
            restores = True
        except RuntimeError as e:
            logger.warning("%s", e)
            restores = False
        return {**self.info(), "restores": restores}

    def info(self) -> dict:
        assert self.server is not None, "KV caches not registered yet"
        host, port = self.server.address
        return {"kv_host": host, "kv_port": port, "block_size": self.block_size,
                "num_blocks": int(self.layers[0].shape[0]), "num_layers": len(self.layers),
                "block_bytes": int(self.layers[0][0].numel() * self.layers[0].element_size())}

    # -- engine thread, once per step ------------------------------------------
    def before_update(self, meta: SchedulerMeta) -> None:
        """Before the runner updates its request states for this step: keep
        the restored outputs of the requests entering its batch now."""
        self.restores.stash(self.model_runner, meta.restored_outputs)

    def bind(self, meta: SchedulerMeta) -> None:
        self.restores.check_applied()
        self._idle_step = meta.idle
        with self._lock:
            self._scheduler_tracked = meta.tracked
            self._untrack_sent &= meta.tracked
            for req_id, key in meta.keys.items():
                self._entries[req_id] = _Entry(key)
                self._by_key[key] = req_id
            for req_id, ids, replace in meta.block_updates:
                entry = self._entries.get(req_id)
                if entry is None:
                    continue
                if replace:  # resumed after preemption: its old blocks were freed
                    entry.block_ids = list(ids)
                    entry.epoch += 1
                else:
                    entry.block_ids.extend(ids)
            new_held = []
            for held in meta.held:
                gen = self._sampler.state_after(held.key, len(held.tokens) - held.num_prompt_tokens)
                h = self._held[held.key] = _Held(held, gen,
                                                  time.monotonic() + self.hold_lease_s)
                if self._release_pending.pop(held.key, None) is not None:
                    self._release_locked(held.key)  # released before it got here
                    continue
                new_held.append(h)
            self._snapshot_generators()
            self._lock.notify_all()
        for h in new_held:
            if h.generator_state is not None or self._sampler.has(h.req.key):
                self.notifier.send("held_gen", h.req.key, gen=h.generator_state)
        for req_id, state in meta.generator_states.items():
            install_sampler_state(self.model_runner, req_id, state)
        for job in meta.loads:
            self.loads.submit(job)

    def run_sync_loads(self) -> None:
        """Run this step's synchronous loads (small final tails) before the
        forward that needs them. A failed one marks its blocks as load errors,
        which vLLM turns into a failed request (policy `fail`)."""
        self.loads.run_sync()

    def take_load_error_blocks(self) -> set[int]:
        return self.loads.take_error_blocks()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving).

        NOTE: while vLLM has nothing to compute but waits on this connector
        (a pre-copy or migrated request whose KV is loading, blocks held for a
        pull), its engine loop steps every millisecond just to ask, and on a
        few shared cores those empty steps slow the engines that do compute.
        Such an idle step waits here up to `idle_wait_s` for a load to end or
        a hold to be released; news ends the wait at once, so nothing is
        noticed later. What else reaches an engine in that state (a new
        request, an abort, a utility call such as `release`) waits at most
        that long."""
        if self._idle_step and (self.loads.busy or self._held):
            self._news.wait(self.idle_wait_s)
        self._news.clear()
        now = time.monotonic()
        with self._lock:
            for req_id in finished_req_ids:
                entry = self._entries.pop(req_id, None)
                if entry is not None and self._by_key.get(entry.key) == req_id:
                    del self._by_key[entry.key]
                    if entry.key not in self._held:
                        self._note_gone(entry.key, "finished")
                        self._forget_key(entry.key)
            for key, until in list(self._release_pending.items()):
                if until < now:
                    del self._release_pending[key]
            for key, held in list(self._held.items()):
                if held.deadline < now:
                    logger.warning("hold on %s expired; releasing its blocks", key)
                    self._release_locked(key)
            sending, self._released = self._released, set()
        recving, failed = self.loads.take_finished()
        return sending, recving | failed, failed

    def build_worker_meta(self) -> WorkerMeta | None:
        with self._lock:
            if not (self._new_track or self._new_untrack):
                return None
            meta = WorkerMeta(self._new_track, self._new_untrack)
            self._untrack_sent |= self._new_untrack
            self._new_track, self._new_untrack = set(), set()
        return meta

    # -- RPCs from the agent (engine thread, between steps) --------------------
    def track(self, key: str) -> bool:
        """Start tracking `key` for a migration: hold its blocks on abort and
        keep sampler snapshots. Returns True once the scheduler half holds."""
        with self._lock:
            # A release kept pending from an earlier, cancelled migration must
            # not free the hold this one makes (seen under the stress test).
            self._release_pending.pop(key, None)
            if key not in self._tracked:
                self._tracked.add(key)
                self._new_track.add(key)
                self._new_untrack.discard(key)
            # NOTE: after an untrack the scheduler's set still shows the key
            # until it has applied the untrack; only then does it show this
            # new track. Trusting the stale set let a stop land untracked
            # (no hold, no seal) under the stress test.
            return key in self._scheduler_tracked and key not in self._untrack_sent

    def untrack(self, key: str) -> None:
        with self._lock:
            if key in self._tracked:
                self._tracked.discard(key)
                self._new_untrack.add(key)
                self._new_track.discard(key)
            if key not in self._held:
                self._sampler.forget(key)

    def sealed(self, key: str) -> dict | None:
        """The held record of a stopped request, or None while not yet held."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                return None
            r = held.req
            return SealedRequest(key, r.tokens, r.num_prompt_tokens, r.num_computed_tokens,
                                 len(r.block_ids), held.generator_state).to_wire()

    def release(self, key: str) -> bool:
        """Free the held blocks of stopped `key`. The hold may not have reached
        this worker yet (the scheduler holds at the abort; the worker hears of
        it one step later): then it is released the moment it arrives."""
        with self._lock:
            if self._release_locked(key):
                return True
            self._release_pending[key] = time.monotonic() + self.hold_lease_s
            return False

    def status(self) -> dict:
        with self._lock:
            return {"held": sorted(self._held), "tracked": sorted(self._tracked),
                    "entries": len(self._entries), **self.stats, **self.loads.stats(),
                    "faults_fired": self.client.faults_fired if self.client else 0}

    def inject_fault(self, kind: str, seconds: float = 0.0) -> bool:
        """Stress testing: make this worker's next KV pull fail mid-transfer
        (`kind` "drop" or "stall"; "clear" disarms). Returns True when a fault
        armed earlier had not fired. Off unless called."""
        assert self.client is not None, "KV caches not registered yet"
        return self.client.arm_fault(None if kind == "clear" else InjectedFault(kind, float(seconds)))

    # -- KV server callbacks (transfer threads) -------------------------------
    def _provide(self, pull: PullRequest) -> Grant:
        with self._lock:
            held = self._held.get(pull.key)
            if held is not None:
                block_ids = held.req.block_ids
            else:
                req_id = self._by_key.get(pull.key)
                entry = self._entries.get(req_id) if req_id else None
                if entry is None:
                    gone = self._gone.get(pull.key)
                    raise TransferRefused(
                        f"no running or held request {pull.key!r} here "
                        f"({len(self._by_key)} running, {len(self._held)} held"
                        + (f"; it left: {gone})" if gone else "; never seen)"))
                block_ids = entry.block_ids
            end = pull.start_block + pull.num_blocks
            if pull.start_block < 0 or end > len(block_ids):
                raise TransferRefused(
                    f"blocks [{pull.start_block}, {end}) out of range: {pull.key!r} has {len(block_ids)}")
            self.stats["pulls_served"] += 1
            return Grant(list(block_ids[pull.start_block:end]))

    def _on_pull_complete(self, pull: PullRequest, ok: bool) -> None:
        if ok and pull.final:
            with self._lock:
                self._release_locked(pull.key)

    # -- sampler state -----------------------------------------------------------
    def _snapshot_generators(self) -> None:
        """Snapshot each tracked seeded request's generator (before this step's forward)."""
        if self.model_runner is None:
            return
        for key in self._tracked:
            req_id = self._by_key.get(key)
            if req_id:
                self._sampler.snapshot(self.model_runner, key, req_id)

    # -- internals -----------------------------------------------------------
    def _release_locked(self, key: str) -> bool:
        held = self._held.pop(key, None)
        if held is None:
            return False
        if held.req.holds_blocks:
            self._released.add(held.req.req_id)
            self._news.set()
        self._note_gone(key, "released")
        if key not in self._tracked or self._by_key.get(key) is None:
            self._forget_key(key)
        return True

    def _note_gone(self, key: str, why: str) -> None:
        self._gone[key] = why
        while len(self._gone) > 256:
            self._gone.popitem(last=False)

    def _forget_key(self, key: str) -> None:
        self._sampler.forget(key)
        if key in self._tracked:
            self._tracked.discard(key)
            self._new_untrack.add(key)

    def shutdown(self) -> None:
        self.loads.shutdown()
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.close()
