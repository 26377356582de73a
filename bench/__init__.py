"""Benchmarks of orch's training path; run them from the repository root as `python -m bench.NAME`."""
