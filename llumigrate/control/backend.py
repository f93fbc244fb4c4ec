"""`ControlBackend`: what the control API needs from the scheduler.

The gRPC server (`control/server.py`) validates the shape of every input
(ids non-empty, names well-formed, numbers finite) and then calls one method
here. Implementations check everything that needs the scheduler's state and
raise the typed errors of `llumigrate.errors`; the server turns them into
gRPC status codes in one place (`control/status.py`):

    RequestNotFound, InstanceNotFound -> NOT_FOUND
    ConfigError                       -> INVALID_ARGUMENT
    MigrationRefused                  -> FAILED_PRECONDITION
    InstanceLost, TransferError       -> UNAVAILABLE
    TimeoutError                      -> DEADLINE_EXCEEDED
    anything else                     -> INTERNAL (logged with its traceback)

Methods are called on the server's event loop, one coroutine per RPC, so
several may run at once; a slow `migrate` must not block the others.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llumigrate.control.events import EventBus
    from llumigrate.controller.coordinator import MigrationResult

REQUEST_STATES = ("waiting", "running", "migrating", "finished")
HEALTH_STATES = ("serving", "degraded", "not_serving")


@dataclass(frozen=True)
class InstanceView:
    """One instance's state and load, as of the call."""

    id: str
    address: str = ""
    up: bool = True
    draining: bool = False
    num_blocks: int = 0
    free_blocks: int = 0
    block_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    freeness: float = 0.0
    num_migrations_in: int = 0
    num_migrations_out: int = 0


@dataclass(frozen=True)
class RequestView:
    """One request; `state` is one of REQUEST_STATES; `priority` is its vLLM
    priority (lower values are served first; 0 is the default)."""

    id: str
    instance_id: str
    priority: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    state: str = "running"
    num_migrations: int = 0
    migration_refusal: str = ""     # why it cannot be moved exactly ("" if it can be)


@dataclass(frozen=True)
class PolicyView:
    """The policies in force, and the names that `set_policy` accepts."""

    dispatch: str
    migration: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    available_dispatch: tuple[str, ...] = ()
    available_migration: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthView:
    """`status` is one of HEALTH_STATES."""

    status: str
    num_instances: int = 0
    num_instances_up: int = 0
    detail: Mapping[str, str] = field(default_factory=dict)


class ControlBackend(abc.ABC):
    """The scheduler as the control API sees it. Every id argument is a
    non-empty string (the server checked); everything else is the backend's
    to check."""

    @abc.abstractmethod
    async def list_instances(self) -> list[InstanceView]:
        """Every instance the scheduler knows, up or down, ordered by id."""

    @abc.abstractmethod
    async def get_instance(self, instance_id: str) -> InstanceView:
        """One instance. Raises InstanceNotFound for an unknown id."""

    @abc.abstractmethod
    async def list_requests(self, instance_id: str | None = None,
                            include_finished: bool = False) -> list[RequestView]:
        """Requests on `instance_id` (every instance when None), unfinished
        ones only unless `include_finished`. Raises InstanceNotFound for an
        unknown instance id."""

    @abc.abstractmethod
    async def migrate(self, request_id: str, destination: str | None = None) -> MigrationResult:
        """Migrates a request and returns once the migration is done or
        aborted (an abort is a result, not an exception: the request keeps
        running on its source). `destination` None: the migration policy
        picks. Raises RequestNotFound, InstanceNotFound (unknown destination),
        MigrationRefused (destination is the request's own instance, is
        draining or down, has no room; the request is finished, already
        migrating or not migratable), InstanceLost (no live destination)."""

    @abc.abstractmethod
    async def drain(self, instance_id: str) -> InstanceView:
        """Stops dispatching new requests to the instance; idempotent. Returns
        the instance after the change. Raises InstanceNotFound."""

    @abc.abstractmethod
    async def undrain(self, instance_id: str) -> InstanceView:
        """Dispatches to the instance again; idempotent. Raises InstanceNotFound."""

    @abc.abstractmethod
    async def register_instance(self, instance_id: str, host: str, port: int) -> InstanceView:
        """Adds the agent serving its control RPC at `host`:`port` to the
        cluster as `instance_id`: connects back to it with the cluster token,
        starts dispatching to it and publishes `instance_joined`. Returns the
        instance as registered. The server checked the shape: `host` a host
        name or IP address (no brackets, no port), 1 <= `port` <= 65535.

        An id held by a down instance is taken over by the new agent (an
        agent restarted on another host rejoins under its old id).

        Raises ConfigError for a host or port the backend cannot use (e.g. a
        host name that does not resolve), MigrationRefused if `instance_id`
        belongs to a live instance, InstanceLost if the agent cannot be
        reached (nothing is registered then)."""

    @abc.abstractmethod
    async def deregister_instance(self, instance_id: str, timeout_s: float) -> InstanceView:
        """Removes an instance cleanly: drains it (publishing `drain` if it
        was not draining), migrates its running requests to other instances,
        waits until it has no unfinished request (migrated away or finished),
        then removes it and publishes `instance_left`. A down instance is
        removed at once (its requests were failed over or ended when it went
        down). Returns the instance as it was when removed (draining).
        0 < `timeout_s` <= 3600 (the server checked).

        Raises InstanceNotFound for an unknown id, TimeoutError if the
        instance is not empty within `timeout_s`; it then stays in the
        cluster, draining (undrain it, or deregister again). So does a call
        cancelled while it waits (the client went away)."""

    @abc.abstractmethod
    async def get_policy(self) -> PolicyView:
        """The policies in force."""

    @abc.abstractmethod
    async def set_policy(self, dispatch: str | None = None,
                         migration: list[str] | None = None,
                         thresholds: Mapping[str, float] | None = None) -> PolicyView:
        """Changes what is given (None: unchanged; `thresholds` merges into
        the current ones) all at once or not at all, and returns the policy now
        in force. Raises ConfigError, listing the allowed values, for an
        unknown policy or threshold name or a value out of range."""

    @abc.abstractmethod
    def event_bus(self) -> EventBus:
        """The bus the scheduler publishes its events into; the server
        subscribes one `Subscription` per WatchEvents call."""

    @abc.abstractmethod
    async def health(self) -> HealthView:
        """Whether the scheduler serves; must answer fast and not raise for a
        down instance (report it as "degraded")."""
