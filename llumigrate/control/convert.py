"""Backend views <-> protobuf messages, and messages -> plain dicts (for JSON)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from llumigrate import __version__
from llumigrate.control.backend import HealthView, InstanceView, PolicyView, RequestView
from llumigrate.control.events import Event
from llumigrate.control.v1 import control_pb2 as pb

if TYPE_CHECKING:
    from llumigrate.controller.coordinator import MigrationResult


def instance_to_proto(v: InstanceView) -> pb.Instance:
    return pb.Instance(**dataclasses.asdict(v))


def request_to_proto(v: RequestView) -> pb.Request:
    return pb.Request(**dataclasses.asdict(v))


def policy_to_proto(v: PolicyView) -> pb.Policy:
    return pb.Policy(dispatch=v.dispatch, migration=list(v.migration), thresholds=dict(v.thresholds),
                     available_dispatch=list(v.available_dispatch),
                     available_migration=list(v.available_migration))


def health_to_proto(v: HealthView) -> pb.HealthResponse:
    return pb.HealthResponse(status=v.status, num_instances=v.num_instances,
                             num_instances_up=v.num_instances_up, version=__version__,
                             detail=dict(v.detail))


def event_to_proto(e: Event) -> pb.Event:
    return pb.Event(kind=e.kind, seq=e.seq, timestamp=e.timestamp, request_id=e.request_id,
                    instance_id=e.instance_id, destination_id=e.destination_id,
                    detail=dict(e.detail), dropped=e.dropped)


def migration_to_proto(r: MigrationResult) -> pb.MigrateResponse:
    """`r` is a MigrationResult or anything with its fields (seconds become ms)."""
    msg = pb.MigrateResponse(
        request_id=r.request_id, source=r.source, destination=r.destination, state=r.state,
        committed=bool(r.committed), reason=r.reason, abort_stage=r.abort_stage, stages=r.stages,
        blocks_per_stage=list(r.blocks_per_stage), blocks_hit_at_commit=r.blocks_hit_at_commit,
        blocks_loaded_at_commit=r.blocks_loaded_at_commit, context_tokens=r.context_tokens,
        total_ms=r.total_s * 1e3, phase_ms={k: s * 1e3 for k, s in r.phase_s.items()},
        history=list(r.history))
    if r.downtime_s is not None:
        msg.downtime_ms = r.downtime_s * 1e3
    return msg


def to_dict(msg: Message) -> dict[str, Any]:
    """Every field of `msg` by its proto name, defaults included, numbers as
    numbers (unlike proto3 JSON, which writes 64-bit integers as strings); an
    unset optional field is None."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.has_presence and f.message_type is None and not msg.HasField(f.name):
            out[f.name] = None
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.message_type is not None:
            out[f.name] = [to_dict(m) for m in value] if f.is_repeated else to_dict(value)
        else:
            out[f.name] = list(value) if f.is_repeated else value
    return out
