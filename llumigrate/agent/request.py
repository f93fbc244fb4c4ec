"""What an agent keeps of each engine request it runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from llumigrate.agent.rpc import Connection


@dataclass
class AgentRequest:
    rid: str
    conn: Connection | None          # where its `out` events go (None: a pre-copy carrier)
    task: asyncio.Task | None = None
    stopping: bool = False
    engine_aborts: int = 0           # engine-core aborts of a stop (0: it stopped at a step)
    finished: bool = False
    num_tokens: int = 0
    held_back: list[dict] = field(default_factory=list)  # events withheld while stopping
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: dict | None = None
