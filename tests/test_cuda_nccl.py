"""NCCL pair communicators. One GPU: libnccl loads and hands out distinct
128-byte ids, bad arguments fail clearly. Two GPUs (NCCL refuses two ranks of
one communicator on one GPU, "Duplicate GPU detected"): a pair sends and
receives on side streams, and, with the session's GPU hook, a KVClient pulls
over nccl. Needs GPUs and libnccl."""

from __future__ import annotations

import threading

import pytest
import torch

from llumigrate.kv.ops import gather_blocks_ref, has_cuda_ops, scatter_blocks_ref
from llumigrate.transfer import nccl, session

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not has_cuda_ops(), reason="llumigrate._C was built without CUDA"),
              pytest.mark.skipif(not nccl.available(), reason="libnccl not found")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a pair needs two GPUs")


def test_unique_ids_and_bad_arguments():
    a, b = nccl.unique_id(), nccl.unique_id()
    assert len(a) == len(b) == nccl.UNIQUE_ID_BYTES and a != b
    assert nccl.load().version() >= 21800
    with pytest.raises(nccl.NcclError, match="bad communicator id"):
        nccl.PairComm(b"short", 0, torch.device("cuda", 0))
    with pytest.raises(nccl.NcclError, match="rank 2"):
        nccl.PairComm(a, 2, torch.device("cuda", 0))


def pair(uid: bytes) -> tuple[nccl.PairComm, nccl.PairComm]:
    box: list[nccl.PairComm] = []
    t = threading.Thread(target=lambda: box.append(nccl.PairComm(uid, 0, torch.device("cuda", 0))))
    t.start()
    one = nccl.PairComm(uid, 1, torch.device("cuda", 1))
    t.join(60)
    return box[0], one


@two_gpus
def test_pair_send_recv():
    zero, one = pair(nccl.unique_id())
    try:
        src = torch.arange(1 << 20, dtype=torch.int32, device="cuda:0").view(torch.uint8)
        dst = torch.zeros(src.numel(), dtype=torch.uint8, device="cuda:1")
        t = threading.Thread(target=lambda: (zero.send(src), torch.cuda.synchronize(0)))
        t.start()
        one.recv(dst)
        torch.cuda.synchronize(1)
        t.join(30)
        assert torch.equal(dst.cpu(), src.cpu())
        with pytest.raises(nccl.NcclError, match="must be contiguous on cuda:1"):
            one.recv(src)
    finally:
        zero.close()
        one.close()
    with pytest.raises(nccl.NcclError, match="closed communicator"):
        one.recv(dst)


@two_gpus
@pytest.mark.skipif(not hasattr(session, "gpu_link"), reason="ServerSession has no GPU hook yet")
def test_kv_client_pulls_over_nccl():
    from llumigrate.transfer import Grant, KVClient, KVServer, PullRequest
    shape = (3, 2, 30, 16, 8, 128)
    g = torch.Generator(device="cuda:0").manual_seed(3)
    src = [t.transpose(0, 1) for t in torch.randn(shape, generator=g, device="cuda:0").half().unbind(0)]
    dst = [t.transpose(0, 1) for t in torch.full(shape, float("nan"), device="cuda:1").half().unbind(0)]
    srv = KVServer(src, lambda req: Grant(list(range(req.start_block, req.start_block + req.num_blocks))))
    srv.start()
    cli = KVClient(dst, transport="nccl")
    try:
        cli.pull(srv.address, PullRequest("r", 4, 20), list(range(29, 9, -1)))
        assert cli.transport_to(srv.address) == "nccl"
        want = [t.transpose(0, 1) for t in torch.full(shape, float("nan"), device="cuda:1").half().unbind(0)]
        scatter_blocks_ref(gather_blocks_ref(src, list(range(4, 24))).to("cuda:1"), list(range(29, 9, -1)), want)
        assert all(torch.equal(d.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8))
                   for d, w in zip(dst, want))
    finally:
        cli.close()
        srv.close()
