"""KV transfer: KVServer / KVClient over shm and tcp, within one process and
across real processes, with failures (refusals, provider bugs, bad peers,
killed processes) and segment hygiene."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from llumigrate.errors import ConfigError, TransferError, TransferRefused
from llumigrate.transfer import Grant, KVClient, KVServer, PullRequest, shm, wire

LAYERS, BLOCKS, BLOCK_SHAPE = 3, 40, (2, 16, 32)  # 4 KiB per block and layer
BPB = LAYERS * 2 * 16 * 32 * 4                      # bytes per block, all layers
TABLE = {"r1": [7, 3, 39, 0, 12, 12, 25, 8, 1, 30, 31, 32, 2], "r2": list(range(39, 9, -1))}

PEER = r"""
import json, sys, time, torch
from llumigrate.errors import TransferRefused
from llumigrate.transfer import Grant, KVClient, KVServer, PullRequest
cfg = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(cfg["seed"])
layers = list(torch.randn((cfg["layers"], cfg["blocks"], *cfg["shape"]), generator=g).unbind(0))
def provide(req):
    if req.key == "slow":
        print("providing", flush=True)
        time.sleep(60)
    if req.key not in cfg["table"]:
        raise TransferRefused(f"no request {req.key!r}")
    return Grant(cfg["table"][req.key][req.start_block:req.start_block + req.num_blocks], req.key.encode())
if cfg["role"] == "server":
    srv = KVServer(layers, provide, chunk_bytes=cfg["chunk"], max_segment_bytes=cfg["ring"])
    srv.start()
    print(json.dumps(srv.address), flush=True)
else:
    cli = KVClient(layers, transport=cfg["transport"])
    cli.pull(tuple(cfg["address"]), PullRequest(cfg["key"], cfg.get("start", 0), 2), [0, 1])
    print("pulled", flush=True)
sys.stdin.read()
"""


def make_layers(seed: int, layers: int = LAYERS, shape: tuple[int, ...] = BLOCK_SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn((layers, BLOCKS, *shape), generator=g).unbind(0))


def poisoned(layers: int = LAYERS, shape: tuple[int, ...] = BLOCK_SHAPE) -> list[torch.Tensor]:
    return list(torch.full((layers, BLOCKS, *shape), float("nan")).unbind(0))


def provider(table: dict[str, list[int]]):
    def provide(req: PullRequest) -> Grant:
        if req.key == "boom":
            raise RuntimeError("provider bug")
        if req.key == "bad":
            return Grant([BLOCKS + 5] * req.num_blocks)
        if req.key not in table:
            raise TransferRefused(f"no request {req.key!r}")
        ids = table[req.key][req.start_block:req.start_block + req.num_blocks]
        if len(ids) != req.num_blocks:
            raise TransferRefused("range out of bounds")
        return Grant(ids, f"state-{req.key}".encode())
    return provide


def check_pulled(src: list[torch.Tensor], dst: list[torch.Tensor], src_ids: list[int], dst_ids: list[int]) -> None:
    """dst blocks dst_ids hold src blocks src_ids bit for bit; others still NaN."""
    for s, d in zip(src, dst):
        assert torch.equal(d[dst_ids].view(torch.int32), s[src_ids].view(torch.int32))
        rest = sorted(set(range(BLOCKS)) - set(dst_ids))
        assert torch.isnan(d[rest]).all()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def spawn_peer(wait: bool = True, **cfg) -> tuple[subprocess.Popen, str]:
    cfg = {"seed": 1, "layers": LAYERS, "blocks": BLOCKS, "shape": BLOCK_SHAPE, "table": TABLE,
           "chunk": 5 * BPB, "ring": 12 * BPB, **cfg}
    proc = subprocess.Popen([sys.executable, "-c", PEER, json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip() if wait else ""
    assert line or not wait, f"peer exited with {proc.wait()}"
    return proc, line


def wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def server():
    src = make_layers(0)
    done: list[tuple[str, bool]] = []
    srv = KVServer(src, provider(TABLE), on_complete=lambda r, ok: done.append((r.key, ok)),
                   chunk_bytes=4 * BPB, max_segment_bytes=10 * BPB, io_timeout_s=2.0)
    srv.start()
    srv.src, srv.done = src, done
    yield srv
    srv.close()
    assert shm.list_segments(os.getpid()) == []


@pytest.fixture(scope="module")
def peer_server():
    proc, line = spawn_peer(role="server")
    yield proc, tuple(json.loads(line))
    proc.stdin.close()
    proc.wait(10)
    assert shm.list_segments(proc.pid) == []


@pytest.mark.parametrize("transport", ["pvm", "shm", "tcp"])
def test_consecutive_pulls_bit_exact(server, transport):
    dst, want = poisoned(), poisoned()
    cli = KVClient(dst, transport=transport)
    # 2 blocks, then 13 (segment grows, 4 chunks in a 2-slot ring), then 30 (ring wraps many times).
    segments = []
    for key, start, n, dest in [("r1", 3, 2, [5, 6]), ("r1", 0, 13, list(range(20, 33))),
                                ("r2", 0, 30, list(range(39, 9, -1)))]:
        payload = cli.pull(server.address, PullRequest(key, start, n), dest)
        assert payload == f"state-{key}".encode()
        for w, src in zip(want, server.src):
            w[dest] = src[TABLE[key][start:start + n]]
        assert all(same_bits(d, w) for d, w in zip(dst, want))  # poison elsewhere intact
        assert cli.transport_to(server.address) == transport
        assert server.num_connections() == 1  # one connection reused throughout
        segments.append(shm.list_segments(os.getpid()))
    if transport == "shm":
        assert len(segments[0]) == 1 and segments[0] != segments[1] == segments[2]
    else:
        assert segments == [[], [], []]  # pvm and tcp need none
    # on_complete runs once the server read the ack, after pull() returned.
    assert wait_for(lambda: server.done == [("r1", True), ("r1", True), ("r2", True)])
    cli.close()
    assert wait_for(lambda: shm.list_segments(os.getpid()) == [])


@pytest.mark.parametrize("transport", ["pvm", "shm", "tcp", "auto"])
def test_pull_from_other_process(peer_server, transport):
    _, address = peer_server
    src, dst = make_layers(1), poisoned()
    cli = KVClient(dst, transport=transport)
    dest = [b + 1 for b in range(13)]
    assert cli.pull(address, PullRequest("r1", 0, 13), dest) == b"r1"
    check_pulled(src, dst, TABLE["r1"], dest)
    assert cli.transport_to(address) == ("pvm" if transport == "auto" else transport)
    dst2 = poisoned()
    cli2 = KVClient(dst2, transport=transport)
    cli2.pull(address, PullRequest("r2", 4, 26), list(range(26)))
    check_pulled(src, dst2, TABLE["r2"][4:], list(range(26)))
    with pytest.raises(TransferRefused, match="no request 'zz'"):
        cli.pull(address, PullRequest("zz", 0, 1), [0])
    cli.close()
    cli2.close()


def test_auto_falls_back_when_pvm_is_not_permitted(server, monkeypatch):
    from llumigrate.transfer import connection

    def denied(pid, *args, **kwargs):
        raise RuntimeError(f"process_vm_readv from pid {pid} failed: Operation not permitted")

    monkeypatch.setattr(connection, "read_remote_blocks", denied)  # as under Yama ptrace_scope >= 1
    dst = poisoned()
    cli = KVClient(dst)
    cli.pull(server.address, PullRequest("r1", 0, 13), list(range(13)))
    check_pulled(server.src, dst, TABLE["r1"], list(range(13)))
    assert cli.transport_to(server.address) == "shm"
    with pytest.raises(TransferError, match="pvm transport to .* unusable: pvm: .*Operation not permitted"):
        KVClient(poisoned(), transport="pvm").pull(server.address, PullRequest("r1", 0, 1), [0])
    cli.close()


def test_concurrent_pulls_use_separate_connections(server):
    dst = poisoned()
    cli = KVClient(dst)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(3):
                cli.pull(server.address, PullRequest("r2", 6 * i, 6), list(range(6 * i, 6 * i + 6)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    check_pulled(server.src, dst, TABLE["r2"][:24], list(range(24)))
    cli.close()


def test_refusal_and_provider_errors_keep_serving(server):
    dst = poisoned()
    cli = KVClient(dst, transport="shm")
    with pytest.raises(TransferRefused, match="no request 'nope'"):
        cli.pull(server.address, PullRequest("nope", 0, 1), [0])
    with pytest.raises(TransferError, match="provider failed: RuntimeError: provider bug") as e:
        cli.pull(server.address, PullRequest("boom", 0, 1), [0])
    assert not isinstance(e.value, TransferRefused)
    with pytest.raises(TransferError, match=r"bad grant: block ids \[45\] are not in \[0, 40\)"):
        cli.pull(server.address, PullRequest("bad", 0, 1), [0])
    with pytest.raises(TransferRefused, match="out of bounds"):
        cli.pull(server.address, PullRequest("r1", 10, 5), list(range(5)))
    cli.pull(server.address, PullRequest("r1", 0, 2), [0, 1])  # same connection still serves
    assert server.num_connections() == 1
    assert wait_for(lambda: server.done == [("bad", False), ("r1", True)])  # per grant, not per refusal
    check_pulled(server.src, dst, TABLE["r1"][:2], [0, 1])
    with pytest.raises(ValueError, match="destination blocks"):
        cli.pull(server.address, PullRequest("r1", 0, 2), [0])
    with pytest.raises(ValueError, match=r"in \[0, 40\)"):
        cli.pull(server.address, PullRequest("r1", 0, 1), [40])
    cli.close()


def test_token_and_layout_checks():
    src = make_layers(0)
    srv = KVServer(src, provider(TABLE), host="127.0.0.1", token="s3cret")
    srv.start()
    for token in (None, "wrong"):
        with pytest.raises(TransferRefused, match="bad token"):
            KVClient(poisoned(), token=token).pull(srv.address, PullRequest("r1", 0, 1), [0])
    KVClient(poisoned(), token="s3cret").pull(srv.address, PullRequest("r1", 0, 1), [0])
    with pytest.raises(TransferRefused, match="layout mismatch: num_layers is 3 here, 2 there"):
        KVClient(poisoned(layers=2), token="s3cret").pull(srv.address, PullRequest("r1", 0, 1), [0])
    with pytest.raises(TransferRefused, match="layout mismatch: block_shape"):
        KVClient(poisoned(shape=(2, 16, 16)), token="s3cret").pull(srv.address, PullRequest("r1", 0, 1), [0])
    srv.close()
    with pytest.raises(ConfigError, match="needs a token"):
        KVServer(src, provider(TABLE), host="0.0.0.0")
    open_srv = KVServer(src, provider(TABLE), host="0.0.0.0", token="t")
    open_srv.start()
    KVClient(poisoned(), token="t").pull(("127.0.0.1", open_srv.address[1]), PullRequest("r1", 0, 1), [0])
    open_srv.close()
    with pytest.raises(ConfigError, match="transport must be one of"):
        KVClient(poisoned(), transport="rdma")
    with pytest.raises(ConfigError, match="stride"):
        KVServer(list(torch.empty(BLOCKS, 2, 8).unbind(1)), provider(TABLE))


def test_garbage_peer_does_not_hurt_server(server):
    with socket.create_connection(server.address, timeout=5) as s:
        s.recv(4096)  # the challenge
        s.sendall(b"\x00\x00\x00\x05hello")  # not msgpack of a message
        assert s.recv(4096) == b""  # the server hung up on us
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"\xff\xff\xff\xff")  # absurd frame length
    dst = poisoned()
    KVClient(dst).pull(server.address, PullRequest("r1", 0, 3), [0, 1, 2])
    check_pulled(server.src, dst, TABLE["r1"][:3], [0, 1, 2])
    with pytest.raises(wire.WireError, match="pull.key has type int"):
        wire.decode(wire.Pull(1, "k", 0, 1, False, 1.0).encode()[4:].replace(b"\xa1k", b"\x07"))


def test_silent_server_times_out():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never speaks
    address = listener.getsockname()
    cli = KVClient(poisoned(), io_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        cli.pull(address, PullRequest("r1", 0, 1), [0])
    assert time.monotonic() - t0 < 3
    listener.close()
    with pytest.raises(TransferError, match="cannot connect"):
        cli.pull(address, PullRequest("r1", 0, 1), [0])


@pytest.mark.parametrize("transport", ["pvm", "shm", "tcp"])
def test_server_killed_mid_pull(transport):
    proc, line = spawn_peer(role="server")
    address = tuple(json.loads(line))
    cli = KVClient(poisoned(), transport=transport)
    cli.pull(address, PullRequest("r1", 0, 13), list(range(13)))  # the connection now has a segment
    result: list[BaseException] = []
    thread = threading.Thread(target=lambda: result.append(pytest.raises(
        TransferError, cli.pull, address, PullRequest("slow", 0, 1, timeout_s=30), [0]).value))
    thread.start()
    assert proc.stdout.readline().strip() == "providing"
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    thread.join(10)
    assert result and time.monotonic() - t0 < 5, "client did not notice the dead server"
    assert "closed the connection" in str(result[0]) or "reset" in str(result[0])
    proc.wait(5)
    assert shm.list_segments(proc.pid) == []  # the client removed the dead server's segments
    cli.close()


def test_killed_client_idle_and_mid_pull(server):
    gate, entered = threading.Event(), threading.Event()
    inner = server.provider

    def provide(req: PullRequest) -> Grant:
        if req.start_block == 1:  # blocks until the client is dead
            entered.set()
            gate.wait(20)
        return inner(req)

    server.provider = provide
    peer = {"role": "client", "transport": "shm", "address": server.address, "key": "r1", "seed": 0}
    idle, _ = spawn_peer(**peer)
    assert len(shm.list_segments(os.getpid())) == 1  # the idle client's connection has one
    os.kill(idle.pid, signal.SIGKILL)
    idle.wait(5)
    assert wait_for(lambda: shm.list_segments(os.getpid()) == [] and server.num_connections() == 0)

    busy, _ = spawn_peer(wait=False, start=1, **peer)
    assert entered.wait(20)
    os.kill(busy.pid, signal.SIGKILL)
    busy.wait(5)
    gate.set()
    assert wait_for(lambda: server.done == [("r1", True), ("r1", False)])
    assert wait_for(lambda: shm.list_segments(os.getpid()) == [] and server.num_connections() == 0)


def test_close_with_busy_provider_and_stale_segments(tmp_path):
    gate = threading.Event()

    def slow(req: PullRequest) -> Grant:
        gate.wait(30)
        return Grant([0])

    srv = KVServer(make_layers(0), slow, io_timeout_s=1.0)
    srv.start()
    cli = KVClient(poisoned(), transport="shm")
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(
        TransferError, cli.pull, srv.address, PullRequest("x", 0, 1), [0]).value))
    thread.start()
    assert wait_for(lambda: srv.num_connections() == 1 and shm.list_segments(os.getpid()))
    t0 = time.monotonic()
    srv.close(join_timeout_s=0.5)
    assert time.monotonic() - t0 < 3
    assert shm.list_segments(os.getpid()) == []  # unlinked even though its session is busy
    gate.set()
    thread.join(10)
    assert errors and "closed the connection" in str(errors[0])
    cli.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake = f"{shm.PREFIX}{dead.pid}-{'ab' * 8}"
    open(os.path.join(shm.SHM_DIR, fake), "wb").close()
    mine = shm.Segment.create(10)
    assert fake in shm.list_segments() and shm.list_segments(os.getpid()) == [mine.name]
    assert fake in shm.remove_stale_segments() and mine.name in shm.list_segments()
    mine.close()
    assert shm.list_segments(os.getpid()) == [] and fake not in shm.list_segments()


@pytest.mark.parametrize("transport", ["pvm", "shm", "tcp"])
def test_paced_pull_is_bit_exact_and_accounts_every_byte(server, transport, monkeypatch):
    from llumigrate.transfer import connection, pacing

    spent: list[tuple[float, int]] = []

    class Recording(pacing.Pacer):
        def spent(self, nbytes: int) -> None:
            spent.append((self.bytes_per_s, nbytes))
            super().spent(nbytes)

    monkeypatch.setattr(connection, "Pacer", Recording)
    monkeypatch.setattr(connection, "PACED_PIECE_BYTES", 4 * BPB)
    dst = poisoned()
    cli = KVClient(dst, transport=transport)
    dest = list(range(39, 9, -1))
    rate = float(pacing.MIN_RATE_BYTES_PER_S)
    cli.pull(server.address, PullRequest("r2", 0, 30, max_bytes_per_s=rate), dest)
    check_pulled(server.src, dst, TABLE["r2"], dest)
    assert sum(n for _, n in spent) == 30 * BPB and {r for r, _ in spent} == {rate}
    # pvm reads in pieces of PACED_PIECE_BYTES; shm and tcp pace per chunk (4 blocks here).
    assert [n // BPB for _, n in spent] == [4] * 7 + [2]
    spent.clear()
    cli.pull(server.address, PullRequest("r1", 0, 13), list(range(13)))  # unpaced: pvm in one read
    assert [n // BPB for _, n in spent] == ([13] if transport == "pvm" else [4, 4, 4, 1])
    cli.close()
