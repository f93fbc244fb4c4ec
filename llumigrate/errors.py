"""Typed errors raised at llumigrate's boundaries.

Internal invariants use `assert`; anything a caller, a peer or the wire can
cause raises one of these.
"""

from __future__ import annotations


class LlumigrateError(Exception):
    """Base class of every error llumigrate raises on purpose."""


class ConfigError(LlumigrateError, ValueError):
    """A configuration value is invalid; the message lists what is allowed."""


class TransferError(LlumigrateError):
    """Moving KV bytes between instances failed (peer gone, timeout, bad frame)."""


class TransferRefused(TransferError):
    """The source refused a pull (unknown request, range out of bounds, stale)."""


class MigrationRefused(LlumigrateError):
    """A migration cannot start; the request keeps running where it is."""


class MigrationAborted(LlumigrateError):
    """A migration stopped part-way; the request keeps running on the source
    (or finished there). `stage` names the protocol state it was in."""

    def __init__(self, reason: str, stage: str = "") -> None:
        super().__init__(f"{reason} (during {stage})" if stage else reason)
        self.reason = reason
        self.stage = stage


class InstanceLost(LlumigrateError):
    """An instance (agent or engine) stopped answering."""


class InstanceStartFailed(InstanceLost):
    """A local agent, or its engine, did not start. `cause` is the line of its
    log that says why (e.g. vLLM's ValueError on a bad engine argument);
    `log_path` keeps the whole log."""

    def __init__(self, instance_id: str, how: str, cause: str, log_path: str) -> None:
        super().__init__(f"instance {instance_id} did not start ({how}): {cause}\n"
                         f"  its log: {log_path}")
        self.instance_id, self.how, self.cause, self.log_path = instance_id, how, cause, log_path


class RequestNotFound(LlumigrateError, KeyError):
    """No in-flight request has that id."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "request not found"


class InstanceNotFound(LlumigrateError, KeyError):
    """No instance has that id (an instance that exists but stopped answering
    raises InstanceLost instead)."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "instance not found"


class NoInstanceAvailable(LlumigrateError):
    """No instance may take a new request (all down, draining or stale); the
    message says why each one was excluded."""
