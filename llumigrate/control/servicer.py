"""`ControlServicer`: the llumigrate.v1.Control RPCs over a ControlBackend.

Each RPC checks its input's shape (`validate.py`), calls the backend once and
converts the answer (`convert.py`). Every exception goes through `_serve` to
`status.abort_with`, so a client gets a status code and a message, never a
crash, and the server keeps serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from llumigrate.control import convert
from llumigrate.control.backend import ControlBackend
from llumigrate.control.events import DEFAULT_QUEUE_SIZE, Subscription
from llumigrate.control.status import abort_with
from llumigrate.control.v1 import control_pb2 as pb
from llumigrate.control.v1 import control_pb2_grpc as pb_grpc
from llumigrate.control.validate import (
    valid_host,
    valid_id,
    valid_kinds,
    valid_names,
    valid_port,
    valid_thresholds,
    valid_timeout,
)

Context = grpc.aio.ServicerContext
T = TypeVar("T")


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, backend: ControlBackend, event_queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.backend = backend
        self.event_queue_size = event_queue_size
        self._subscriptions: set[Subscription] = set()

    # -- RPCs: each one line over its implementation below ------------------------
    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        return await _serve(context, "Health", self._health())

    async def ListInstances(self, request: pb.ListInstancesRequest,
                            context: Context) -> pb.ListInstancesResponse:
        return await _serve(context, "ListInstances", self._list_instances())

    async def GetInstance(self, request: pb.GetInstanceRequest, context: Context) -> pb.Instance:
        return await _serve(context, "GetInstance", self._get_instance(request))

    async def ListRequests(self, request: pb.ListRequestsRequest,
                           context: Context) -> pb.ListRequestsResponse:
        return await _serve(context, "ListRequests", self._list_requests(request))

    async def Migrate(self, request: pb.MigrateRequest, context: Context) -> pb.MigrateResponse:
        return await _serve(context, "Migrate", self._migrate(request))

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.Instance:
        return await _serve(context, "Drain", self._drain(request.instance_id, drain=True))

    async def Undrain(self, request: pb.UndrainRequest, context: Context) -> pb.Instance:
        return await _serve(context, "Undrain", self._drain(request.instance_id, drain=False))

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Context) -> pb.Policy:
        return await _serve(context, "GetPolicy", self._get_policy())

    async def SetPolicy(self, request: pb.SetPolicyRequest, context: Context) -> pb.Policy:
        return await _serve(context, "SetPolicy", self._set_policy(request))

    async def RegisterInstance(self, request: pb.RegisterInstanceRequest, context: Context) -> pb.Instance:
        return await _serve(context, "RegisterInstance", self._register_instance(request))

    async def DeregisterInstance(self, request: pb.DeregisterInstanceRequest, context: Context) -> pb.Instance:
        return await _serve(context, "DeregisterInstance", self._deregister_instance(request))

    async def WatchEvents(self, request: pb.WatchEventsRequest,
                          context: Context) -> AsyncIterator[pb.Event]:
        try:
            subscription = self.backend.event_bus().subscribe(valid_kinds(request.kinds), self.event_queue_size)
        except Exception as e:
            await abort_with(context, e, "WatchEvents")
            return
        # NOTE: `async with` unsubscribes when the client cancels (grpc closes
        # this generator) as well as when the stream is ended by `close_streams`.
        self._subscriptions.add(subscription)
        try:
            async with subscription:
                async for event in subscription:
                    yield convert.event_to_proto(event)
        finally:
            self._subscriptions.discard(subscription)

    def close_streams(self) -> None:
        """Ends every WatchEvents stream (after the events already queued)."""
        for subscription in list(self._subscriptions):
            subscription.close()

    # -- implementations ---------------------------------------------------------------
    async def _health(self) -> pb.HealthResponse:
        return convert.health_to_proto(await self.backend.health())

    async def _list_instances(self) -> pb.ListInstancesResponse:
        views = await self.backend.list_instances()
        return pb.ListInstancesResponse(instances=[convert.instance_to_proto(v) for v in views])

    async def _get_instance(self, request: pb.GetInstanceRequest) -> pb.Instance:
        iid = valid_id("instance_id", request.instance_id)
        return convert.instance_to_proto(await self.backend.get_instance(iid))

    async def _list_requests(self, request: pb.ListRequestsRequest) -> pb.ListRequestsResponse:
        iid = valid_id("instance_id", request.instance_id) if request.HasField("instance_id") else None
        views = await self.backend.list_requests(iid, request.include_finished)
        return pb.ListRequestsResponse(requests=[convert.request_to_proto(v) for v in views])

    async def _migrate(self, request: pb.MigrateRequest) -> pb.MigrateResponse:
        rid = valid_id("request_id", request.request_id)
        dst = valid_id("destination", request.destination) if request.HasField("destination") else None
        return convert.migration_to_proto(await self.backend.migrate(rid, dst))

    async def _drain(self, instance_id: str, drain: bool) -> pb.Instance:
        iid = valid_id("instance_id", instance_id)
        view = await (self.backend.drain(iid) if drain else self.backend.undrain(iid))
        return convert.instance_to_proto(view)

    async def _get_policy(self) -> pb.Policy:
        return convert.policy_to_proto(await self.backend.get_policy())

    async def _set_policy(self, request: pb.SetPolicyRequest) -> pb.Policy:
        dispatch = valid_id("dispatch", request.dispatch) if request.HasField("dispatch") else None
        migration = valid_names("migration", request.migration.names) if request.HasField("migration") else None
        thresholds = valid_thresholds(request.thresholds) or None
        return convert.policy_to_proto(await self.backend.set_policy(dispatch, migration, thresholds))

    async def _register_instance(self, request: pb.RegisterInstanceRequest) -> pb.Instance:
        iid = valid_id("instance_id", request.instance_id)
        host, port = valid_host(request.host), valid_port(request.port)
        return convert.instance_to_proto(await self.backend.register_instance(iid, host, port))

    async def _deregister_instance(self, request: pb.DeregisterInstanceRequest) -> pb.Instance:
        iid = valid_id("instance_id", request.instance_id)
        timeout_s = valid_timeout(request.timeout_s if request.HasField("timeout_s") else None)
        return convert.instance_to_proto(await self.backend.deregister_instance(iid, timeout_s))


async def _serve(context: Context, rpc: str, work: Awaitable[T]) -> T:
    """`await work`; any exception ends the call with its status instead."""
    try:
        return await work
    except Exception as e:
        await abort_with(context, e, rpc)
        raise AssertionError("unreachable: context.abort raises") from e
