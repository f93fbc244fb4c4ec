"""The environment local CPU engines get: thread teams sized to leave the
control plane a core, and the operator's own settings winning."""

from __future__ import annotations

import pytest

from llumigrate.controller.cluster import cpu_threads


@pytest.fixture(autouse=True)
def _no_operator_env(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(("cores", "instances", "threads"),
                         [(2, 1, 1), (2, 2, 1), (2, 4, 1), (4, 1, 3), (16, 2, 7), (16, 3, 5)])
def test_engines_share_all_cores_but_one(cores, instances, threads):
    env = cpu_threads(instances, cores=cores)
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}


def test_operator_settings_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert cpu_threads(2, cores=16)["OMP_NUM_THREADS"] == "6"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3|4-7")
    assert cpu_threads(2, cores=16) == {}
