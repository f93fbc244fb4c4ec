"""The control API's backend in `llumigrate serve`: views of the cluster,
manual migrations, drain, policy and health over `Cluster` + `GlobalScheduler`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from llumigrate.control import events as ev
from llumigrate.control.backend import ControlBackend, HealthView, InstanceView, PolicyView, RequestView
from llumigrate.control.events import EventBus
from llumigrate.controller.coordinator import MigrationResult
from llumigrate.controller.request import RequestHandle
from llumigrate.engine.vllm_api import core_refusal
from llumigrate.errors import InstanceLost, MigrationRefused, NoInstanceAvailable
from llumigrate.scheduler import DISPATCH_POLICIES, MIGRATION_POLICIES, freeness
from llumigrate.serve.scheduler import TUNABLE, GlobalScheduler
from llumigrate.serve.snapshots import cluster_snapshot


class ClusterControlBackend(ControlBackend):
    def __init__(self, scheduler: GlobalScheduler, bus: EventBus) -> None:
        self.scheduler, self.cluster, self.bus = scheduler, scheduler.cluster, bus

    async def list_instances(self) -> list[InstanceView]:
        return [self._view(iid) for iid in sorted(self.cluster.instances)]

    async def get_instance(self, instance_id: str) -> InstanceView:
        self.cluster.get_instance(instance_id)
        return self._view(instance_id)

    async def list_requests(self, instance_id: str | None = None,
                            include_finished: bool = False) -> list[RequestView]:
        if instance_id is not None:
            self.cluster.get_instance(instance_id)
        facts = {iid: i.info.get("engine_facts") for iid, i in self.cluster.instances.items()}
        return [_request_view(h, facts.get(h.instance_id)) for h in self.cluster.requests.values()
                if (instance_id is None or h.instance_id == instance_id)
                and (include_finished or not h.finished)]

    async def migrate(self, request_id: str, destination: str | None = None) -> MigrationResult:
        h = self.cluster.get_request(request_id)
        if destination is None:
            destination = self._policy_destination(h)
        else:
            dst = self.cluster.get_instance(destination)
            if not dst.up:
                raise MigrationRefused(f"destination {destination} is down")
        return await self.cluster.migrate(request_id, destination)

    async def drain(self, instance_id: str) -> InstanceView:
        if not self.cluster.get_instance(instance_id).draining:
            self.cluster.drain(instance_id)
            self.bus.emit(ev.DRAIN, instance_id=instance_id)
            self.scheduler.observer.metrics.set_instance(instance_id, draining=1)
        return self._view(instance_id)

    async def undrain(self, instance_id: str) -> InstanceView:
        if self.cluster.get_instance(instance_id).draining:
            self.cluster.undrain(instance_id)
            self.bus.emit(ev.UNDRAIN, instance_id=instance_id)
            self.scheduler.observer.metrics.set_instance(instance_id, draining=0)
        return self._view(instance_id)

    async def register_instance(self, instance_id: str, host: str, port: int) -> InstanceView:
        old = self.cluster.instances.get(instance_id)
        if old is not None and old.up:
            if (old.host, old.port) == (host, port):
                return self._view(instance_id)  # a retry after a lost reply
            raise MigrationRefused(f"instance id {instance_id!r} is in use by a live instance")
        try:
            await self.cluster.attach(instance_id, host, port)
        except (OSError, asyncio.TimeoutError) as e:
            raise InstanceLost(f"cannot reach the agent at {host}:{port}: {e}") from e
        self.bus.emit(ev.INSTANCE_JOINED, instance_id=instance_id, address=f"{host}:{port}")
        return self._view(instance_id)

    async def deregister_instance(self, instance_id: str, timeout_s: float) -> InstanceView:
        inst = self.cluster.get_instance(instance_id)
        if inst.up:
            await self.drain(instance_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while self._unfinished_on(instance_id):
                if loop.time() > deadline:
                    raise TimeoutError(f"{instance_id} still runs {self._unfinished_on(instance_id)} "
                                       f"requests after {timeout_s:.0f}s; it stays draining")
                self._drain_by_hand(instance_id)
                await asyncio.sleep(0.2)
        view = self._view(instance_id)
        await self.cluster.remove_instance(instance_id)
        self.bus.emit(ev.INSTANCE_LEFT, instance_id=instance_id, address=view.address)
        return view

    async def get_policy(self) -> PolicyView:
        cfg = self.scheduler.config
        thresholds = {name: float(getattr(cfg, name)) for name in TUNABLE
                      if isinstance(getattr(cfg, name), (int, float))}
        return PolicyView(cfg.dispatch_policy, tuple(sorted(cfg.migration_policies)), thresholds,
                          DISPATCH_POLICIES, MIGRATION_POLICIES)

    async def set_policy(self, dispatch: str | None = None, migration: list[str] | None = None,
                         thresholds: Mapping[str, float] | None = None) -> PolicyView:
        self.scheduler.set_policy(dispatch, migration, thresholds)
        return await self.get_policy()

    def event_bus(self) -> EventBus:
        return self.bus

    async def health(self) -> HealthView:
        insts = list(self.cluster.instances.values())
        up = sum(1 for i in insts if i.up)
        status = "not_serving" if up == 0 else ("serving" if up == len(insts) else "degraded")
        down = [i.instance_id for i in insts if not i.up]
        return HealthView(status, len(insts), up, {"down": ",".join(down)} if down else {})

    # -- helpers -------------------------------------------------------------
    def _unfinished_on(self, instance_id: str) -> int:
        return sum(1 for h in self.cluster.requests.values()
                   if h.instance_id == instance_id and not h.finished)

    def _drain_by_hand(self, instance_id: str) -> None:
        """Leaving instances are emptied even when the drain policy is off:
        run the drain policy once, whatever the configured set."""
        if not self.scheduler.config.enabled("drain"):
            self.scheduler.step(only=("drain",))

    def _policy_destination(self, h: RequestHandle) -> str:
        """The dispatcher's choice among the other live instances."""
        snap = cluster_snapshot(self.cluster, self.scheduler.now())
        others = tuple(i for i in snap.instances if i.instance_id != h.instance_id)
        try:
            return self.scheduler.dispatcher.choose(type(snap)(others, snap.now), h.priority)
        except NoInstanceAvailable as e:
            raise InstanceLost(f"no live destination for {h.request_id}: {e}") from e

    def _view(self, iid: str) -> InstanceView:
        inst = self.cluster.instances[iid]
        snap = cluster_snapshot(self.cluster, self.scheduler.now())[iid]
        return InstanceView(iid, f"{inst.host}:{inst.port}", inst.up, inst.draining, snap.num_blocks,
                            snap.free_blocks, snap.block_size, snap.num_running, snap.num_waiting,
                            float(inst.load.get("kv_cache_usage", 0.0)),
                            freeness(snap, self.scheduler.config), inst.migrations_in,
                            inst.migrations_out)


def _request_view(h: RequestHandle, facts: dict | None = None) -> RequestView:
    state = ("finished" if h.finished else "migrating" if h.migrating
             else "running" if h.output_token_ids else "waiting")
    refusal = "" if h.finished else core_refusal(h.core, facts) or ""
    return RequestView(h.request_id, h.instance_id, h.priority, len(h.prompt_token_ids),
                       len(h.output_token_ids), state, h.num_migrations, refusal)
