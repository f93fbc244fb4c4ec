"""Moving KV blocks between workers: a pull-model server/client pair over
shared memory (same host) or TCP (other hosts).

The source worker runs a `KVServer` over its KV layers; a destination worker
calls `KVClient.pull`, which fetches blocks of a source request and scatters
them straight into its own blocks. Control frames are length-prefixed msgpack
(`wire`); KV bytes never travel inside them.
"""

from __future__ import annotations

from llumigrate.transfer.api import TRANSPORTS, Grant, PullRequest
from llumigrate.transfer.client import KVClient
from llumigrate.transfer.server import KVServer

__all__ = ["TRANSPORTS", "Grant", "KVClient", "KVServer", "PullRequest"]
