"""vLLM's own OpenAI server in a subprocess: the reference the serve tests
compare `llumigrate serve` with (same model, same arguments)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "tiny"   # the served model name of both servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` in a subprocess, one
    unpinned OpenMP thread (as llumigrate runs each engine on 2 cores);
    `__init__` returns at once, `wait_ready` blocks until it serves."""

    def __init__(self, model: str, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._ready = False

    def wait_ready(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                self._ready = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            if not self._ready:
                time.sleep(0.5)
        if not self._ready:
            raise RuntimeError(f"vLLM's server did not start in {timeout} s:\n{self.log_tail()}")
        return self.url

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()
