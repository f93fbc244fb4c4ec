"""Migration stress harness: mixed load, continuous migrations, seeded fault
injection at every protocol step, failover, and invariants checked at the end.

`config` (what to run), `workload` (seeded request mix), `faults` (seeded
fault schedule and the coordinator hook that injects it), `actions` (what
each fault does to a live cluster; replacement instances), `migrator`
(random, chained and policy-driven migrations), `collect` (quiescence, free
blocks, reference outputs, host leftovers), `invariants` (pure checks over
what was recorded; /proc helpers are `llumigrate.procfs`), `runner` (the async driver),
`report` (JSON, PNG, one line), `progress` (live status line). CLI:
`llumigrate stress`.
"""
