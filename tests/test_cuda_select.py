"""GPU transport logic that runs without a GPU: the per-pair transport choice,
the Endpoint and GPU frame wire forms, the IPC mapping cache's reference
counting, and NCCL's clean failure when the library is missing."""

from __future__ import annotations

import os
import socket

import msgpack
import pytest
import torch

from llumigrate.errors import ConfigError, TransferError
from llumigrate.transfer import KVClient, gpu_link, nccl
from llumigrate.transfer.api import GPU_AUTO, TRANSPORTS
from llumigrate.transfer.channel import Channel
from llumigrate.transfer.cuda_ipc import IpcPeers, peer_key
from llumigrate.transfer.select import Endpoint, choose_transport, hello_transport

GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"


def make_endpoint(host: str = "h1", device: str = "cuda", gpu: str = GPU_A, visible: tuple[str, ...] = (GPU_A,),
                  nccl_ok: bool = True, pid: int = 100) -> Endpoint:
    if device == "cpu":
        return Endpoint(host, pid)
    return Endpoint(host, pid, "cuda", gpu, visible, nccl_ok)


@pytest.mark.parametrize("requested,device,want", [
    ("auto", "cpu", "auto"), ("pvm", "cpu", "pvm"), ("tcp", "cpu", "tcp"),
    ("auto", "cuda", GPU_AUTO), ("ipc", "cuda", "ipc"), ("nccl", "cuda", "nccl")])
def test_hello_transport(requested, device, want):
    assert hello_transport(requested, device) == want


@pytest.mark.parametrize("requested,device", [("ipc", "cpu"), ("nccl", "cpu"), ("shm", "cuda"), ("tcp", "cuda"),
                                              ("bogus", "cpu"), (GPU_AUTO, "cuda")])
def test_hello_transport_rejects_other_devices(requested, device):
    with pytest.raises(ConfigError):
        hello_transport(requested, device)


def test_cpu_pairs_keep_probing_locally_or_use_tcp():
    here, same, other = make_endpoint(device="cpu"), make_endpoint(device="cpu", pid=7), \
        make_endpoint("h2", device="cpu")
    assert choose_transport("auto", here, same) == "local"
    assert choose_transport("shm", here, same) == "local"
    assert choose_transport("tcp", here, same) == "tcp"
    assert choose_transport("auto", here, other) == "tcp"
    with pytest.raises(TransferError, match="on this host"):
        choose_transport("pvm", here, other)
    with pytest.raises(ConfigError):
        choose_transport("ipc", here, same)


def test_cuda_same_host_visible_gpu_uses_ipc():
    here = make_endpoint(gpu=GPU_B, visible=(GPU_A, GPU_B))
    assert choose_transport("auto", here, make_endpoint(gpu=GPU_A, pid=7)) == "ipc"
    assert choose_transport(GPU_AUTO, here, make_endpoint(gpu=GPU_A, pid=7)) == "ipc"
    assert choose_transport("nccl", here, make_endpoint(gpu=GPU_A, pid=7)) == "nccl"
    assert choose_transport("auto", here, make_endpoint(gpu=GPU_B, pid=here.pid)) == "ipc"  # pull from itself


def test_cuda_elsewhere_uses_nccl():
    here = make_endpoint(gpu=GPU_A, visible=(GPU_A,))
    assert choose_transport("auto", here, make_endpoint(gpu=GPU_B, visible=(GPU_B,))) == "nccl"  # GPU not visible
    assert choose_transport("auto", here, make_endpoint("h2", gpu=GPU_A)) == "nccl"            # other host
    with pytest.raises(TransferError, match="ipc: the source is on another host"):
        choose_transport("ipc", here, make_endpoint("h2"))
    with pytest.raises(TransferError, match="not visible here"):
        choose_transport("ipc", here, make_endpoint(gpu=GPU_B))


def test_no_usable_gpu_transport_lists_reasons():
    here = make_endpoint(nccl_ok=False)
    with pytest.raises(TransferError, match=r"ipc: the source is on another host; nccl: not loadable here"):
        choose_transport("auto", here, make_endpoint("h2"))
    with pytest.raises(TransferError, match="nccl: not loadable at the source"):
        choose_transport("nccl", make_endpoint(), make_endpoint("h2", nccl_ok=False))
    with pytest.raises(TransferError, match="KV is on cuda here but on cpu"):
        choose_transport("auto", make_endpoint(), make_endpoint(device="cpu"))


def test_endpoint_wire_roundtrip_and_malformed():
    e = make_endpoint(visible=(GPU_A, GPU_B))
    assert Endpoint.from_wire(e.to_wire()) == e
    for bad in (None, {}, {**e.to_wire(), "pid": "1"}, {**e.to_wire(), "device": "tpu"},
                {**e.to_wire(), "visible_gpus": [1]}):
        with pytest.raises(TransferError, match="malformed endpoint"):
            Endpoint.from_wire(bad)
    with pytest.raises(ConfigError, match="device must be one of"):
        Endpoint("h", 1, "tpu")


def test_transports_and_client_device_checks():
    assert GPU_AUTO not in TRANSPORTS and {"ipc", "nccl"} <= set(TRANSPORTS)
    layers = list(torch.zeros(2, 4, 8).unbind(0))
    with pytest.raises(ConfigError, match="CPU KV moves over"):
        KVClient(layers, transport="ipc")
    KVClient(layers, transport="auto").close()


def test_server_refuses_clients_of_the_other_device():
    cpu_layers = list(torch.zeros(2, 4, 8).unbind(0))
    assert gpu_link.refusal(cpu_layers, "auto") is None
    assert "KV here is on the CPU" in gpu_link.refusal(cpu_layers, GPU_AUTO)
    assert "KV here is on the CPU" in gpu_link.refusal(cpu_layers, "nccl")
    assert gpu_link.local_endpoint(cpu_layers).device == "cpu"


def test_gpu_frames_roundtrip_and_reject_garbage():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    ca, cb = Channel(a, "a"), Channel(b, "b")
    try:
        gpu_link.send_frame(ca, 1.0, "gpu_nccl", uid=b"x" * 128)
        assert gpu_link.recv_frame(cb, 1.0, "gpu_nccl")["uid"] == b"x" * 128
        gpu_link.send_frame(ca, 1.0, "gpu_pick", transport="ipc")
        with pytest.raises(TransferError, match="expected 'gpu_offer'"):
            gpu_link.recv_frame(cb, 1.0, "gpu_offer")
        ca.send_bytes(b"\x00\x00\x00\x02\xc1\xc1", 1.0)  # not msgpack
        with pytest.raises(TransferError, match="bad frame"):
            gpu_link.recv_frame(cb, 1.0, "gpu_pick")
        body = msgpack.packb({"t": "gpu_pick", "transport": 3})
        ca.send_bytes(len(body).to_bytes(4, "big") + body, 1.0)
        with pytest.raises(TransferError, match="gpu_pick.transport"):
            gpu_link.recv_frame(cb, 1.0, "gpu_pick")
        ca.send_bytes((64 << 20).to_bytes(4, "big"), 1.0)
        with pytest.raises(TransferError, match="control frame"):
            gpu_link.recv_frame(cb, 1.0, "gpu_pick")
    finally:
        ca.close()
        cb.close()


def test_ipc_mappings_are_shared_per_peer_and_released_with_the_last_user():
    export = {"pid": os.getpid(), "storages": [[0, b"handle", 64, 0, b"rc", 0, b"ev", False]],
              "layers": [[0, 0], [0, 32]], "addrs": [4096, 4128], "geometry": [2, 16, 16]}
    peers = IpcPeers()
    key, m1 = peers.acquire(export, torch.device("cpu"))  # own pid: no handle is opened
    _, m2 = peers.acquire(export, torch.device("cpu"))
    assert m1 is m2 and m1.bases == [4096, 4128] and m1.geometry == (2, 16, 16)
    assert key == peer_key(export) and peers.num_mapped() == 1
    peers.release(key)
    assert peers.num_mapped() == 1
    peers.release(key)
    assert peers.num_mapped() == 0
    with pytest.raises(TransferError, match="malformed IPC export"):
        peers.acquire({"pid": 1}, torch.device("cpu"))


def test_nccl_missing_fails_clearly(monkeypatch):
    monkeypatch.setenv(nccl.ENV_LIB, "/nonexistent/libnccl.so.2")
    monkeypatch.setattr(nccl, "_lib", None)
    monkeypatch.setattr(nccl, "_lib_error", None)
    assert nccl.candidates() == ["/nonexistent/libnccl.so.2"]
    with pytest.raises(nccl.NcclError, match="cannot load libnccl.*LLUMIGRATE_NCCL_LIB"):
        nccl.unique_id()
    assert not nccl.available()
    assert issubclass(nccl.NcclError, TransferError)
