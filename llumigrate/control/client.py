"""`ControlClient`: a thin async client of the llumigrate.v1.Control API.

    async with ControlClient("127.0.0.1:50151", token=None) as c:
        for inst in await c.list_instances():
            print(inst.id, inst.free_blocks)
        result = await c.migrate("req-1", destination="i1")

Methods return the protobuf messages (typed in `v1/control_pb2.pyi`) and
raise `grpc.aio.AioRpcError` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc

from llumigrate.control.auth import bearer_metadata
from llumigrate.control.server import DEFAULT_ADDRESS
from llumigrate.control.v1 import control_pb2 as pb
from llumigrate.control.v1 import control_pb2_grpc as pb_grpc
from llumigrate.control.validate import DEFAULT_DEREGISTER_TIMEOUT_S, MAX_DEREGISTER_TIMEOUT_S

DEFAULT_TIMEOUT_S = 30.0
MIGRATE_TIMEOUT_S = 600.0  # a migration runs to done or aborted; its stages have their own timeouts


class ControlClient:
    """One channel to a control server. `token` is sent with every call;
    `tls_ca` (a PEM file) switches to TLS and is the root it trusts."""

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | None = None,
                 tls_ca: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if tls_ca is None:
            self._channel = grpc.aio.insecure_channel(address)
        else:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channel = grpc.aio.secure_channel(address, creds)
        self._stub = pb_grpc.ControlStub(self._channel)
        self._metadata = bearer_metadata(token)
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def health(self) -> pb.HealthResponse:
        return await self._stub.Health(pb.HealthRequest(), **self._opts())

    async def list_instances(self) -> list[pb.Instance]:
        return list((await self._stub.ListInstances(pb.ListInstancesRequest(), **self._opts())).instances)

    async def get_instance(self, instance_id: str) -> pb.Instance:
        return await self._stub.GetInstance(pb.GetInstanceRequest(instance_id=instance_id), **self._opts())

    async def list_requests(self, instance_id: str | None = None,
                            include_finished: bool = False) -> list[pb.Request]:
        req = pb.ListRequestsRequest(instance_id=instance_id, include_finished=include_finished)
        return list((await self._stub.ListRequests(req, **self._opts())).requests)

    async def migrate(self, request_id: str, destination: str | None = None,
                      timeout_s: float = MIGRATE_TIMEOUT_S) -> pb.MigrateResponse:
        req = pb.MigrateRequest(request_id=request_id, destination=destination)
        return await self._stub.Migrate(req, **self._opts(timeout_s))

    async def drain(self, instance_id: str) -> pb.Instance:
        return await self._stub.Drain(pb.DrainRequest(instance_id=instance_id), **self._opts())

    async def undrain(self, instance_id: str) -> pb.Instance:
        return await self._stub.Undrain(pb.UndrainRequest(instance_id=instance_id), **self._opts())

    async def get_policy(self) -> pb.Policy:
        return await self._stub.GetPolicy(pb.GetPolicyRequest(), **self._opts())

    async def set_policy(self, dispatch: str | None = None, migration: list[str] | None = None,
                         thresholds: Mapping[str, float] | None = None) -> pb.Policy:
        """Changes what is not None; `migration=[]` disables every migration policy."""
        req = pb.SetPolicyRequest(dispatch=dispatch, thresholds=dict(thresholds or {}))
        if migration is not None:
            req.migration.names.extend(migration)
            req.migration.SetInParent()  # an empty list is set, not unset
        return await self._stub.SetPolicy(req, **self._opts())

    async def register_instance(self, instance_id: str, host: str, port: int) -> pb.Instance:
        """Joins the agent serving at `host`:`port` to the cluster as `instance_id`."""
        req = pb.RegisterInstanceRequest(instance_id=instance_id, host=host, port=port)
        return await self._stub.RegisterInstance(req, **self._opts())

    async def deregister_instance(self, instance_id: str, timeout_s: float | None = None) -> pb.Instance:
        """Drains `instance_id`, waits up to `timeout_s` (None: the server's
        default, DEFAULT_DEREGISTER_TIMEOUT_S) for it to empty, removes it."""
        req = pb.DeregisterInstanceRequest(instance_id=instance_id, timeout_s=timeout_s)
        # NOTE: the call's deadline outlasts the server's own wait, so that an
        # instance that does not empty in time reads as the server's
        # DEADLINE_EXCEEDED with its message, not as the client giving up; a
        # bad `timeout_s` still reaches the server, which refuses it.
        wait_s = (timeout_s if timeout_s is not None and 0 < timeout_s <= MAX_DEREGISTER_TIMEOUT_S
                  else DEFAULT_DEREGISTER_TIMEOUT_S)
        return await self._stub.DeregisterInstance(req, **self._opts(wait_s + self.timeout_s))

    async def watch_events(self, kinds: list[str] | None = None) -> AsyncIterator[pb.Event]:
        """Events from now on, until the caller stops iterating or the server ends."""
        call = self._stub.WatchEvents(pb.WatchEventsRequest(kinds=kinds or []), metadata=self._metadata)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    def _opts(self, timeout_s: float | None = None) -> dict:
        return {"metadata": self._metadata, "timeout": timeout_s or self.timeout_s}
