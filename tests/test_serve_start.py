"""`llumigrate serve` when an instance does not start: the operator reads why
(vLLM's own refusal), not a traceback of ours that cuts it off."""

from __future__ import annotations

import socket
import subprocess
import sys

from llumigrate.controller.startlog import MAX_CAUSE_CHARS, start_failure_cause

# The end of a real agent log: vLLM's engine process logs the root cause, then
# the agent's traceback ends in a wrapper that points "above".
ENGINE_REFUSED = "\n".join([
    "2026-11-24 09:22:50,201 INFO [agent 11917] vllm.triton_utils.importing: Triton is installed "
    "but 0 active driver(s) found (expected 1). Disabling Triton to prevent runtime errors.",
    '(EngineCore pid=11927) ERROR 11-24 09:23:04 [core.py:1510]   File "/x/kv_cache_utils.py", '
    "line 1030, in _check_enough_kv_cache_memory",
    "(EngineCore pid=11927) ERROR 11-24 09:23:04 [core.py:1510]     raise ValueError(",
    "(EngineCore pid=11927) ERROR 11-24 09:23:04 [core.py:1510] ValueError: To serve at least "
    "one request with the model's max seq len (1312), more KV cache is needed",
    "(EngineCore pid=11927) ERROR 11-24 09:23:06 [multiproc_executor.py:315] Worker proc "
    "VllmWorker-0 died unexpectedly (exit code: None), shutting down executor.",
    "Process EngineCore:",
    "Traceback (most recent call last):",
    '  File "/x/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup',
    "    raise RuntimeError(",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: "
    "There appear to be 1 leaked shared_memory objects to clean up at shutdown",
    "  warnings.warn('resource_tracker: There appear to be %d '",
    ""])

USAGE = """\
usage: llumigrate-engine [-h] [--model MODEL]
llumigrate-engine: error: unrecognized arguments: --no-such-flag
"""

# A worker process's name has a hyphen.
WORKER_REFUSED = """\
(VllmWorker-0 pid=15176) ERROR 11-24 09:41:22 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=15176) ERROR 11-24 09:41:22 [multiproc_executor.py:953] ValueError: Available memory is less
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""

CRASH = """\
Traceback (most recent call last):
  File "/x/llumigrate/agent/__main__.py", line 54, in _main
    runtime = EngineRuntime(engine_args)
torch.OutOfMemoryError: cannot allocate 2.0 GiB
"""


def test_the_cause_is_the_root_exception_not_vllms_wrapper():
    assert start_failure_cause(ENGINE_REFUSED) == (
        "ValueError: To serve at least one request with the model's max seq len (1312), "
        "more KV cache is needed")
    assert start_failure_cause(WORKER_REFUSED) == "ValueError: Available memory is less"


# vLLM's configs are pydantic dataclasses: the reason is on the next line.
CONFIG_REFUSED = """\
  File "/x/pydantic/_internal/_dataclasses.py", line 121, in __init__
    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (999999) is greater than the derived max_model_len
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""

# The cause, then what the agent raised winding down, then another wrapper.
CAUSE_THEN_NOISE = """\
(EngineCore pid=9) ERROR 11-24 09:23:04 [core.py:1510] RuntimeError: NCCL initialization failed: no device
Traceback (most recent call last):
asyncio.exceptions.CancelledError
vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.
"""


def test_the_cause_carries_its_reason_and_outlives_the_noise_after_it():
    assert start_failure_cause(CONFIG_REFUSED) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig "
        "Value error, User-specified max_model_len (999999) is greater than the derived max_model_len")
    assert start_failure_cause(CAUSE_THEN_NOISE) == "RuntimeError: NCCL initialization failed: no device"


def test_the_cause_of_a_usage_error_and_of_a_plain_crash():
    assert start_failure_cause(USAGE) == "llumigrate-engine: error: unrecognized arguments: --no-such-flag"
    assert start_failure_cause(CRASH) == "torch.OutOfMemoryError: cannot allocate 2.0 GiB"


def test_the_cause_without_an_exception_is_the_last_line_and_is_bounded():
    assert start_failure_cause("starting\nKilled\n\n") == "Killed"
    assert start_failure_cause("") == "(empty log)"
    assert start_failure_cause("RuntimeError: Engine core initialization failed.") == \
        "RuntimeError: Engine core initialization failed."   # only a wrapper: still said
    long = start_failure_cause("ValueError: " + "x" * 5000)
    assert len(long) <= MAX_CAUSE_CHARS + 4 and long.endswith(" ...")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_an_engine_argument_vllm_refuses_says_so_and_exits_1(tmp_path):
    """A real `llumigrate serve`: an argument `vllm serve` does not know is
    refused at once by vLLM's own parser (exit status 2, nothing started);
    one it knows but its engine refuses stops serve with exit status 1,
    vLLM's refusal on stderr and the agent's log named (in `--run-dir`), no
    Python traceback; the addresses it had bound are free again."""
    http, control = _free_port(), _free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "llumigrate", "serve", "--num-instances", "1", "--port", str(http),
         "--control-address", f"127.0.0.1:{control}", "--run-dir", str(tmp_path), "--no-such-engine-flag"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unrecognized arguments: --no-such-engine-flag" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "i0.log").exists()
    for n in range(2):   # the same run dir twice: the log keeps both runs, the error is this run's
        again = subprocess.run(
            [sys.executable, "-m", "llumigrate", "serve", "--num-instances", "1", "--port", str(http),
             "--control-address", f"127.0.0.1:{control}", "--run-dir", str(tmp_path),
             "--max-model-len", str(999990 + n)],
            capture_output=True, text=True, timeout=300)
        assert again.returncode == 1, again.stdout + again.stderr
        assert f"max_model_len ({999990 + n})" in again.stderr and f"({999990 + 1 - n})" not in again.stderr
        assert "instance i0 did not start (exit status 1)" in again.stderr
        assert "Traceback" not in again.stdout + again.stderr
        assert f"their logs: {tmp_path}" in again.stdout      # said before the engines start
        assert again.stderr.split("its log: ", 1)[1].split()[0] == str(tmp_path / "i0.log")
    for port in (http, control):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
