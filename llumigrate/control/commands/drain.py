"""Stop dispatching new requests to an instance."""

from __future__ import annotations

from llumigrate.control.cli import instance_command

add_arguments, run = instance_command("drain")
