"""The control CLI commands, run in-process against a real server over the
fake backend: output, JSON, exit codes, and errors without tracebacks."""

from __future__ import annotations

import argparse
import importlib
import json
import threading

import pytest
from fake_control_backend import serving, wait_until

from llumigrate.control.cli import EXIT_ERROR, EXIT_FAILED, EXIT_OK
from llumigrate.control.events import DISPATCH, DRAIN, INSTANCE_JOINED

CONTROL_COMMANDS = ("instances", "requests", "migrate", "drain", "undrain", "events", "policy", "health")


@pytest.fixture
def served(loop):
    with serving(loop) as s:
        yield s


def cli(capsys, command: str, *argv: str) -> tuple[int, str, str]:
    """Runs `llumigrate <command> argv...` as cli/main.py would: exit code, stdout, stderr."""
    module = importlib.import_module(f"llumigrate.control.commands.{command}")
    parser = argparse.ArgumentParser(prog=f"llumigrate {command}")
    module.add_arguments(parser)
    code = module.run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_instances_table_json_and_one(served, capsys):
    code, out, _ = cli(capsys, "instances", "--address", served.address)
    lines = out.splitlines()
    assert code == EXIT_OK and lines[0].split()[:4] == ["ID", "ADDRESS", "UP", "DRAINING"]
    assert [line.split()[0] for line in lines[1:]] == ["i0", "i1", "i2"]
    code, out, _ = cli(capsys, "instances", "--address", served.address, "--json")
    assert [i["free_blocks"] for i in json.loads(out)] == [80, 70, 60]
    code, out, _ = cli(capsys, "instances", "i2", "--address", served.address, "--json")
    assert [i["id"] for i in json.loads(out)] == ["i2"]


def test_requests(served, capsys):
    code, out, _ = cli(capsys, "requests", "--address", served.address, "--instance", "i0", "--all")
    assert code == EXIT_OK and [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["r0", "i0", "running"], ["r2", "i0", "finished"]]


def test_migrate_done_aborted_and_refused(served, capsys):
    code, out, _ = cli(capsys, "migrate", "r0", "--to", "i1", "--address", served.address)
    assert code == EXIT_OK and out.startswith("r0: i0 -> i1 done") and "downtime 4.0 ms" in out
    served.backend.abort_next = True
    code, out, _ = cli(capsys, "migrate", "r1", "--address", served.address, "--json")
    assert code == EXIT_FAILED and json.loads(out)["reason"] == "destination full"
    code, out, err = cli(capsys, "migrate", "r0", "--to", "i1", "--address", served.address)
    assert code == EXIT_ERROR and out == ""
    assert err == "llumigrate: FAILED_PRECONDITION: destination is the request's current instance\n"


def test_not_found_is_one_line_and_exit_2(served, capsys):
    code, _, err = cli(capsys, "migrate", "nope", "--address", served.address)
    assert code == EXIT_ERROR and err == "llumigrate: NOT_FOUND: no request 'nope'\n"
    code, _, err = cli(capsys, "drain", "nope", "--address", served.address)
    assert code == EXIT_ERROR and "NOT_FOUND: no instance 'nope'" in err and "Traceback" not in err


def test_drain_and_undrain(served, capsys):
    assert cli(capsys, "drain", "i2", "--address", served.address)[:2] == (EXIT_OK, "i2: draining\n")
    assert served.backend.instances["i2"].draining
    code, out, _ = cli(capsys, "undrain", "i2", "--address", served.address, "--json")
    assert code == EXIT_OK and json.loads(out)["draining"] is False


def test_policy_show_set_and_bad(served, capsys):
    code, out, _ = cli(capsys, "policy", "--address", served.address)
    assert code == EXIT_OK and out.startswith("dispatch:   balanced") and "migrate_out_freeness = 0.1" in out
    code, out, _ = cli(capsys, "policy", "--address", served.address, "--json", "--set", "dispatch=round_robin",
                       "--set", "migration=", "--set", "migrate_in_freeness=0.3")
    p = json.loads(out)
    assert code == EXIT_OK and (p["dispatch"], p["migration"], p["thresholds"]["migrate_in_freeness"]) == (
        "round_robin", [], 0.3)
    for bad, message in (("nope", "KEY=VALUE"), ("migrate_in_freeness=high", "needs a number"),
                         ("dispatch=nope", "INVALID_ARGUMENT: unknown dispatch policy")):
        code, _, err = cli(capsys, "policy", "--address", served.address, "--set", bad)
        assert code == EXIT_ERROR and message in err


def test_events_count(served, capsys):
    bus = served.backend.bus

    def publish() -> None:
        wait_until(lambda: bus.num_subscribers == 1)
        bus.emit(DISPATCH, "r7", "i1", priority=2)
        bus.emit(DRAIN, instance_id="i2")

    threading.Thread(target=publish, daemon=True).start()
    code, out, _ = cli(capsys, "events", "--count", "2", "--address", served.address)
    lines = out.splitlines()
    assert code == EXIT_OK and len(lines) == 2
    assert lines[0].split()[1:] == ["#1", "dispatch", "r7", "i1", "priority=2"]
    assert lines[1].split()[1:] == ["#2", "drain", "-", "i2"]


def test_events_of_one_kind_membership(served, capsys):
    bus = served.backend.bus

    def publish() -> None:
        wait_until(lambda: bus.num_subscribers == 1)
        bus.emit(DRAIN, instance_id="i2")
        bus.emit(INSTANCE_JOINED, instance_id="i3", address="10.0.0.7:7000")

    threading.Thread(target=publish, daemon=True).start()
    code, out, _ = cli(capsys, "events", "--kind", INSTANCE_JOINED, "--count", "1", "--address", served.address)
    assert code == EXIT_OK and out.split()[1:] == ["#2", "instance_joined", "-", "i3", "address=10.0.0.7:7000"]


def test_health_and_token_from_env(loop, capsys, monkeypatch):
    with serving(loop, address="0.0.0.0:0", token="s3cret") as served:
        code, _, err = cli(capsys, "health", "--address", served.address)
        assert code == EXIT_ERROR and "UNAUTHENTICATED" in err
        monkeypatch.setenv("LLUMIGRATE_TOKEN", "s3cret")
        code, out, _ = cli(capsys, "health", "--address", served.address)
        assert code == EXIT_OK and out.startswith("serving: 3/3 instances up")


def test_no_server_is_exit_2(capsys):
    code, _, err = cli(capsys, "instances", "--address", "127.0.0.1:1", "--timeout", "2")
    assert code == EXIT_ERROR and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err)


def test_registered_in_the_llumigrate_command(served, capsys, monkeypatch):
    from llumigrate.cli import main
    for name in CONTROL_COMMANDS:
        monkeypatch.setitem(main.COMMANDS, name, f"llumigrate.control.commands.{name}")
    assert main.main(["requests", "--address", served.address, "--json"]) == EXIT_OK
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["r0", "r1"]
    with pytest.raises(SystemExit):
        main.main(["migrate", "--help"])
    assert "--to INSTANCE" in capsys.readouterr().out
