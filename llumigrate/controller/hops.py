"""The engine requests of a request's hops, as encoded for an agent's `add`
and `precopy` verbs: vLLM's own `EngineCoreRequest`, tagged for llumigrate's
connector.

Every hop is the request as its frontend made it (prompt, sampling
parameters, LoRA adapter, cache salt, priority), under the hop's engine id.
A later hop also carries the output tokens of the hops before it, which the
destination engine restores as outputs, and what it needs to continue
exactly: the KV to load (`LoadSpec`) and a seeded sampler's state.
"""

from __future__ import annotations

from typing import Any

from llumigrate.controller.request import RequestHandle
from llumigrate.engine.params import LoadSpec, RequestTag
from llumigrate.engine.vllm_api import carrier, encode, retagged


async def add_hop(inst: Any, h: RequestHandle, engine_rid: str, *, outputs: list[int] | None = None,
                  load: LoadSpec | None = None, generator_state: bytes | None = None,
                  skip: list[int] | None = None, rpc_timeout: float | None = 60.0) -> None:
    """Run hop `engine_rid` of `h` on instance `inst` (`hop_request`); its
    outputs go to the frontend process that owns `h` if that one is
    connected to `inst`, else here. The first tokens it produces are checked
    against `skip` (a replay of tokens the client has) and not sent again."""
    reply = await inst.call("add", rpc_timeout=rpc_timeout,
                            request=hop_request(h, engine_rid, outputs=outputs, load=load,
                                                generator_state=generator_state),
                            owner=h.owner, stream=h.request_id if h.owner else None, skip=list(skip or ()))
    h.remote = bool(isinstance(reply, dict) and reply.get("owner"))


def hop_request(h: RequestHandle, engine_rid: str, *, outputs: list[int] | None = None,
                load: LoadSpec | None = None, generator_state: bytes | None = None) -> bytes:
    """Hop `engine_rid` of `h`, continuing after `outputs` (none: from the start)."""
    tag = RequestTag(engine_rid, load, generator_state, output_tokens=tuple(outputs or ()))
    return encode(retagged(h.core, engine_rid, tag.to_params(), continued=bool(outputs)))


def carrier_request(h: RequestHandle, key: str, token_ids: list[int], load: LoadSpec) -> bytes:
    """A pre-copy carrier of `h` that loads `load` into the destination's prefix cache."""
    return encode(carrier(h.core, key, token_ids, RequestTag(key, load).to_params()))
