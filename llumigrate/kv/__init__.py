"""Paged KV cache helpers: the block layout of an engine's KV layers and the
copy ops of the C++ extension `llumigrate._C`: block gather/scatter between
those layers and one contiguous buffer, and reading blocks straight out of
another process's layers (process_vm_readv)."""

from __future__ import annotations

from llumigrate.kv.layout import KVLayout
from llumigrate.kv.ops import (
    gather_blocks,
    gather_blocks_ref,
    layer_addresses,
    read_remote_blocks,
    scatter_blocks,
    scatter_blocks_ref,
)

__all__ = ["KVLayout", "gather_blocks", "gather_blocks_ref", "layer_addresses", "read_remote_blocks",
           "scatter_blocks", "scatter_blocks_ref"]
