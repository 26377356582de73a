"""The plan of a run as a user checks it before spending node-hours, and where a run's allocated hours went."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.cli.executors import from_frozen_code, job_script
from orchestrator.cli.submit import Request, plan_warnings
from orchestrator.core import deadline, goodput, stragglers
from orchestrator.core.config import Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Plan
from orchestrator.core.preflight import source_uses
from orchestrator.core.rundir import Run, new_run_id
from orchestrator.core.runfiles import DamagedFile
from orchestrator.core.schedule import describe as describe_schedule
from orchestrator.core.settings import UI_PORT, orch_home, run_page, runs_location
from orchestrator.tools.schedule_plot import plot_schedules


def plan_rows(request: Request) -> list[tuple[str, str]]:
    profile, plan = request.profile, request.plan
    extends = f" (extends {request.recipe.extends})" if request.recipe.extends else ""
    rows = [
        ("profile / recipe", f"{request.info['profile']} / {request.info['recipe']}{extends}"),
        *([("overrides", ", ".join(request.info["overrides"]))] if request.info["overrides"] else []),
        ("nodes × ranks per node", f"{plan.nodes} × {profile.launch.tasks_per_node} = {plan.world_size} ranks"),
        ("GPUs", f"{profile.gpus} × {profile.node.gpu_model}" if profile.gpus else "none (CPU)"),
        ("micro batch × grad accumulation", f"{plan.micro_batch} × {plan.grad_accum} per rank"),
        ("train settings", train_settings(plan)),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("steps / total tokens", f"{plan.steps:,} / {plan.total_tokens / 1e9:,.1f} B"),
        ("learning rate", describe_schedule(plan.recipe.schedule, plan.recipe.optimizer.lr, plan.steps)),
        ("model", f"{plan.parameters / 1e9:.3f} B parameters, {plan.flops_per_token / 1e9:.2f} GFLOP per token"),
        ("data", data_row(request)),
        *([("data read", read_row(request))] if request.recipe.data.source != "demo" else []),
    ]
    if plan.tokens_per_s:
        node_hours = profile.gpus * plan.hours / profile.node.gpus
        rows += [
            (
                "estimated throughput",
                f"{plan.tokens_per_s:,.0f} tokens/s ({plan.tokens_per_s / profile.gpus:,.0f} per GPU at "
                f"{plan.mfu:.0%} MFU of {profile.node.peak_bf16_tflops:g} TFLOP/s: {plan.mfu_source})",
            ),
            ("estimated wall time", f"{plan.hours:,.1f} h"),
            (
                "allocations",
                f"{plan.allocations} × {profile.time_limit_min / 60:g} h "
                f"({plan.usable_min_per_allocation / 60:.1f} h of training each)",
            ),
            ("node-hours", f"{node_hours:,.0f} (GPUs × hours / {profile.node.gpus})"),
        ]
    if profile.node.gpu_memory_gb:
        rows.append(("peak memory per GPU", memory_row(plan, profile.node.gpu_memory_gb)))
    rows.append(("warning signal", f"{plan.signal_delay_s} s before the time limit"))
    return rows


def train_settings(plan: Plan) -> str:
    """The settings the job trains with, and why (the recipe's own, or what `auto` picked)."""
    train = plan.recipe.train
    compiled = "compile on" if train.compile else "compile off"
    checkpointing = "on" if train.activation_checkpointing else "off"
    return f"micro batch {plan.micro_batch}, {compiled}, activation checkpointing {checkpointing} ({plan.choice})"


def memory_row(plan: Plan, gpu_memory_gb: float) -> str:
    """The estimate against the GPU's memory, with its terms (docs/performance.md, "Memory model")."""
    terms = {**plan.memory.terms(), "reserve": plan.memory.reserve}
    shown = ", ".join(f"{name} {gb:.1f}" for name, gb in terms.items() if gb)
    return f"{plan.peak_memory_gb:.1f} GB of {gpu_memory_gb:g} GB ({shown})"


def data_row(request: Request) -> str:
    data = request.recipe.data
    if data.sources is not None:
        total = sum(data.weights.values())
        return "mixture: " + ", ".join(f"{n} {s.weight / total:.3g} ({s.path})" for n, s in data.sources.items())
    if data.source != "demo":
        return data.source
    if request.profile.demo_data:
        return "demo (a generated Czech-like corpus, prepared at submission)"
    return "DEMO CORPUS: a real submission on this profile is refused; prepare your data (docs/data.md)"


def read_row(request: Request) -> str:
    """Each prepared source's size and the epochs the run makes over it (a mixture's by its weight)."""
    uses = source_uses(request.recipe, request.plan)
    return "; ".join(f"{use.name}: {use.describe()}" if use.name else use.describe() for use in uses)


def show_warnings(requests: list[Request], console: Console) -> None:
    for warning in plan_warnings(requests):
        console.print(warning, soft_wrap=True, highlight=False, markup=False)


def show_plan(request: Request, console: Console) -> None:
    table = Table(title="Plan (dry run: nothing submitted)", show_header=False)
    for name, value in plan_rows(request):
        table.add_row(name, value)
    console.print(table)
    show_warnings([request], console)
    curve = draw_schedules({request.info["recipe"]: request.recipe}, request.plan.steps, request.info["recipe"])
    console.print(f"learning-rate curve: {curve}", highlight=False, soft_wrap=True)
    profile = request.profile
    run_dir = runs_location(profile) / "RUN_ID"
    script = job_script(from_frozen_code(profile, run_dir / "code"), request.plan, run_dir)
    if script is not None:
        console.print("[bold]sbatch script:[/]")
        console.print(script, markup=False, highlight=False, soft_wrap=True)


def show_sweep(requests: list[Request], console: Console) -> None:
    """A sweep's points, each with its plan in brief, and their learning-rate curves in one PNG."""
    table = Table(title=f"Sweep of {len(requests)} runs (dry run: nothing submitted)")
    for column in ("point", "overrides", "steps / tokens", "wall time", "node-hours", "learning rate"):
        table.add_column(column)
    curves = {}
    for number, request in enumerate(requests, 1):
        plan, profile = request.plan, request.profile
        varying = ", ".join(o for o in request.info["overrides"] if any(o not in r.info["overrides"] for r in requests))
        node_hours = f"{profile.gpus * plan.hours / profile.node.gpus:,.0f}" if plan.tokens_per_s else "-"
        table.add_row(
            str(number),
            varying,
            f"{plan.steps:,} / {plan.total_tokens / 1e9:,.1f} B",
            f"{plan.hours:,.1f} h" if plan.tokens_per_s else "-",
            node_hours,
            describe_schedule(plan.recipe.schedule, plan.recipe.optimizer.lr, plan.steps),
        )
        curves[f"{number}: {varying}"] = request.recipe
    console.print(table)
    show_warnings(requests, console)
    common = [o for o in requests[0].info["overrides"] if all(o in r.info["overrides"] for r in requests)]
    if common:
        console.print(f"every point also: {', '.join(common)}", highlight=False, soft_wrap=True)
    steps = max(r.plan.steps for r in requests)
    curve = draw_schedules(curves, steps, f"sweep-{requests[0].info['recipe']}")
    console.print(f"learning-rate curves: {curve}", highlight=False, soft_wrap=True)


def show_run_schedule(run: Run, console: Console) -> None:
    """The schedule a resumed run trains with, as text and as lr_schedule.png in its run directory."""
    recipe, steps = run.recipe(), run.info.steps
    console.print(f"learning rate: {describe_schedule(recipe.schedule, recipe.optimizer.lr, steps)}", highlight=False)
    curve = plot_schedules({run.id: recipe}, steps, run.dir / "lr_schedule.png")
    console.print(f"learning-rate curve: {curve}", highlight=False, soft_wrap=True)


def draw_schedules(curves: dict[str, Recipe], steps: int, name: str) -> Path:
    """The curves as lr_schedule.png in a new folder of $ORCH_HOME/dry-runs (a dry run writes no run directory)."""
    return plot_schedules(curves, steps, orch_home() / "dry-runs" / new_run_id(name) / "lr_schedule.png")


GOODPUT_PARTS = {  # docs/goodput.md says more
    "startup": "from a start to its first step",
    "counted": "steps whose results survive",
    "uncommitted": "steps since the newest checkpoint",
    "rolled_back": "steps a resume discarded",
    "data_wait": "steps waiting for data",
    "evaluation": "validation",
    "checkpoint_stall": "training waiting for saves",
    "other": "between steps; final save and exit",
    "after_last_commit": "a deadline's final commit to the end",
    "idle": "last sign of life to the next start",
    "not_recorded": "jobs that did not measure the parts",
}


def accounting(run: Run, state: str, suggest: bool) -> dict[str, Any]:
    """The run's `goodput` (and with `suggest`, its `checkpoint_interval`) for `orch status RUN`; a run file that
    cannot be read leaves them out with the reason."""
    try:
        history, result = goodput.of_run(run, state)
        chosen = deadline.read_records(run.dir)[-1:]
    except (OrchError, OSError) as err:
        return {"goodput": None, "goodput_error": str(err)}
    found: dict[str, Any] = {"goodput": result.as_dict(), "deadline": chosen[0].model_dump() if chosen else None}
    if suggest:
        found["checkpoint_interval"] = goodput.suggest(history, result).as_dict()
    return found


def mlflow_page(run: Run) -> str | None:
    """The address of the run's charts in the MLflow UI: on its tracking server, or where `orch ui` serves an
    embedded store by default. None before its MLflow run exists, for another store's (a moved run), and where
    mlflow.json is of an older version that names no experiment (the next sending names it)."""
    try:
        state, uri = run.mlflow, run.tracking_uri
    except DamagedFile:  # its status says which file
        return None
    if state is None or state.experiment_id is None or state.tracking_uri not in (None, uri):
        return None
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
    return f"{server}/{run_page(state.experiment_id, state.run_id)}"


def show_mlflow_page(summary: dict[str, Any], console: Console) -> None:
    page = summary["mlflow_page"]
    local = page is not None and page.startswith(f"http://127.0.0.1:{UI_PORT}/")
    served = " (while `orch ui` serves it)" if local else ""
    console.print(f"MLflow: {page or 'no MLflow run yet'}{served}", soft_wrap=True, highlight=False)


def show_accounting(summary: dict[str, Any], console: Console) -> None:
    """The goodput table under a run's status line, and the suggested checkpoint interval when asked."""
    found = summary.get("goodput")
    if found is None or not found["allocated_h"]:
        why = found is None and summary.get("goodput_error") or "no allocation yet"
        console.print(f"goodput: not available ({why})", markup=False, highlight=False)
        return
    unit = f"{found['device']}-h"
    table = Table(title=f"Goodput: where the allocated {unit} went", title_justify="left")
    for column, justify in ((" ", "left"), (unit, "right"), ("share", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    allocated = found["allocated_h"]
    for part, what in GOODPUT_PARTS.items():
        hours = found["parts_h"][part]
        if hours is None:
            table.add_row(part, "not recorded", "", what)
        elif hours or part in ("counted", "rolled_back"):
            table.add_row(part, device_hours(hours), share(hours, allocated), what)
    spans = f"{found['wall_h']:.2f} h of {summary['allocations']} allocation(s)"
    table.add_row("allocated", device_hours(allocated), "", spans, style="bold")
    console.print(table)
    percent = found["percent"]
    console.print(f"goodput: {'-' if percent is None else f'{percent:.1f} %'} (counted / allocated)", highlight=False)
    if chosen := summary.get("deadline"):
        done = f"; stopped at step {chosen['stopped_step']}" if chosen["stopped_step"] is not None else ""
        console.print(f"deadline: {chosen['lead_s']:.1f} s before the {chosen['source']} ({chosen['why']}){done}",
                      markup=False, highlight=False)  # fmt: skip
    if "checkpoint_interval" in summary:
        console.print(interval_text(summary["checkpoint_interval"]), highlight=False, soft_wrap=True)


def straggler_summary(run: Run, shown: int = 3) -> dict[str, Any]:
    """`stragglers`: the newest job's slowest hosts (at most `shown`) and the run's decisions (docs/stragglers.md);
    None before a job scored its hosts, with the reason where stragglers.json cannot be read."""
    try:
        found = stragglers.read(run.dir)
    except DamagedFile as damage:
        return {"stragglers": None, "stragglers_error": str(damage)}
    if found is None:
        return {"stragglers": None}
    figures = found.model_dump()
    return {"stragglers": {**figures, "scores": figures["scores"][:shown]}}


def show_stragglers(summary: dict[str, Any], console: Console) -> None:
    """The slowest hosts and how much slower, then each decision with its figures."""
    found = summary.get("stragglers")
    if not found or not found["scores"] and not found["decisions"]:
        return
    hosts = ", ".join(
        f"{s['host']} {100 * s['slowdown']:+.0f} % ({s['compute_s']:.3f} s, z {s['z']:.1f}"
        f"{', persistent' if s['persistent'] else ''})"
        for s in found["scores"]
    )
    console.print(
        f"slowest hosts (compute per step over the last {found['window']} steps to step {found['step']}): "
        f"{hosts or '-'}",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    for d in found["decisions"]:
        console.print(
            f"straggler {d['host']} at step {d['step']} (job {d['job_id']}, {100 * d['slowdown']:+.0f} %): "
            f"{d['action']}; keeping it costs {d['keep_loss_s']:.0f} s ({d['excess_s']:.3f} s × {d['steps_ahead']} "
            f"steps), leaving {d['leave_cost_s']:.0f} s (save {d['save_s']:.1f} s + queue wait "
            f"{d['queue_wait_s']:.0f} s + start-up {d['startup_s']:.1f} s)",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def device_hours(hours: float) -> str:
    return f"{hours:,.2f}" if abs(hours) >= 1 else f"{hours:.4f}"


def share(hours: float, allocated: float) -> str:
    return f"{100 * hours / allocated:.1f} %" if allocated else "-"


def interval_text(s: dict[str, Any]) -> str:
    """One paragraph: the Young/Daly interval, what it rests on, and the recipe's against it."""
    if s["save_stall_s"] is None or s["step_s"] is None:
        return (
            "checkpoint interval: no save stall measured yet (a save at the recipe's cadence is measured on the step "
            "after it); run longer, then ask again."
        )
    if s["mtbf_from_prior"]:
        failures = (
            f"no failure or preemption observed in {s['wall_h']:.2f} h of allocations, so a prior: "
            f"one per {goodput.PRIOR_DEVICE_HOURS_PER_INTERRUPTION:,.0f} device-hours (Llama 3's rate), "
            f"MTBF {s['mtbf_h']:,.1f} h"
        )
    else:
        failures = f"{s['interruptions']} failure(s)/preemption(s) in {s['wall_h']:.2f} h: MTBF {s['mtbf_h']:,.2f} h"
    loss = s["expected_loss_recipe"], s["expected_loss_suggested"]
    return (
        f"checkpoint interval (Young/Daly): every {s['interval_steps']:,} steps ({s['interval_s']:,.0f} s), from a "
        f"median save stall of {s['save_stall_s']:.3f} s over {s['saves_measured']} saves, a median step of "
        f"{s['step_s']:.3f} s and {failures}. The recipe saves every {s['recipe_every_steps']:,} steps "
        f"(checkpoint.every_steps): expected loss to saves and failures {100 * loss[0]:.2f} % there, "
        f"{100 * loss[1]:.2f} % at {s['interval_steps']:,}."
    )
