"""The package layout holds: the import contract in pyproject.toml (checked by `lint-imports` in tests/run.sh) says
which way imports run; these tests check what a contract cannot: no circle of imports, and a CLI that starts
without the training stack."""

import os
import re
import subprocess
import sys
from pathlib import Path

import grimp

from tests.conftest import ROOT

PACKAGES = ("orchestrator", "jobs", "bench")
HEAVY = ("torch", "transformers", "accelerate", "mlflow", "lion_pytorch", "numpy", "lm_eval")


def import_cycles() -> list[list[str]]:
    """Every strongly connected group of more than one module in the import graph (Tarjan's algorithm)."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in sorted(graph.modules)}
    edges = {m: [n for n in targets if n.split(".")[0] in PACKAGES] for m, targets in edges.items()}
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges.get(module, []):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in edges:
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_another_that_imports_it_back():
    assert import_cycles() == []


def test_the_cli_answers_without_importing_the_training_stack():
    code = (
        "import sys, orchestrator.cli.app, orchestrator.cli.submit, orchestrator.cli.follow, orchestrator.cli.show, "
        "orchestrator.cli.logs, orchestrator.cli.commands.bench, orchestrator.core.rundir, jobs.entry;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_orch_help_builds_no_schema():
    """`orch --help` answers at once: the commands import the schemas (pydantic models) when they run, not before."""
    schemas = ("pydantic", "orchestrator.core.config")
    code = f"import sys, orchestrator.cli.app; print([m for m in {schemas!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_orch_status_reads_no_profile_schema_or_yaml(tmp_path: Path):
    """`orch status` shows run files: the profile and recipe schemas and the YAML loader are for the commands that
    read a profile or a recipe."""
    unneeded = ("orchestrator.core.config", "orchestrator.core.yamlio", "yaml")
    code = (
        "import sys; from orchestrator.cli.app import main; sys.argv = ['orch', 'status']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {unneeded!r} if m in sys.modules])"
    )
    env = {**os.environ, "ORCH_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def command_callbacks(app) -> list:
    """Every function that typer turns into a command of `app` or of its sub-apps."""
    found = [info.callback for info in app.registered_commands]
    for group in app.registered_groups:
        found += command_callbacks(group.typer_instance)
    return found


def test_the_commands_signatures_hold_types_not_strings():
    """typer reads every command's signature on each start; string annotations (`from __future__ import
    annotations`) would be parsed and evaluated each time, which was a fifth of `orch --help`."""
    from orchestrator.cli.app import app

    callbacks = command_callbacks(app)
    quoted = {f.__qualname__: n for f in callbacks for n, a in f.__annotations__.items() if isinstance(a, str)}
    assert len(callbacks) > 20 and quoted == {}


SLURM_COMMAND = re.compile(r"""["'](squeue|scontrol|scancel|sbatch|sinfo|srun)["']""")  # a command run, not named
EXECUTOR_BUILT = re.compile(r"\b(Local|Slurm|Auto|Debug)Executor\(")


def test_only_the_scheduler_modules_run_slurm_commands_and_build_submitits_executors():
    """What a contract cannot say (lint-imports says that only they queue jobs through submitit): every other
    module asks the scheduler protocol (orchestrator/core/schedulers/)."""
    schedulers = ROOT / "orchestrator" / "core" / "schedulers"
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.is_relative_to(schedulers)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if SLURM_COMMAND.search(line) or EXECUTOR_BUILT.search(line)
    ]
    assert found == []
