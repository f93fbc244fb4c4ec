"""`KVLayout`: what two engines must agree on to exchange raw KV blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Wire names of the dtypes a KV cache may use.
_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
               torch.float8_e4m3fn, torch.float8_e5m2)
}


@dataclass(frozen=True)
class KVLayout:
    """Shape of one engine's paged KV cache, the number of blocks aside.

    Invariant: `block_bytes` == prod(block_shape) * itemsize(dtype), the bytes
    of one block of ONE layer. Two layouts are `compatible` when a block
    gathered under one can be scattered under the other bit for bit.
    """

    num_layers: int
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    block_bytes: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if any(d < 0 for d in self.block_shape):
            raise ValueError(f"block_shape must be non-negative, got {self.block_shape}")
        want = math.prod(self.block_shape) * self.dtype.itemsize
        if self.block_bytes != want:
            raise ValueError(f"block_bytes {self.block_bytes} != prod{self.block_shape} * {self.dtype.itemsize}")

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one logical block across all layers."""
        return self.num_layers * self.block_bytes

    @classmethod
    def from_layers(cls, layers: Sequence[torch.Tensor]) -> KVLayout:
        """Layout of `layers` ([num_blocks, *block_shape] each, one dtype).
        Raises ValueError when the layers disagree."""
        if not layers:
            raise ValueError("layers is empty")
        first = layers[0]
        if first.dim() < 1:
            raise ValueError("each layer must be [num_blocks, *block_shape]")
        for i, t in enumerate(layers):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"layers[{i}] is {tuple(t.shape)} {t.dtype}, layers[0] is "
                                 f"{tuple(first.shape)} {first.dtype}")
        block_shape = tuple(int(d) for d in first.shape[1:])
        return cls(len(layers), block_shape, first.dtype, math.prod(block_shape) * first.element_size())

    def to_wire(self) -> dict[str, Any]:
        """Plain dict for msgpack."""
        return {"num_layers": self.num_layers, "block_shape": list(self.block_shape),
                "dtype": str(self.dtype).removeprefix("torch."), "block_bytes": self.block_bytes}

    @classmethod
    def from_wire(cls, d: Any) -> KVLayout:
        """Inverse of `to_wire`; raises ValueError on anything malformed."""
        if not isinstance(d, dict):  # wire data: every malformation is a ValueError
            raise ValueError(f"layout must be a map, got {type(d).__name__}")  # noqa: TRY004
        try:
            num_layers, shape, dtype, block_bytes = d["num_layers"], d["block_shape"], d["dtype"], d["block_bytes"]
        except KeyError as e:
            raise ValueError(f"layout lacks {e}") from None
        if not (_is_int(num_layers) and _is_int(block_bytes) and isinstance(shape, list)
                and all(_is_int(x) for x in shape)):
            raise ValueError(f"malformed layout {d!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPES)}")
        return cls(num_layers, tuple(shape), _DTYPES[dtype], block_bytes)

    def compatible(self, other: KVLayout) -> bool:
        """True when blocks can move between the two layouts bit for bit."""
        return self.mismatch(other) is None

    def mismatch(self, other: KVLayout) -> str | None:
        """Why the two layouts are not `compatible`, or None when they are."""
        for name in ("num_layers", "block_shape", "dtype"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"KV layout mismatch: {name} is {a} here, {b} there"
        return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
