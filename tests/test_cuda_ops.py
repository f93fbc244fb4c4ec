"""CUDA kernels of the KV copy ops against the pure-torch references, on
vLLM-shaped caches (fp16/bf16, several block sizes and head layouts, K/V split
or block-first), with poisoned outputs, host buffers, odd alignments, errors
and opcheck. Needs a GPU and a CUDA build of llumigrate._C."""

from __future__ import annotations

import pytest
import torch

from llumigrate.kv.ops import (
    block_geometry,
    copy_blocks,
    gather_blocks,
    gather_blocks_ref,
    has_cuda_ops,
    layer_addresses,
    scatter_blocks,
    scatter_blocks_ref,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not has_cuda_ops(), reason="llumigrate._C was built without CUDA")]

NUM_BLOCKS = 37


def make_cache(kind: str, num_layers: int, block_size: int, heads: int, head: int, dtype: torch.dtype,
               seed: int, num_blocks: int = NUM_BLOCKS) -> list[torch.Tensor]:
    """Per-layer views with dim 0 the block id, as vLLM backends lay them out:
    flash: [2, N, bs, h, d] seen as [N, 2, bs, h, d]; flashinfer: [N, 2, bs, h, d];
    hnd: [2, N, h, bs, d] seen as [N, 2, h, bs, d]; cpu-like: [N, h, bs, 2 * d]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = {"flash": (2, num_blocks, block_size, heads, head), "flashinfer": (num_blocks, 2, block_size, heads, head),
              "hnd": (2, num_blocks, heads, block_size, head), "packed": (num_blocks, heads, block_size, 2 * head)}
    backing = torch.randn((num_layers, *shapes[kind]), generator=g, device="cuda").to(dtype)
    layers = list(backing.unbind(0))
    return [t.transpose(0, 1) for t in layers] if kind in ("flash", "hnd") else layers


def poisoned_backing(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """NaN-filled layers with exactly the strides of `like` (fresh memory)."""
    out = []
    for t in like:
        raw = torch.full((t.untyped_storage().nbytes() // t.element_size(),), float("nan"), dtype=t.dtype,
                         device=t.device)
        out.append(raw.as_strided(t.shape, t.stride(), t.storage_offset()))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


IDS = [5, 0, 36, 17, 17, 2, 30]
CASES = [("flash", 16, 8, 128), ("flash", 32, 4, 64), ("flashinfer", 16, 8, 128), ("hnd", 16, 2, 96),
         ("packed", 1, 1, 80), ("flash", 64, 1, 256)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,block_size,heads,head", CASES)
def test_gather_scatter_match_reference(kind, block_size, heads, head, dtype):
    layers = make_cache(kind, 3, block_size, heads, head, dtype, seed=1)
    ref = gather_blocks_ref(layers, IDS)
    out = torch.full_like(ref, float("nan"))
    gather_blocks(layers, IDS, out)
    torch.cuda.synchronize()
    assert same_bits(out, ref)
    dest = poisoned_backing(layers)
    want = poisoned_backing(layers)
    ids = [3, 9, 36, 0, 21, 22, 1]
    scatter_blocks(out, ids, dest)
    scatter_blocks_ref(out, ids, want)
    torch.cuda.synchronize()
    for d, w in zip(dest, want):
        assert same_bits(d, w)  # written blocks equal, every other byte still NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_buffers_are_synchronous(dtype):
    layers = make_cache("flash", 2, 16, 8, 128, dtype, seed=2)
    host = torch.full(gather_blocks_ref(layers, IDS).shape, float("nan"), dtype=dtype)
    gather_blocks(layers, IDS, host)  # no synchronize: a CPU buffer is ready on return
    assert same_bits(host, gather_blocks_ref(layers, IDS).cpu())
    dest = poisoned_backing(layers)
    scatter_blocks(host, IDS[:3] + [1, 2, 3, 4], dest)
    want = poisoned_backing(layers)
    scatter_blocks_ref(host.cuda(), IDS[:3] + [1, 2, 3, 4], want)
    torch.cuda.synchronize()
    assert all(same_bits(d, w) for d, w in zip(dest, want))


def test_unaligned_and_odd_sizes_fall_back_to_narrow_vectors():
    backing = torch.randint(0, 255, (2 * 11 * 3 * 5 + 1,), dtype=torch.uint8, device="cuda")
    layers = list(backing[1:].view(2, 11, 3, 5).unbind(0))  # 15-byte blocks at odd addresses
    out = torch.empty(4, 2, 3, 5, dtype=torch.uint8, device="cuda")
    gather_blocks(layers, [10, 0, 3, 3], out)
    assert torch.equal(out, gather_blocks_ref(layers, [10, 0, 3, 3]))
    big = make_cache("packed", 2, 16, 8, 128, torch.float16, seed=3)
    flat = torch.empty(3 * 2 * 8 * 16 * 256 * 2 + 8, dtype=torch.uint8, device="cuda")[8:]  # 8-aligned only
    gather_blocks(big, [1, 2, 3], flat)
    assert same_bits(flat, gather_blocks_ref(big, [1, 2, 3]))


def test_runs_on_the_current_stream():
    layers = make_cache("flash", 4, 16, 8, 128, torch.bfloat16, seed=4)
    side = torch.cuda.Stream()
    out = torch.empty_like(gather_blocks_ref(layers, IDS))
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gather_blocks(layers, IDS, out)
    side.synchronize()
    assert same_bits(out, gather_blocks_ref(layers, IDS))


def test_copy_blocks_between_caches_of_different_sizes():
    src = make_cache("flash", 3, 16, 8, 128, torch.bfloat16, seed=5, num_blocks=50)
    dst = poisoned_backing(make_cache("flash", 3, 16, 8, 128, torch.bfloat16, seed=6))
    want = poisoned_backing(dst)
    src_ids, dst_ids = [49, 0, 7, 8], [36, 1, 2, 0]
    copy_blocks(layer_addresses(src), block_geometry(src), src_ids, dst_ids, dst)
    scatter_blocks_ref(gather_blocks_ref(src, src_ids), dst_ids, want)
    torch.cuda.synchronize()
    assert all(same_bits(d, w) for d, w in zip(dst, want))
    assert block_geometry(src) == (50, 16 * 8 * 128 * 2, 50 * 16 * 8 * 128 * 2)


def test_errors_are_clear():
    layers = make_cache("flash", 2, 16, 2, 64, torch.float16, seed=7)
    out = torch.empty_like(gather_blocks_ref(layers, [0, 1]))
    op = torch.ops.llumigrate.gather_blocks
    with pytest.raises(RuntimeError, match=r"block_ids\[1\] = 37 is out of range \[0, 37\)"):
        op(layers, torch.tensor([0, 37]), out, 1)
    with pytest.raises(RuntimeError, match="block_ids must be on CPU"):
        op(layers, torch.tensor([0, 1], device="cuda"), out, 1)
    with pytest.raises(RuntimeError, match="holds .* bytes but n \\* num_layers"):
        op(layers, torch.tensor([0]), out, 1)
    with pytest.raises(RuntimeError, match=r"layers\[1\] is on cpu"):
        op([layers[0], layers[1].cpu()], torch.tensor([0, 1]), out, 1)
    with pytest.raises(RuntimeError, match="contiguous or \\[parts"):
        op([t.transpose(2, 3) for t in layers], torch.tensor([0, 1]), out, 1)
    with pytest.raises(RuntimeError, match="source ids but"):
        copy_blocks(layer_addresses(layers), block_geometry(layers), [0, 1], [0], layers)


def test_opcheck():
    layers = make_cache("flash", 2, 16, 2, 64, torch.bfloat16, seed=8)
    ids = torch.tensor([4, 0, 2])
    out = torch.empty_like(gather_blocks_ref(layers, ids))
    torch.library.opcheck(torch.ops.llumigrate.gather_blocks.default, (layers, ids, out, 1))
    torch.library.opcheck(torch.ops.llumigrate.scatter_blocks.default, (out, ids, poisoned_backing(layers), 1))
    src = make_cache("flash", 2, 16, 2, 64, torch.bfloat16, seed=9)
    args = (layer_addresses(src), *block_geometry(src), ids, torch.tensor([1, 2, 3]), poisoned_backing(layers))
    torch.library.opcheck(torch.ops.llumigrate.copy_blocks.default, args)
