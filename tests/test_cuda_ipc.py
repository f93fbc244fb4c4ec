"""CUDA IPC between two processes on one GPU: a child exports its KV, this
process maps it once and copies block ranges device to device; the mapping is
shared per peer and released with its last user. With the session's GPU hook
in place, also a full KVServer/KVClient pull over ipc. Needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import pytest
import torch

from llumigrate.kv.ops import gather_blocks_ref, has_cuda_ops, scatter_blocks_ref
from llumigrate.transfer import session

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not has_cuda_ops(), reason="llumigrate._C was built without CUDA")]

SHAPE = (4, 2, 40, 16, 8, 128)  # layers, K/V, blocks, block size, kv heads, head size
CHILD = r"""
import json, sys, msgpack, torch
from llumigrate.transfer.cuda_ipc import export_layers
from llumigrate.transfer import Grant, KVServer
shape = tuple(json.loads(sys.argv[1]))
g = torch.Generator(device="cuda").manual_seed(11)
layers = [t.transpose(0, 1) for t in torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16).unbind(0)]
torch.cuda.synchronize()
table = list(range(shape[2] - 1, -1, -1))
srv = KVServer(layers, lambda req: Grant(table[req.start_block:req.start_block + req.num_blocks]))
srv.start()
print(msgpack.packb(export_layers(layers)).hex(), flush=True)
print(json.dumps(srv.address), flush=True)
sys.stdin.read()
srv.close()
"""


def source_layers() -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(11)
    return [t.transpose(0, 1) for t in torch.randn(SHAPE, generator=g, device="cuda").to(torch.bfloat16).unbind(0)]


def poisoned_layers() -> list[torch.Tensor]:
    return [t.transpose(0, 1) for t in torch.full(SHAPE, float("nan"), device="cuda").to(torch.bfloat16).unbind(0)]


@pytest.fixture(scope="module")
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(SHAPE)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    export = msgpack.unpackb(bytes.fromhex(proc.stdout.readline().strip()), raw=False)
    address = tuple(json.loads(proc.stdout.readline()))
    yield proc, export, address
    proc.stdin.close()
    proc.wait(30)


def test_map_once_copy_and_release(child):
    from llumigrate.transfer.cuda_ipc import PEERS, ipc_copy
    proc, export, _ = child
    assert export["pid"] == proc.pid and len(export["storages"]) == 1  # one buffer: one handle
    dst, want = poisoned_layers(), poisoned_layers()
    src_ids, dst_ids = [39, 0, 5, 6, 7], [1, 2, 3, 38, 0]
    key, mapping = PEERS.acquire(export, dst[0].device)
    key2, again = PEERS.acquire(export, dst[0].device)
    assert again is mapping and key2 == key and PEERS.num_mapped() == 1
    ipc_copy(mapping, src_ids, dst_ids, dst)  # returns once the blocks landed
    scatter_blocks_ref(gather_blocks_ref(source_layers(), src_ids), dst_ids, want)
    for d, w in zip(dst, want):
        assert torch.equal(d.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8))
    PEERS.release(key)
    PEERS.release(key)
    assert PEERS.num_mapped() == 0


@pytest.mark.skipif(not hasattr(session, "gpu_link"), reason="ServerSession has no GPU hook yet")
def test_kv_client_pulls_over_ipc(child):
    from llumigrate.transfer import KVClient, PullRequest
    _, _, address = child
    dst = poisoned_layers()
    cli = KVClient(dst, transport="auto")
    try:
        payload = cli.pull(address, PullRequest("r", 3, 6), [0, 1, 2, 10, 11, 12])
        assert payload == b"" and cli.transport_to(address) == "ipc"
        src_ids = [36, 35, 34, 33, 32, 31]  # the child's table is reversed
        want = poisoned_layers()
        scatter_blocks_ref(gather_blocks_ref(source_layers(), src_ids), [0, 1, 2, 10, 11, 12], want)
        assert all(torch.equal(d.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8))
                   for d, w in zip(dst, want))
    finally:
        cli.close()
