"""What llumigrate attaches to a vLLM request, and what the connector reports
back. Travels in `SamplingParams.extra_args["kv_transfer_params"]["llumigrate"]`
as plain msgpack-able values (no pickle, no vLLM import)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from llumigrate.migration.protocol import check_precopy_rate

PARAMS_KEY = "llumigrate"


def plain_stop_reason(value: object) -> int | str | None:
    """A stop reason as msgpack carries it (a stop token id or a stop string)."""
    return value if value is None or isinstance(value, (int, str)) else str(value)


@dataclass(frozen=True)
class LoadSpec:
    """Load KV positions [0, num_tokens) of request `src_key` from the KV
    server at (host, port). Positions the destination already holds in its
    prefix cache are not pulled again."""

    host: str
    port: int
    src_key: str
    num_tokens: int
    # Release the source's held blocks once this load succeeded (final stage).
    final: bool = False
    # Pace the copy to this many MiB/s (pre-copy stages); 0 = as fast as it can.
    rate_mib_s: float = 0.0

    def __post_init__(self) -> None:
        check_precopy_rate(self.rate_mib_s, "rate_mib_s")  # ConfigError, a ValueError

    def to_wire(self) -> dict:
        return {"host": self.host, "port": self.port, "src_key": self.src_key,
                "num_tokens": self.num_tokens, "final": self.final, "rate_mib_s": self.rate_mib_s}

    @classmethod
    def from_wire(cls, d: dict) -> LoadSpec:
        return cls(str(d["host"]), int(d["port"]), str(d["src_key"]),
                   int(d["num_tokens"]), bool(d.get("final", False)), float(d.get("rate_mib_s", 0.0)))


@dataclass(frozen=True)
class RequestTag:
    """llumigrate's identity and instructions for one engine request.

    `output_tokens` restores a moved request: the engine request carries the
    original prompt and sampling parameters, and these are the output tokens
    it already produced on its source. The engine holds them as outputs (they
    count for max_tokens, min_tokens, penalties, stop checks and the grammar)
    and emits only the tokens that follow. Empty: a fresh request."""

    key: str
    load: LoadSpec | None = None
    # torch.Generator state to install before the first sample (seeded resume).
    generator_state: bytes | None = None
    output_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_tokens", tuple(int(t) for t in self.output_tokens))

    def to_params(self) -> dict:
        d: dict = {"key": self.key}
        if self.load is not None:
            d["load"] = self.load.to_wire()
        if self.generator_state is not None:
            d["gen"] = base64.b64encode(self.generator_state).decode()
        if self.output_tokens:
            d["out"] = list(self.output_tokens)
        return {PARAMS_KEY: d}

    @classmethod
    def from_params(cls, params: dict | None) -> RequestTag | None:
        if not params or PARAMS_KEY not in params:
            return None
        d = params[PARAMS_KEY]
        load = LoadSpec.from_wire(d["load"]) if d.get("load") else None
        gen = base64.b64decode(d["gen"]) if d.get("gen") else None
        return cls(str(d["key"]), load, gen, tuple(d.get("out") or ()))


@dataclass(frozen=True)
class SealedRequest:
    """A stopped source request whose blocks are held for a final pull.

    `tokens` is the scheduler's authoritative token list (prompt + outputs) at
    the stop; positions [0, len(tokens) - 1) have KV. `generator_state` is the
    sampler state after `len(tokens) - num_prompt_tokens` samples, or None for
    unseeded requests."""

    key: str
    tokens: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    num_blocks: int
    generator_state: bytes | None

    @property
    def num_kv_tokens(self) -> int:
        return max(0, min(self.num_computed_tokens, len(self.tokens) - 1))

    def to_wire(self) -> dict:
        return {"key": self.key, "tokens": self.tokens, "num_prompt_tokens": self.num_prompt_tokens,
                "num_computed_tokens": self.num_computed_tokens, "num_blocks": self.num_blocks,
                "gen": self.generator_state}

    @classmethod
    def from_wire(cls, d: dict) -> SealedRequest:
        return cls(str(d["key"]), [int(t) for t in d["tokens"]], int(d["num_prompt_tokens"]),
                   int(d["num_computed_tokens"]), int(d["num_blocks"]), d.get("gen"))
