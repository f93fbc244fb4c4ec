"""Dispatch new requests to a drained instance again."""

from __future__ import annotations

from llumigrate.control.cli import instance_command

add_arguments, run = instance_command("undrain")
