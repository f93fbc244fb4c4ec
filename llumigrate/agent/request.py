"""What an agent keeps of each engine request it runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from llumigrate.agent.rpc import Connection


@dataclass
class AgentRequest:
    rid: str
    conn: Connection | None          # the controller that added it (None: a pre-copy carrier)
    # The frontend process that owns its stream, when not the controller: it
    # gets the outputs (under `stream`, the request's own id), the
    # controller only their tokens (`progress`).
    owner: Connection | None = None
    stream: str | None = None
    num_restored: int = 0            # output tokens restored on this engine (not emitted again)
    skip: list[int] = field(default_factory=list)  # replayed tokens the client has: checked, not sent
    stopping: bool = False
    engine_aborts: int = 0           # engine-core aborts of a stop (0: it stopped at a step)
    finished: bool = False
    reason: str | None = None        # how it finished ("length", "abort", ...)
    num_tokens: int = 0              # output tokens the engine emitted for it
    kv: dict | None = None           # the connector's report on its final output
    # (EngineCoreOutput, position) withheld while stopping
    held_back: list[tuple[Any, int]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, reason: str | None) -> None:
        if not self.finished:
            self.finished, self.reason = True, reason
            self.done.set()
