"""orch on the submitting side: `core` (schemas, planning, the run directory), `cli` (the `orch` command) and
`tools` (data and model tools). The training job is the `jobs` package."""
