"""The seeded request mix of a stress run.

Greedy, seeded and unseeded-random sampling; short and long prompts; short
and long outputs; streaming and non-streaming clients; several priorities
(vLLM's: lower is more important; 0, the default, is normal and -1, -2 are
high priority at the scheduler's default threshold).
Greedy and seeded requests are deterministic, so their outputs must equal a
run without migration; unseeded ones are only checked for a whole stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB = (3, 1900)          # token ids safe for the built-in tiny model
# NOTE: seeded prompts stay short: vLLM 0.32 on CPU crashes the engine when a
# seeded request's prefill is chunked in a mixed batch (Generator.get_offset).
MAX_SEEDED_PROMPT = 120


@dataclass(frozen=True)
class RequestSpec:
    index: int
    kind: str                   # "greedy" | "seeded" | "random"
    prompt: tuple[int, ...]
    sampling: dict
    priority: int
    streaming: bool

    @property
    def request_id(self) -> str:
        return f"stress-{self.index}"

    @property
    def deterministic(self) -> bool:
        return self.kind in ("greedy", "seeded")

    @property
    def max_tokens(self) -> int:
        return int(self.sampling["max_tokens"])


def make_request(rng: random.Random, index: int) -> RequestSpec:
    """One request of the mix, drawn from `rng`."""
    kind = rng.choices(("greedy", "seeded", "random"), weights=(50, 35, 15))[0]
    if kind == "greedy" and rng.random() < 0.5:
        length = rng.randint(600, 2000)
    else:
        length = rng.randint(20, MAX_SEEDED_PROMPT if kind != "greedy" else 200)
    prompt = tuple(rng.randrange(*VOCAB) for _ in range(length))
    max_tokens = rng.randint(16, 64) if rng.random() < 0.3 else rng.randint(150, 400)
    sampling: dict = {"max_tokens": max_tokens, "ignore_eos": True}
    if kind == "greedy":
        sampling["temperature"] = 0.0
    else:
        sampling.update(temperature=0.8, top_p=0.95)
        if kind == "seeded":
            sampling["seed"] = rng.randrange(1 << 30)
    return RequestSpec(index, kind, prompt, sampling, rng.choice((0, -1, -2)), rng.random() < 0.5)


def make_workload(seed: int, num_requests: int) -> list[RequestSpec]:
    """The first `num_requests` requests of seed `seed`'s mix (a prefix of any longer one)."""
    rng = random.Random(f"workload-{seed}")
    return [make_request(rng, i) for i in range(num_requests)]


class Workload:
    """An endless seeded mix: `next()` gives request 0, 1, 2, ..."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"workload-{seed}")
        self.specs: list[RequestSpec] = []

    def next(self) -> RequestSpec:
        spec = make_request(self.rng, len(self.specs))
        self.specs.append(spec)
        return spec
