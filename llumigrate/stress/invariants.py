"""The invariants of a stress run, as pure checks over recorded facts.

Nothing here touches an engine: the runner records `RequestFacts` and
`InstanceFacts` (and what is left on the host), `check_all` returns every
`Violation`. A run passes only with none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Finish reasons of a request that ran to its end.
NORMAL_ENDS = ("length", "stop")


@dataclass
class RequestFacts:
    request_id: str
    kind: str                       # workload kind: greedy | seeded | random
    max_tokens: int
    streaming: bool
    output: list[int]               # the handle's final output tokens
    streamed: list[int] = field(default_factory=list)   # what a streaming client received
    final_deltas: int = 0           # finished deltas a streaming client received
    finish_count: int = 0           # `on_finished` notifications
    finish_reason: str | None = None
    error: str | None = None
    client_aborted: bool = False    # an abort_client fault hit it
    reference: list[int] | None = None   # output of the same request without migration
    migrations: int = 0
    failovers: int = 0

    @property
    def deterministic(self) -> bool:
        return self.kind in ("greedy", "seeded")


@dataclass
class InstanceFacts:
    instance_id: str
    baseline_free: int
    final_free: int | None          # None: no report after quiescence
    held: list[str] = field(default_factory=list)   # worker-held stopped requests


@dataclass(frozen=True)
class Violation:
    check: str
    subject: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_request(r: RequestFacts, failover: bool) -> list[Violation]:
    """Exactly once, a whole stream, the right end, equal to the reference."""
    out: list[Violation] = []

    def bad(check: str, detail: str) -> None:
        out.append(Violation(check, r.request_id, detail))

    if r.finish_count != 1:
        bad("completed_once", f"finished {r.finish_count} times")
    if r.streaming and r.final_deltas != 1:
        bad("completed_once", f"stream ended {r.final_deltas} times")
    if r.streaming and r.streamed != r.output:
        bad("stream_exact", _diff("streamed", r.streamed, r.output))
    reason = r.finish_reason
    if reason == "abort" and not r.client_aborted:
        bad("finish_reason", "aborted although the client never aborted it")
    elif reason == "error" and (failover or not r.error):
        bad("finish_reason", f"failed: {r.error or 'no error message'}")
    elif reason not in (*NORMAL_ENDS, "abort", "error"):
        bad("finish_reason", f"unexpected finish reason {reason!r}")
    if reason == "length" and len(r.output) != r.max_tokens:
        bad("stream_exact", f"{len(r.output)} tokens for max_tokens={r.max_tokens}")
    if r.deterministic and r.reference is not None:
        if reason in NORMAL_ENDS and r.output != r.reference:
            bad("reference", _diff("output", r.output, r.reference))
        elif reason not in NORMAL_ENDS and r.output != r.reference[: len(r.output)]:
            bad("reference", _diff("partial output", r.output, r.reference))
    elif r.deterministic and reason in NORMAL_ENDS:
        bad("reference", "no reference output was recorded")
    return out


def check_instance(i: InstanceFacts) -> list[Violation]:
    """After quiescence, a surviving instance has exactly its baseline free blocks."""
    if i.final_free is None:
        return [Violation("free_blocks", i.instance_id, "no load report after quiescence")]
    if i.final_free != i.baseline_free:
        return [Violation("free_blocks", i.instance_id,
                          f"{i.final_free} free blocks, baseline {i.baseline_free} (held: {i.held})")]
    return []


def check_all(requests: list[RequestFacts], instances: list[InstanceFacts], *, failover: bool,
              leaked_segments: list[str] = (), orphans: list[int] = (),
              missing_faults: list[str] = (), hung: list[str] = ()) -> list[Violation]:
    out: list[Violation] = []
    for r in requests:
        out += check_request(r, failover)
    for i in instances:
        out += check_instance(i)
    out += [Violation("completed_once", rid, "never finished") for rid in hung]
    out += [Violation("shm_segments", name, "segment left behind") for name in leaked_segments]
    out += [Violation("orphan_processes", str(pid), "still running after shutdown") for pid in orphans]
    out += [Violation("fault_coverage", kind, "never injected") for kind in missing_faults]
    return out


def _diff(what: str, got: list[int], want: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"{what} differs at token {i}: got {got[i:i + 4]}... ({len(got)} tokens), "
            f"want {want[i:i + 4]}... ({len(want)} tokens)")
