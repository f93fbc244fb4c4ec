"""Python entry points of the KV copy ops, and pure-torch references.

Importing this module loads `llumigrate._C`, which registers
`torch.ops.llumigrate.gather_blocks` / `scatter_blocks` (csrc/kv_ops.cpp has
the layout contract) and `pvm_read_blocks` (csrc/pvm_ops.cpp). In a CUDA build
the first two also run on CUDA layers (csrc/cuda/kv_ops_cuda.cpp: one kernel
launch per call on the current stream; a block may also be [parts, ...] with
the parts strided, e.g. vLLM's [2, num_blocks, ...] caches seen through
`.transpose(0, 1)`), and `copy_blocks` copies from a peer's IPC-mapped layers.

Threads: torch.ops releases the GIL around the C++ kernel (measured by
tests/test_kv_ops.py::test_op_releases_the_gil), so a transfer thread copying
blocks does not stall the engine's Python thread; the kernels never touch
the GIL or any global thread setting. num_threads=1 copies on the calling
thread; >1 (or 0: at::get_num_threads()) opens an OpenMP team of that size
for this call only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import llumigrate._C  # noqa: F401  (registers torch.ops.llumigrate.*)

BlockIds = Sequence[int] | torch.Tensor


def as_block_ids(block_ids: BlockIds) -> torch.Tensor:
    """`block_ids` as a 1-D int64 CPU tensor (no copy when it already is one)."""
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device="cpu", dtype=torch.int64).reshape(-1)
    return torch.tensor(list(block_ids), dtype=torch.int64)


def gathered_shape(layers: Sequence[torch.Tensor], num_ids: int) -> tuple[int, ...]:
    """Shape of the buffer `gather_blocks` returns: [n, L, *block_shape]."""
    return (num_ids, len(layers), *layers[0].shape[1:])


def gather_blocks(layers: Sequence[torch.Tensor], block_ids: BlockIds, out: torch.Tensor | None = None,
                  num_threads: int = 1) -> torch.Tensor:
    """Copy blocks `block_ids` of every layer into `out`, block-major.

    `out` (allocated as [n, L, *block_shape] of the layers' dtype when None)
    may have any dtype and shape if contiguous with n * L * block_bytes bytes.
    CUDA layers: `out` on their device (asynchronous, current stream) or on
    the CPU (synchronous). num_threads (CPU only): 1 copies on the calling thread, 0 uses at::get_num_threads().
    Raises RuntimeError on any layout, range or size violation.
    """
    ids = as_block_ids(block_ids)
    if out is None:
        out = torch.empty(gathered_shape(layers, ids.numel()), dtype=layers[0].dtype, device=layers[0].device)
    torch.ops.llumigrate.gather_blocks(list(layers), ids, out, num_threads)
    return out


def scatter_blocks(src: torch.Tensor, block_ids: BlockIds, layers: Sequence[torch.Tensor],
                   num_threads: int = 1) -> None:
    """Inverse of `gather_blocks`: write `src` (block-major) into blocks
    `block_ids` of every layer. With duplicate ids and num_threads != 1, which
    copy lands in a duplicated block is unspecified."""
    torch.ops.llumigrate.scatter_blocks(src, as_block_ids(block_ids), list(layers), num_threads)


def read_remote_blocks(pid: int, remote_bases: Sequence[int], remote_ids: BlockIds, local_ids: BlockIds,
                       layers: Sequence[torch.Tensor], num_threads: int = 1) -> None:
    """Copy blocks `remote_ids` of process `pid`'s layers (layer l's block 0
    at address remote_bases[l], same packed layout as `layers`) into blocks
    `local_ids` of `layers`, with Linux process_vm_readv: one copy, no
    staging. Raises RuntimeError (with the errno text) when the read fails,
    e.g. without ptrace rights over `pid` or for an unmapped address."""
    torch.ops.llumigrate.pvm_read_blocks(pid, list(remote_bases), as_block_ids(remote_ids),
                                         as_block_ids(local_ids), list(layers), num_threads)


def has_cuda_ops() -> bool:
    """True when this build of `llumigrate._C` has the CUDA kernels."""
    return hasattr(torch.ops.llumigrate, "copy_blocks")


def block_geometry(layers: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """(num_blocks, block_stride, part_stride) of `layers` in bytes, what a
    peer's `copy_blocks` needs to address them (part_stride: between the
    parts of a [num_blocks, parts, ...] block that is not contiguous)."""
    t = layers[0]
    es = t.element_size()
    block = torch.empty_strided(t.shape[1:], t.stride()[1:], device="meta")
    part_stride = block.numel() * es if t.dim() < 2 or block.is_contiguous() else t.stride(1) * es
    return int(t.shape[0]), t.stride(0) * es, part_stride


def copy_blocks(src_bases: Sequence[int], src_geometry: tuple[int, int, int], src_ids: BlockIds,
                dst_ids: BlockIds, layers: Sequence[torch.Tensor]) -> None:
    """CUDA only: copy blocks `src_ids` of the layers at `src_bases` (block 0
    of each, e.g. a peer's cache mapped with CUDA IPC; `src_geometry` from
    the peer's `block_geometry`, same layout otherwise) into blocks `dst_ids`
    of `layers`, with one kernel on the current stream (asynchronous).
    Raises RuntimeError on a layout or range violation."""
    num_blocks, block_stride, part_stride = src_geometry
    torch.ops.llumigrate.copy_blocks(list(src_bases), num_blocks, block_stride, part_stride,
                                     as_block_ids(src_ids), as_block_ids(dst_ids), list(layers))


def layer_addresses(layers: Sequence[torch.Tensor]) -> list[int]:
    """Address of block 0 of every layer, for a peer's `read_remote_blocks`."""
    return [int(t.data_ptr()) for t in layers]


def gather_blocks_ref(layers: Sequence[torch.Tensor], block_ids: BlockIds,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch reference of `gather_blocks` (slow; for tests)."""
    ids = as_block_ids(block_ids)
    stacked = torch.stack([layer[ids] for layer in layers], dim=1) if len(ids) else \
        torch.empty(gathered_shape(layers, 0), dtype=layers[0].dtype)
    if out is None:
        return stacked
    _bytes(out).copy_(_bytes(stacked))
    return out


def scatter_blocks_ref(src: torch.Tensor, block_ids: BlockIds, layers: Sequence[torch.Tensor]) -> None:
    """Pure-torch reference of `scatter_blocks`; duplicates: the last wins."""
    ids = as_block_ids(block_ids).tolist()
    blocks = _bytes(src).view(layers[0].dtype).reshape(gathered_shape(layers, len(ids)))
    for i, block_id in enumerate(ids):
        for layer_idx, layer in enumerate(layers):
            layer[block_id].copy_(blocks[i, layer_idx])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@torch.library.register_fake("llumigrate::gather_blocks")
def _gather_blocks_fake(layers: list[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor,
                        num_threads: int) -> None:
    _check_fake_bytes(layers, block_ids, out, "out")


@torch.library.register_fake("llumigrate::scatter_blocks")
def _scatter_blocks_fake(src: torch.Tensor, block_ids: torch.Tensor, layers: list[torch.Tensor],
                         num_threads: int) -> None:
    _check_fake_bytes(layers, block_ids, src, "src")


@torch.library.register_fake("llumigrate::pvm_read_blocks")
def _pvm_read_blocks_fake(pid: int, remote_bases: list[int], remote_ids: torch.Tensor, local_ids: torch.Tensor,
                          layers: list[torch.Tensor], num_threads: int) -> None:
    torch._check(remote_ids.numel() == local_ids.numel(), lambda: "remote and local id counts differ")


if has_cuda_ops():
    @torch.library.register_fake("llumigrate::copy_blocks")
    def _copy_blocks_fake(src_bases: list[int], src_num_blocks: int, src_block_stride: int, src_part_stride: int,
                          src_ids: torch.Tensor, dst_ids: torch.Tensor, layers: list[torch.Tensor]) -> None:
        torch._check(src_ids.numel() == dst_ids.numel(), lambda: "source and destination id counts differ")


def _check_fake_bytes(layers: list[torch.Tensor], block_ids: torch.Tensor, buf: torch.Tensor,
                      name: str) -> None:
    torch._check(len(layers) >= 1, lambda: "layers must hold at least one tensor")
    want = block_ids.numel() * len(layers) * layers[0][0].numel() * layers[0].element_size()
    got = buf.numel() * buf.element_size()
    torch._check(got == want, lambda: f"{name} holds {got} bytes, need {want}")
