"""`Cluster`: the Python API over a set of instance agents.

    async with Cluster(model, num_instances=2, engine_args=[...]) as c:
        h = await c.submit(prompt_token_ids, {"max_tokens": 64, "temperature": 0})
        r = await c.migrate(h.request_id, "i1")
        await h.wait()

It starts (or connects to) agents, routes each hop's token events into the
request's `RequestHandle`, keeps each instance's latest load report, and runs
migrations through the `Coordinator`. When an instance dies, its requests are
replayed elsewhere (`failover.py`; at most `max_failovers` times each) unless
`failover=False`; with a `restart`
policy, a lost local instance that was not draining is started again under
its id, after a backoff (`restart.py`). Everything that
happens is told to a `ClusterListener` (the scheduler's events and metrics).
Placement is the caller's: `submit(instance=...)`; without one, the instance
with the fewest unfinished requests of ours.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llumigrate.controller.coordinator import Coordinator, MigrationResult
from llumigrate.controller.failover import FailoverSteps
from llumigrate.controller.instance import Instance, spawn_agent
from llumigrate.controller.listener import ClusterListener
from llumigrate.controller.hops import add_hop
from llumigrate.controller.request import RequestHandle
from llumigrate.engine.vllm_api import core_refusal, decode_outputs, finish_reason_name, token_output
from llumigrate.controller.restart import CrashRecord, RestartPolicy
from llumigrate.controller.utilities import EngineUtilities
from llumigrate.errors import (ConfigError, InstanceLost, InstanceNotFound, InstanceStartFailed, MigrationRefused,
                               RequestNotFound)
from llumigrate.migration.faults import FaultHook
from llumigrate.migration.protocol import MigrationConfig

logger = logging.getLogger(__name__)


# Cores left to the control plane (the serve process, agents, engine cores,
# KV transfers) when sizing CPU engines' thread teams, like vLLM's own
# reservation of one core for its engine core.
CONTROL_PLANE_CORES = 1


def cpu_threads(num_instances: int, cores: int | None = None) -> dict[str, str]:
    """CPU engines: an even share each of this host's cores less
    CONTROL_PLANE_CORES (at least one thread), left to the OS scheduler.
    vLLM's default binds every engine on a host to the same cores; pinning
    each engine to its own core instead starves the control plane, which
    stalls single engine steps for seconds. Taking every core does too, more
    quietly: an OpenMP team with a thread preempted by the control plane
    waits at each barrier (on 2 cores, a tiny model's steps took 4x longer
    with 2 threads than with 1). The operator's own
    VLLM_CPU_OMP_THREADS_BIND / OMP_NUM_THREADS win."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    share = (cores - CONTROL_PLANE_CORES) // max(1, num_instances)
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, share)))}


# A finished request stays findable (`get_request`, the control API's
# finished requests) until this many more requests finished; migration results
# are kept as many. Beyond that they are forgotten, so a long-running server's
# memory and its scheduler's per-round scan of `requests` stay bounded.
RETAIN_FINISHED = 1024


class Cluster(FailoverSteps, EngineUtilities):
    def __init__(self, model: str, num_instances: int = 2, engine_args: list[str] | None = None,
                 *, run_dir: str | Path | None = None, migration: MigrationConfig | None = None,
                 kv_transport: str = "auto", token: str | None = None, failover: bool = True,
                 engine_spin_ms: float | None = None,
                 listener: ClusterListener | None = None, fault: FaultHook | None = None,
                 retain_finished: int = RETAIN_FINISHED, restart: RestartPolicy | None = None,
                 max_failovers: int | None = None) -> None:
        if num_instances < 0:
            raise ConfigError(f"num_instances must be >= 0, got {num_instances}")
        if retain_finished < 0:
            raise ConfigError(f"retain_finished must be >= 0, got {retain_finished}")
        self.model = model
        self.num_instances = num_instances
        self.engine_args = list(engine_args or [])
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="llumigrate-"))
        self.migration_config = migration or MigrationConfig()
        self.kv_transport = kv_transport
        self.engine_spin_ms = engine_spin_ms
        self.token = token
        self.failover = failover
        if max_failovers is not None and max_failovers < 0:
            raise ConfigError(f"max_failovers must be >= 0, got {max_failovers}")
        self.max_failovers = max_failovers
        self.listener = listener or ClusterListener()
        self.fault = fault
        self.instances: dict[str, Instance] = {}
        self.requests: dict[str, RequestHandle] = {}
        self._routes: dict[str, RequestHandle] = {}   # engine rid -> handle
        self._submitting: set[str] = set()   # request ids whose generate call is in flight
        self._hop_tokens: dict[str, int] = {}         # request id -> tokens of its current hop
        self._ids = itertools.count()
        self.migrations: list[MigrationResult] = []   # the latest (at least `retain_finished`)
        self.retain_finished = retain_finished
        self._finished: deque[RequestHandle] = deque()  # finished handles still listed, oldest first
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self.restart = restart
        self._crashes: dict[str, CrashRecord] = {}
        self._envs: dict[str, dict[str, str] | None] = {}   # what each local instance was started with
        self._input_maker: Any = None   # vLLM's input processor, for `submit` (made when first needed)
        self.loras: dict[int, Any] = {}

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> Cluster:
        # NOTE: engines start one after another: on a small machine parallel
        # starts compete for the same cores and memory profiling.
        for n in range(self.num_instances):
            await self.spawn(f"i{n}", env=cpu_threads(self.num_instances))
        return self

    async def spawn(self, instance_id: str, env: dict[str, str] | None = None) -> Instance:
        """Start a local agent and add it."""
        if instance_id in self.instances:
            raise ConfigError(f"instance id {instance_id!r} already in use")
        inst = await self._start_agent(instance_id, env)
        self._envs[instance_id] = env
        try:
            await self.add_instance(inst)
        except BaseException:
            await inst.close()
            raise
        return inst

    async def _start_agent(self, instance_id: str, env: dict[str, str] | None) -> Instance:
        return await spawn_agent(instance_id, self.model, self.engine_args, self.run_dir,
                                 token=self.token, kv_transport=self.kv_transport, env=env,
                                 engine_spin_ms=self.engine_spin_ms)

    async def attach(self, instance_id: str, host: str, port: int) -> Instance:
        """Add an agent that runs elsewhere (e.g. `llumigrate instance` on another host)."""
        old = self.instances.get(instance_id)
        if old is not None and old.up:
            raise ConfigError(f"instance id {instance_id!r} already in use")
        inst = Instance(instance_id, host, port)
        await self.add_instance(inst)
        return inst

    async def add_instance(self, inst: Instance) -> None:
        await self._connect(inst)
        await self._load_loras(inst)
        self._register(inst)

    async def _connect(self, inst: Instance) -> None:
        await inst.connect(lambda msg: self._on_event(inst, msg), lambda: self._on_lost(inst, "connection lost"),
                           token=self.token)
        if not inst.up:  # lost while it connected: never listed
            raise InstanceLost(f"instance {inst.instance_id} was lost while it connected")

    def _register(self, inst: Instance) -> None:
        self.instances[inst.instance_id] = inst
        self._crashes.setdefault(inst.instance_id, CrashRecord()).on_up(time.monotonic())
        self._notify("on_instance_up", inst.instance_id, inst.info)

    async def remove_instance(self, instance_id: str) -> None:
        """Forget an instance that has no unfinished requests (drain it first)."""
        inst = self.get_instance(instance_id)
        busy = [h.request_id for h in self.requests.values()
                if h.instance_id == instance_id and not h.finished]
        if busy and inst.up:
            raise MigrationRefused(f"{instance_id} still runs {len(busy)} requests; drain it first")
        inst.removed = True
        await inst.close()
        self.instances.pop(instance_id, None)
        self._notify("on_instance_down", instance_id, "removed")

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:  # a restart under way closes the agent it started
            await asyncio.wait(tasks, timeout=30)
        await asyncio.gather(*(i.close() for i in self.instances.values()), return_exceptions=True)

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- requests ----------------------------------------------------------------
    async def submit(self, prompt_token_ids: list[int], sampling: Any = None, *,
                     instance: str | None = None, priority: int = 0,
                     request_id: str | None = None) -> RequestHandle:
        """Python API: run `prompt_token_ids` with `sampling` (a dict of vLLM
        SamplingParams fields, or SamplingParams); vLLM's input processor
        completes it as `vllm serve` would."""
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} already in use")
        core = self._inputs().make(rid, prompt_token_ids, sampling, priority=priority)
        return await self.submit_core(core, instance=instance)

    def _inputs(self) -> Any:
        if self._input_maker is None:
            from llumigrate.engine.vllm_api import TokenRequests
            self._input_maker = TokenRequests(self.model, self.engine_args)
        return self._input_maker

    async def submit_core(self, core: Any, *, instance: str | None = None,
                          emit: Callable[[str, Any, int], None] | None = None,
                          owner: str | None = None) -> RequestHandle:
        """Run engine request `core` (vLLM's EngineCoreRequest); its outputs go
        to `emit` (vLLM's frontend) if given, or straight from the agents to
        the serve's frontend process `owner` (`emit` then gets only the ends
        made here)."""
        inst = self._instance(instance) if instance else self._pick()
        rid = core.request_id
        if rid in self.requests and not self.requests[rid].finished:
            raise ConfigError(f"request id {rid!r} already in use")
        h = RequestHandle(rid, core, inst.instance_id, emit=emit, owner=owner, on_finish=self._on_finished)
        self.requests[rid] = h
        self._routes[h.engine_rid] = h
        # NOTE: an instance lost while the call is in flight leaves this
        # request to us: a failed call drops it (the caller may submit it
        # again), a successful one hands it to failover below. Failing it
        # over from `_on_lost` as well made two requests of one id.
        self._submitting.add(rid)
        try:
            await add_hop(inst, h, h.engine_rid)
        except Exception:
            self.requests.pop(rid, None)
            self._routes.pop(h.engine_rid, None)
            raise
        finally:
            self._submitting.discard(rid)
        self._notify("on_dispatch", h, inst.instance_id)
        if not inst.up and not h.finished:
            self._lost_request(h, f"instance {inst.instance_id} lost")
        return h

    async def abort(self, request_id: str) -> None:
        h = self.get_request(request_id)
        h.abort_requested = True  # a migration in flight checks this before it commits
        if h.finished:
            return
        inst = self.instances.get(h.instance_id)
        if inst is None or not inst.up:
            h.finish("abort")
            return
        # NOTE: False while a migration holds the request stopped: the
        # migration sees abort_requested and ends it.
        if await inst.call("abort", rid=h.engine_rid):
            h.finish("abort")

    async def migrate(self, request_id: str, destination: str | None = None,
                      config: MigrationConfig | None = None) -> MigrationResult:
        h = self.get_request(request_id)
        src = self._instance(h.instance_id)
        inexact = None if h.finished or h.migrating else core_refusal(h.core, src.info.get("engine_facts"))
        if inexact is not None:
            self._notify("on_migration_refused", request_id, inexact)
        h.check_migratable(src.info.get("engine_facts"))
        dst = self._instance(destination) if destination else self._pick(exclude=src.instance_id)
        if dst is src:
            raise MigrationRefused("destination is the request's current instance")
        if dst.draining:
            raise MigrationRefused(f"destination {dst.instance_id} is draining")
        h.migrating = True
        # A request not started yet has no KV to copy: its move takes no
        # migration slot (scheduler.plan.needs_slot).
        slot = 1 if h.output_token_ids else 0
        src.migrations_out += slot
        dst.migrations_in += slot
        rid, s_id, d_id = h.request_id, src.instance_id, dst.instance_id
        dst.incoming[rid] = h   # its blocks there are spoken for until it lands (serve/snapshots.py)
        try:
            result = await Coordinator(
                h, src, dst, config or self.migration_config, self._set_hop,
                on_stage=lambda stage: self._notify("on_migration_stage", rid, s_id, d_id, stage),
                fault=self.fault, on_source_lost=self._failover if self.failover else None).run()
        finally:
            h.migrating = False
            src.migrations_out -= slot
            dst.migrations_in -= slot
            dst.incoming.pop(rid, None)
        if result.committed:
            h.num_migrations += 1
        self.migrations.append(result)
        if len(self.migrations) > 2 * self.retain_finished:  # trimmed in batches: amortised O(1)
            del self.migrations[: len(self.migrations) - self.retain_finished]
        self._notify("on_migration_done", result)
        if not h.finished and not (dst if h.instance_id == dst.instance_id else src).up:
            self._lost_request(h, f"instance {h.instance_id} lost during a migration")
        return result

    # -- state -----------------------------------------------------------------
    async def instance_info(self) -> list[dict]:
        return [await i.refresh() if i.up else {"instance_id": i.instance_id, "up": False}
                for i in self.instances.values()]

    async def worker_status(self, instance: str) -> dict:
        return await self._instance(instance).call("status")

    def drain(self, instance_id: str) -> Instance:
        """No new requests go to the instance; the scheduler moves its requests away."""
        inst = self.get_instance(instance_id)
        inst.draining = True
        return inst

    def undrain(self, instance_id: str) -> Instance:
        inst = self.get_instance(instance_id)
        inst.draining = False
        return inst

    # -- internals ---------------------------------------------------------------
    def _set_hop(self, h: RequestHandle, inst: Instance, hop: int) -> None:
        if self._routes.get(h.engine_rid) is h:  # the old hop's events are stale from now on
            del self._routes[h.engine_rid]
        h.hop, h.instance_id, h.hop_error = hop, inst.instance_id, None
        h.queued_at = time.monotonic()
        self._hop_tokens[h.request_id] = 0
        self._routes[h.engine_rid] = h

    def _on_event(self, inst: Instance, msg: dict) -> None:
        kind = msg.get("event")
        if kind == "load":
            self._on_load(msg)
            return
        if kind == "progress":  # the tokens of outputs an agent sent a frontend process itself
            for rid, tokens, reason in msg.get("items") or ():
                self._on_output(token_output(rid, tokens, reason), forward=False)
            return
        if kind != "out" or not isinstance(msg.get("data"), bytes):
            return
        outs = decode_outputs(msg["data"])
        for o in outs.outputs:
            self._on_output(o)
        if outs.scheduler_stats is not None:
            self._notify("on_stats", inst.instance_id, outs.scheduler_stats)

    def _on_output(self, o: Any, forward: bool = True) -> None:
        h = self._routes.get(o.request_id)
        if h is None or h.engine_rid != o.request_id:
            return  # a stale hop (stopped for migration) or a carrier
        n = len(o.new_token_ids)
        if o.finish_reason is not None and finish_reason_name(o.finish_reason) == "error" \
                and h.committing and not self._hop_tokens.get(h.request_id, 0) and not n:
            # NOTE: a hop that fails before its first token while a migration
            # commits it (e.g. its final KV load failed) is the migration's
            # failure: the coordinator resumes the request on the source.
            self._routes.pop(o.request_id, None)
            h.fail_hop("destination request failed")
            return
        if o.finish_reason is not None:
            self._routes.pop(o.request_id, None)
        else:
            self._hop_tokens[h.request_id] = self._hop_tokens.get(h.request_id, 0) + n
        h.append(o, forward)  # NOTE: after the bookkeeping: a finish may forget the request

    def _on_finished(self, h: RequestHandle) -> None:
        """A request ended (once, whatever ended it): tell the listener, and
        forget the oldest finished requests beyond `retain_finished`."""
        self._finished.append(h)
        while len(self._finished) > self.retain_finished:
            old = self._finished.popleft()
            if self.requests.get(old.request_id) is old:
                del self.requests[old.request_id]
                self._hop_tokens.pop(old.request_id, None)
            if self._routes.get(old.engine_rid) is old:
                del self._routes[old.engine_rid]
        self._notify("on_finished", h)

    def _on_load(self, msg: dict) -> None:
        inst = self.instances.get(str(msg.get("instance_id")))
        load = msg.get("load")
        if inst is None or not isinstance(load, dict):
            return
        inst.load, inst.reported_at = load, asyncio.get_running_loop().time()
        self._notify("on_load", inst.instance_id, load)

    def _on_lost(self, inst: Instance, reason: str) -> None:
        inst.up = False
        if self._closing or inst.removed or self.instances.get(inst.instance_id) is not inst:
            return  # shutting down, removed, or never listed (or listed no more)
        logger.error("instance %s lost: %s", inst.instance_id, reason)
        self._notify("on_instance_down", inst.instance_id, reason)
        if self.restart is not None and inst.process is not None and not inst.draining:
            self._spawn(self._restart(inst))  # releases its shared memory first
        else:
            self._spawn(inst.release_shm(wait_s=30.0))  # a killed engine could not remove it
        for h in list(self.requests.values()):
            if h.instance_id == inst.instance_id and not h.finished and not h.migrating \
                    and h.request_id not in self._submitting:
                self._lost_request(h, f"instance {inst.instance_id} lost")

    async def _restart(self, lost: Instance) -> None:
        """Start lost local instance `lost` again under its id, with what it
        was started with, after the policy's backoff; a failed start is
        retried until the policy gives up. Nothing happens once its id was
        removed, drained or taken (a remote agent that joined under it), or
        the cluster closes; an agent started meanwhile is closed again."""
        assert self.restart is not None
        iid = lost.instance_id
        record = self._crashes.setdefault(iid, CrashRecord())
        crashes = record.on_lost(time.monotonic(), self.restart)
        await lost.close(timeout=1.0)   # reaps its process group, removes the shared memory it held
        while True:
            delay = self.restart.delay(crashes)
            logger.warning("instance %s: restarting it in %.1f s (crash %d in a row)", iid, delay, crashes)
            await asyncio.sleep(delay)
            if not self._replaceable(lost):
                return
            inst: Instance | None = None
            try:
                inst = await self._start_agent(iid, self._envs.get(iid, cpu_threads(self.num_instances)))
                await self._connect(inst)
                await self._load_loras(inst)
                if not self._replaceable(lost):
                    return
                self._register(inst)
                inst = None   # listed: the cluster's now
                logger.warning("instance %s: restarted", iid)
                return
            except Exception as e:   # did not start, or died at once
                give_up = record.on_failed_start(self.restart)
                crashes = record.crashes
                cause = e.cause if isinstance(e, InstanceStartFailed) else f"{type(e).__name__}: {e}"
                if give_up:
                    logger.error("instance %s: not restarted again after %d failed starts: %s",
                                 iid, record.failed_starts, e)
                    self._notify("on_instance_down", iid, f"not restarted: {cause}")
                    return
                logger.error("instance %s: restart failed: %s", iid, e)
            finally:
                if inst is not None:
                    await inst.close()

    def _replaceable(self, lost: Instance) -> bool:
        """Whether a restart may still put a new instance in `lost`'s place."""
        return (not self._closing and not lost.removed and not lost.draining
                and self.instances.get(lost.instance_id) is lost)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("cluster task %s failed", task.get_coro(), exc_info=task.exception())

    def _notify(self, method: str, *args: Any) -> None:
        try:
            getattr(self.listener, method)(*args)
        except Exception:  # a listener never breaks the data path
            logger.exception("cluster listener %s failed", method)

    def get_instance(self, iid: str) -> Instance:
        """The instance `iid`, up or down; InstanceNotFound if unknown."""
        inst = self.instances.get(iid)
        if inst is None:
            raise InstanceNotFound(f"no instance {iid!r}; have {sorted(self.instances)}")
        return inst

    def _instance(self, iid: str) -> Instance:
        inst = self.get_instance(iid)
        if not inst.up:
            raise InstanceLost(f"instance {iid!r} is down")
        return inst

    def get_request(self, request_id: str) -> RequestHandle:
        """The request `request_id` (finished or not); RequestNotFound if unknown."""
        h = self.requests.get(request_id)
        if h is None:
            raise RequestNotFound(f"no request {request_id!r}")
        return h

    def _pick(self, exclude: str | set[str] | None = None) -> Instance:
        skip = {exclude} if isinstance(exclude, str) else (exclude or set())
        live = [i for i in self.instances.values()
                if i.up and not i.draining and i.instance_id not in skip]
        if not live:
            raise InstanceLost("no live instance to use")
        # Fewest of our unfinished requests; ties go to the lowest id.
        busy = {i.instance_id: 0 for i in live}
        for h in self.requests.values():
            if not h.finished and h.instance_id in busy:
                busy[h.instance_id] += 1
        return min(live, key=lambda i: (busy[i.instance_id], i.instance_id))
