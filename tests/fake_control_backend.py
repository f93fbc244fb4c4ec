"""`FakeBackend`: a pure-Python ControlBackend for the control API tests;
`serving` runs a real server over it on a background loop; `call` runs one
client action; `make_self_signed` writes a TLS certificate."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import LoopThread

from llumigrate.control.client import ControlClient
from llumigrate.control.server import ControlServer, ControlServerConfig
from llumigrate.control.backend import ControlBackend, HealthView, InstanceView, PolicyView, RequestView
from llumigrate.control.events import (
    DRAIN,
    INSTANCE_JOINED,
    INSTANCE_LEFT,
    MIGRATION_DONE,
    MIGRATION_STAGE,
    UNDRAIN,
    EventBus,
)
from llumigrate.controller.coordinator import MigrationResult
from llumigrate.errors import ConfigError, InstanceLost, InstanceNotFound, MigrationRefused, RequestNotFound

DISPATCH_POLICIES = ("balanced", "round_robin")
MIGRATION_POLICIES = ("defrag", "load_balance")
THRESHOLDS = ("migrate_out_freeness", "migrate_in_freeness")
T = TypeVar("T")


def make_instances() -> dict[str, InstanceView]:
    return {iid: InstanceView(iid, f"127.0.0.1:{6000 + n}", num_blocks=100, free_blocks=80 - 10 * n,
                              block_size=16, num_running=1, kv_cache_usage=0.2 + 0.1 * n,
                              freeness=0.8 - 0.1 * n)
            for n, iid in enumerate(("i0", "i1", "i2"))}


def make_requests() -> dict[str, RequestView]:
    return {"r0": RequestView("r0", "i0", num_prompt_tokens=300, num_output_tokens=20),
            "r1": RequestView("r1", "i1", priority=1, num_prompt_tokens=40, num_output_tokens=5),
            "r2": RequestView("r2", "i0", num_prompt_tokens=10, num_output_tokens=8, state="finished")}


class FakeBackend(ControlBackend):
    """Three instances (i0, i1, i2), requests r0 (on i0), r1 (on i1) and r2
    (finished). `fail_next`, when set, is raised by the next call. `abort_next`
    makes the next migration abort (a result, not an error). Agents at an
    address in `unreachable` cannot be registered; host names ending in
    `.invalid` do not resolve."""

    def __init__(self) -> None:
        self.instances = make_instances()
        self.requests = make_requests()
        self.policy = PolicyView("balanced", ("defrag",), {"migrate_out_freeness": 0.1},
                                 DISPATCH_POLICIES, MIGRATION_POLICIES)
        self.bus = EventBus()
        self.fail_next: Exception | None = None
        self.abort_next = False
        self.unreachable: set[str] = set()

    def _check_fail(self) -> None:
        exc, self.fail_next = self.fail_next, None
        if exc is not None:
            raise exc

    def _instance(self, iid: str) -> InstanceView:
        if iid not in self.instances:
            raise InstanceNotFound(f"no instance {iid!r}; have {sorted(self.instances)}")
        return self.instances[iid]

    def _set_instance(self, iid: str, **changes: object) -> InstanceView:
        self.instances[iid] = dataclasses.replace(self._instance(iid), **changes)
        return self.instances[iid]

    async def list_instances(self) -> list[InstanceView]:
        self._check_fail()
        return [self.instances[k] for k in sorted(self.instances)]

    async def get_instance(self, instance_id: str) -> InstanceView:
        self._check_fail()
        return self._instance(instance_id)

    async def list_requests(self, instance_id: str | None = None,
                            include_finished: bool = False) -> list[RequestView]:
        self._check_fail()
        if instance_id is not None:
            self._instance(instance_id)
        return [r for r in self.requests.values()
                if (instance_id is None or r.instance_id == instance_id)
                and (include_finished or r.state != "finished")]

    async def migrate(self, request_id: str, destination: str | None = None) -> MigrationResult:
        self._check_fail()
        req = self.requests.get(request_id)
        if req is None:
            raise RequestNotFound(f"no request {request_id!r}")
        dst = self._destination(req, destination)
        self.bus.emit(MIGRATION_STAGE, request_id, req.instance_id, dst, stage="precopy", blocks=18)
        result = MigrationResult(request_id, req.instance_id, dst, "done", stages=1,
                                 blocks_per_stage=[18], context_tokens=320, downtime_s=0.004,
                                 total_s=0.25, phase_s={"reserve": 0.01, "precopy": 0.2})
        if self.abort_next:
            self.abort_next = False
            result = dataclasses.replace(result, state="aborted", reason="destination full",
                                         abort_stage="precopy", downtime_s=None)
        else:
            self.requests[request_id] = dataclasses.replace(req, instance_id=dst,
                                                            num_migrations=req.num_migrations + 1)
        self.bus.emit(MIGRATION_DONE, request_id, req.instance_id, dst, state=result.state)
        return result

    def _destination(self, req: RequestView, destination: str | None) -> str:
        if req.state == "finished":
            raise MigrationRefused(f"request {req.id} has finished")
        if destination is None:
            live = [i for i in sorted(self.instances) if i != req.instance_id
                    and self.instances[i].up and not self.instances[i].draining]
            if not live:
                raise InstanceLost("no live instance to migrate to")
            return live[0]
        inst = self._instance(destination)
        if destination == req.instance_id:
            raise MigrationRefused("destination is the request's current instance")
        if inst.draining:
            raise MigrationRefused(f"instance {destination} is draining")
        if not inst.up:
            raise InstanceLost(f"instance {destination} is down")
        return destination

    async def drain(self, instance_id: str) -> InstanceView:
        self._check_fail()
        self.bus.emit(DRAIN, instance_id=self._instance(instance_id).id)
        return self._set_instance(instance_id, draining=True)

    async def undrain(self, instance_id: str) -> InstanceView:
        self._check_fail()
        self.bus.emit(UNDRAIN, instance_id=self._instance(instance_id).id)
        return self._set_instance(instance_id, draining=False)

    async def register_instance(self, instance_id: str, host: str, port: int) -> InstanceView:
        self._check_fail()
        old = self.instances.get(instance_id)
        if old is not None and old.up:
            raise MigrationRefused(f"instance id {instance_id!r} is in use by a live instance at {old.address}")
        if host.endswith(".invalid"):
            raise ConfigError(f"host {host!r} does not resolve")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if address in self.unreachable:
            raise InstanceLost(f"cannot reach the agent at {address}")
        self.instances[instance_id] = InstanceView(instance_id, address, num_blocks=100, free_blocks=100,
                                                   block_size=16, freeness=1.0)
        self.bus.emit(INSTANCE_JOINED, instance_id=instance_id, address=address)
        return self.instances[instance_id]

    async def deregister_instance(self, instance_id: str, timeout_s: float) -> InstanceView:
        self._check_fail()
        inst = self._instance(instance_id)
        if not inst.draining:
            await self.drain(instance_id)
        if inst.up:
            await self._empty(instance_id, timeout_s)
        removed = self.instances.pop(instance_id)
        self.bus.emit(INSTANCE_LEFT, instance_id=instance_id, address=removed.address)
        return removed

    async def _empty(self, instance_id: str, timeout_s: float) -> None:
        """Migrates every unfinished request off the instance; TimeoutError
        (at once, standing for `timeout_s` of waiting) if one cannot move."""
        for req in [r for r in self.requests.values() if r.instance_id == instance_id and r.state != "finished"]:
            try:
                moved = (await self.migrate(req.id)).committed
            except InstanceLost:
                moved = False
            if not moved:
                raise TimeoutError(f"instance {instance_id} still runs {req.id} after {timeout_s:g} s; "
                                   f"it stays draining")
        self._set_instance(instance_id, num_running=0, num_waiting=0)

    async def get_policy(self) -> PolicyView:
        self._check_fail()
        return self.policy

    async def set_policy(self, dispatch: str | None = None, migration: list[str] | None = None,
                         thresholds: Mapping[str, float] | None = None) -> PolicyView:
        self._check_fail()
        if dispatch is not None and dispatch not in DISPATCH_POLICIES:
            raise ConfigError(f"unknown dispatch policy {dispatch!r}; allowed: {DISPATCH_POLICIES}")
        unknown = sorted(set(migration or ()) - set(MIGRATION_POLICIES))
        if unknown:
            raise ConfigError(f"unknown migration policies {unknown}; allowed: {MIGRATION_POLICIES}")
        for name, value in (thresholds or {}).items():
            if name not in THRESHOLDS or not 0 <= value <= 1:
                raise ConfigError(f"threshold {name}={value}: names {THRESHOLDS}, values in [0, 1]")
        self.policy = dataclasses.replace(
            self.policy, dispatch=dispatch or self.policy.dispatch,
            migration=self.policy.migration if migration is None else tuple(migration),
            thresholds={**self.policy.thresholds, **(thresholds or {})})
        return self.policy

    def event_bus(self) -> EventBus:
        return self.bus

    async def health(self) -> HealthView:
        self._check_fail()
        up = sum(i.up for i in self.instances.values())
        return HealthView("serving" if up == len(self.instances) else "degraded", len(self.instances), up)


# -- serving it ----------------------------------------------------------------------
@dataclasses.dataclass
class Served:
    backend: FakeBackend
    address: str        # what a client dials
    server: ControlServer


@contextlib.contextmanager
def serving(loop: LoopThread, backend: FakeBackend | None = None, **config: object) -> Iterator[Served]:
    """A ControlServer over `backend` on `loop`'s thread, bound to 127.0.0.1:0
    unless `config` says otherwise; clients dial 127.0.0.1 at its port."""
    backend = backend or FakeBackend()
    server = ControlServer(backend, ControlServerConfig(**{"address": "127.0.0.1:0", **config}))
    port = loop.run(server.start(), timeout=30)
    try:
        yield Served(backend, f"127.0.0.1:{port}", server)
    finally:
        loop.run(server.stop(0), timeout=30)


def call(address: str, fn: Callable[[ControlClient], Awaitable[T]], token: str | None = None, **kw: object) -> T:
    """`await fn(client)` with a fresh client, on a fresh loop in this thread."""
    async def go() -> T:
        async with ControlClient(address, token, **kw) as client:
            return await fn(client)
    return asyncio.run(go())


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def make_self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, as (cert.pem, key.pem)."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"
