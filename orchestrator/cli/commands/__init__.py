"""Groups of `orch` sub-commands, each a typer app that the main CLI mounts. Heavy imports stay inside commands."""
