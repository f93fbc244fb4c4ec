"""Migration stress harness: mixed load, continuous migrations, seeded fault
injection at every protocol step, failover, and invariants checked at the end.

`config` (what to run), `workload` (seeded request mix), `faults` (seeded
fault schedule and the coordinator hook that injects it), `procs` (process
helpers: kill an engine, find orphans), `invariants` (pure checks over what
was recorded), `runner` (the async driver), `report` (JSON, PNG, one line),
`progress` (live status line). CLI: `llumigrate stress`.
"""
