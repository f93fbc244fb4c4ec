"""Where an agent's engine outputs go, one frame per engine step and
connection: a request's outputs to its controller, or, when a frontend
process of the serve owns its stream, to that frontend (under the request's
own id, with each output's position in the stream: the frontend gets a
request's hops from several agents and puts them in order) and only their
tokens to the controller (`progress`). Replayed tokens a client already has
(a failover replay) are checked and not sent again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llumigrate.agent.request import AgentRequest
from llumigrate.agent.rpc import Connection
from llumigrate.engine.vllm_api import (EngineCoreOutputs, drop_first_tokens, encode, finish_reason_name,
                                        keep_preemptions, renamed_output)


class Diverged(Exception):
    """A replay produced other tokens than the ones its client already has."""


def position(req: AgentRequest, o: Any) -> int:
    """Where `o`, just counted in `req.num_tokens`, starts in its request's
    output tokens (those restored on this engine come first)."""
    return req.num_restored + req.num_tokens - len(o.new_token_ids)


def unreplayed(req: AgentRequest, o: Any) -> Any | None:
    """`o` without the replayed tokens its client already has (None if
    nothing is left to send); Diverged if they differ."""
    tokens = list(o.new_token_ids)
    if not req.skip or not tokens:
        return o
    n = min(len(tokens), len(req.skip))
    if tokens[:n] != req.skip[:n]:
        raise Diverged(f"{req.rid}: replayed {tokens[:n]}, the client has {req.skip[:n]}")
    del req.skip[:n]
    if n == len(tokens) and o.finish_reason is None:
        return None
    return drop_first_tokens(o, n)


@dataclass
class Frames:
    """One step's outputs, by connection."""

    outputs: dict[Connection, list] = field(default_factory=dict)
    positions: dict[Connection, list[int]] = field(default_factory=dict)
    progress: dict[Connection, list[list]] = field(default_factory=dict)

    def add(self, req: AgentRequest, o: Any, pos: int) -> None:
        """`o`, whose first token is output token `pos` of its request."""
        if req.owner is not None and not req.owner.closed:
            out = o if req.stream in (None, req.rid) else keep_preemptions(renamed_output(o, req.stream))
            self.outputs.setdefault(req.owner, []).append(out)
            self.positions.setdefault(req.owner, []).append(pos)
            if req.conn is not None:
                self.progress.setdefault(req.conn, []).append(
                    [req.rid, list(o.new_token_ids), finish_reason_name(o.finish_reason)])
        elif req.conn is not None:
            self.outputs.setdefault(req.conn, []).append(o)

    async def send(self, controllers: list[Connection] = (), stats: Any = None,
                   timestamp: float = 0.0) -> None:
        """Push every frame; the step's scheduler stats go to each controller."""
        for conn, items in self.progress.items():
            await conn.push_batched("progress", items=items)
        targets = list(self.outputs)
        if stats is not None:
            targets += [c for c in controllers if c not in self.outputs]
        for conn in targets:
            frame = EngineCoreOutputs(outputs=self.outputs.get(conn, []), timestamp=timestamp,
                                      scheduler_stats=stats if conn in controllers else None)
            if conn in self.positions:
                await conn.push_batched("out", data=encode(frame), pos=self.positions[conn])
            else:
                await conn.push_batched("out", data=encode(frame))
