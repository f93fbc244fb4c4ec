"""Failover: continue a request of a lost instance on another one by token
replay (its KV cache died with the instance, so it is recomputed).

- Greedy and unseeded requests restart from prompt + tokens streamed so far
  (one prefill), with `max_tokens` reduced: the client's stream continues
  where it stopped.
- Seeded requests restart from the original prompt with the same seed: their
  sampler state died too, and replaying every sample is the only way to reach
  it. The tokens already streamed come out again; `RequestHandle.append`
  checks them against what the client got and does not re-stream them. A
  replay that produces different tokens fails the request with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

from llumigrate.controller.instance import Instance
from llumigrate.controller.request import RequestHandle


def is_seeded(sampling: dict) -> bool:
    return sampling.get("seed") is not None and float(sampling.get("temperature", 1.0)) > 0


async def replay(h: RequestHandle, dst: Instance,
                 set_hop: Callable[[RequestHandle, Instance, int], None]) -> None:
    """Start `h`'s next hop on `dst` by replay. Raises what `dst.call` raises."""
    if is_seeded(h.sampling):
        h.replay_expected = list(h.output_token_ids)
        prompt, sampling = h.prompt_token_ids, dict(h.sampling)
    else:
        prompt = h.all_token_ids
        sampling = h.continuation_sampling(len(h.output_token_ids))
        if sampling.get("max_tokens") is not None and sampling["max_tokens"] <= 0:
            h.finish("length")
            return
    h.num_failovers += 1
    set_hop(h, dst, h.hop + 1)
    await dst.call("generate", rid=h.engine_rid, prompt_token_ids=prompt, sampling=sampling,
                   priority=h.priority)
