"""Why a local agent did not start, from its log: the one line an operator
needs (vLLM's own reason), not the traceback that buries it."""

from __future__ import annotations

import re

# What vLLM's processes put before each line they log:
# "(EngineCore pid=7) ERROR 11-24 09:23:04 [core.py:1510] ".
_PREFIX = re.compile(r"^\([\w.-]+ pid=\d+\) [A-Z]+ [^\]]*\] ")
# The last line of a traceback: "ValueError: ...", "torch.OutOfMemoryError: ...".
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s.*)?$")
# argparse's complaint: "llumigrate-engine: error: unrecognized arguments: ...".
_USAGE = re.compile(r"^[\w.-]+: error: .+$")
# Exceptions that only point at an earlier one ("See root cause above", "See
# stack trace (above) for the root cause").
_WRAPPER = re.compile(r"root cause|stack trace \(?above", re.IGNORECASE)
# Exceptions raised while a failed process winds down, after its cause.
_WIND_DOWN = ("CancelledError", "KeyboardInterrupt", "SystemExit")
# Indented lines after an exception that carry its reason (pydantic's
# ValidationError, which vLLM's configs raise, says why on the next line).
MAX_DETAIL_LINES = 2
MAX_CAUSE_CHARS = 1000


def start_failure_cause(log_text: str) -> str:
    """The line of a failed agent's log that says why it did not start: the
    last exception raised, with the reason on its indented next lines
    (vLLM's wrappers that point at an earlier exception, and what the
    process raised winding down, skipped), or argparse's usage error; else
    the log's last line."""
    lines = [_PREFIX.sub("", ln.rstrip()) for ln in log_text.splitlines()]
    found: list[str] = []
    for i, line in enumerate(lines):
        if _USAGE.match(line):
            found.append(line)
            continue
        m = _EXCEPTION.match(line)
        if m is None or m.group(1).rsplit(".", 1)[-1] in _WIND_DOWN:
            continue
        detail = []
        for nxt in lines[i + 1:i + 1 + MAX_DETAIL_LINES]:
            text = nxt.strip()
            if not nxt.startswith(" ") or not text or text.startswith(("File ", "For further information")):
                break
            detail.append(text)
        found.append(" ".join([line, *detail]))
    causes = [c for c in found if not _WRAPPER.search(c)] or found
    if not causes:
        causes = [ln.strip() for ln in lines if ln.strip()][-1:] or ["(empty log)"]
    cause = causes[-1]
    return cause if len(cause) <= MAX_CAUSE_CHARS else cause[:MAX_CAUSE_CHARS] + " ..."
