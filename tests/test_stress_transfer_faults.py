"""The KV client's one-shot injected faults (the stress harness's drop and
stall): the pull fails mid-transfer, the source sees the pull fail and leaks
nothing, and the next pull works again. In one process, no engine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llumigrate.errors import TransferError
from llumigrate.transfer import Grant, KVClient, KVServer, PullRequest, shm
from llumigrate.transfer.connection import InjectedFault

BLOCKS = 16


def make_layers(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn((2, BLOCKS, 2, 8, 16), generator=g).unbind(0))


@pytest.fixture()
def pair():
    src, dst = make_layers(1), make_layers(2)
    done: list[bool] = []
    cond = threading.Condition()

    def complete(req, ok):
        with cond:
            done.append(ok)
            cond.notify_all()
    server = KVServer(src, lambda req: Grant(list(range(req.start_block, req.start_block + req.num_blocks))),
                      on_complete=complete, io_timeout_s=5.0)
    server.start()
    client = KVClient(dst, io_timeout_s=5.0)

    def wait_done(n: int) -> list[bool]:
        with cond:
            assert cond.wait_for(lambda: len(done) >= n, 10)
            return list(done)
    yield server, client, src, dst, wait_done
    client.close()
    server.close()


@pytest.mark.parametrize("fault", [InjectedFault("drop"), InjectedFault("stall", 0.3)])
def test_injected_fault_fails_one_pull_then_pulls_work(pair, fault):
    server, client, src, dst, wait_done = pair
    assert client.arm_fault(fault) is False
    t = time.monotonic()
    with pytest.raises(TransferError, match="injected fault"):
        client.pull(server.address, PullRequest("k", 0, 4, final=True, timeout_s=5.0), [0, 1, 2, 3])
    assert time.monotonic() - t >= fault.seconds
    assert wait_done(1) == [False]           # the source saw the pull fail: a hold is kept
    assert client.faults_fired == 1
    client.pull(server.address, PullRequest("k", 4, 2, final=True), [5, 6])   # one-shot
    assert wait_done(2) == [False, True]
    for a, b in zip(src, dst):
        assert torch.equal(a[4:6], b[5:7])
    assert not [s for s in shm.list_segments() if shm.segment_pid(s) is not None
                and not shm.pid_alive(shm.segment_pid(s))]


def test_arming_reports_a_fault_that_never_fired():
    client = KVClient(make_layers(3))
    assert client.arm_fault(InjectedFault("drop")) is False
    assert client.arm_fault(None) is True          # disarmed before any pull
    assert client.arm_fault(None) is False
    with pytest.raises(ValueError):
        InjectedFault("melt")
    client.close()
