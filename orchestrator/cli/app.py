"""The `orch` command line."""

import json
import re
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from orchestrator.cli.commands.analysis import app as analysis_app
from orchestrator.cli.commands.bench import app as bench_app
from orchestrator.cli.commands.data import data_app, tokenizer_app
from orchestrator.cli.commands.doctor import app as doctor_app
from orchestrator.cli.commands.eval import app as eval_app
from orchestrator.cli.commands.model import app as model_app
from orchestrator.core.errors import OrchError, machine_fault

if TYPE_CHECKING:  # `orch --help` imports no run directory
    from orchestrator.core.rundir import Run
    from orchestrator.core.schedulers.base import Job

app = typer.Typer(
    help="orch: pretraining jobs on Slurm clusters, and on this machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(model_app)
app.add_typer(analysis_app)
app.add_typer(bench_app)
app.add_typer(doctor_app)
app.add_typer(eval_app)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
console = Console()
errors = Console(stderr=True)


@app.command()
def submit(
    profile: Annotated[str, typer.Option(help="cluster profile: a name in cluster_profiles/ or a YAML path")] = "local",
    recipe: Annotated[
        Optional[str], typer.Option(help="training recipe: a name in recipes/ or a YAML path [default: the profile's]")
    ] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps to train (the schedule's length is the recipe's)")] = 200,
    account: Annotated[Optional[str], typer.Option(help="Slurm account (project id), e.g. OPEN-29-12")] = None,
    nodes: Annotated[
        Optional[str],
        typer.Option(
            help="number of nodes; a range MIN-MAX (1-4) lets Slurm start the job earlier on fewer; with --dry-run a "
            "list (1,2,4,8) prices each as a what-if"
        ),
    ] = None,
    time: Annotated[
        Optional[str],
        typer.Option(help="time limit per allocation: minutes, HH:MM:SS or D-HH:MM:SS (also MM:SS, D-HH, D-HH:MM)"),
    ] = None,
    time_min: Annotated[
        Optional[str],
        typer.Option(help="the shortest time limit the job accepts to start earlier (sbatch --time-min), as --time"),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="override a field: recipe.FIELD=VALUE, profile.FIELD=VALUE, or FIELD=VALUE for a profile field "
            "(repeatable)",
        ),
    ] = None,
    sweep: Annotated[
        Optional[list[str]],
        typer.Option(help="one run per value: FIELD=V1,V2,... as for --set (repeatable: every combination)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="print the plan and the job script; submit nothing")] = False,
    wait: Annotated[bool, typer.Option(help="follow the job to its end; the exit code tells success")] = False,
    many_allocations: Annotated[
        bool, typer.Option(help="submit even where the plan needs over 20 allocations of the time limit")
    ] = False,
) -> None:
    """Validate, plan, create a run and submit its training job (with --sweep: a run per point)."""
    from jobs import chaos
    from orchestrator.cli.commands.budget import allocation_warnings, show_whatif
    from orchestrator.cli.commands.shapes import parse_nodes, show_shapes
    from orchestrator.cli.submit import build_requests, site_checks, submit_sweep
    from orchestrator.cli.submit import submit as submit_run
    from orchestrator.core.loading import parse_sweep, sweep_points

    chaos.planned()  # the job reads ORCH_CHAOS: a fault it cannot parse is refused here, before anything is queued
    shape = parse_nodes(nodes) if nodes is not None else None
    counts = shape.counts if shape else []
    if len(counts) > 1:
        if not dry_run or sweep:
            raise OrchError(
                f"--nodes {nodes}: a list of node counts is a what-if that submits nothing; add --dry-run (and no "
                "--sweep), then submit the shape you choose with --nodes N."
            )
        asked = collect_overrides(account, None, time, set_, None, time_min)
        show_whatif(profile, recipe, steps, asked, counts, run_states, console)
        return
    low, high = (shape.low, counts[0]) if shape else (None, None)
    overrides = collect_overrides(account, high, time, set_, low, time_min)
    points = sweep_points(overrides, [parse_sweep(text) for text in sweep or []])
    requests = build_requests(profile, recipe, steps, points)  # every point checked before any is submitted
    for warning in allocation_warnings(requests, run_states):
        console.print(warning, soft_wrap=True, highlight=False, markup=False)
    if not sweep and (low is not None or time_min):
        show_shapes(requests[0], console)
    if dry_run:
        from orchestrator.cli.show import show_plan, show_sweep

        if sweep:
            show_sweep(requests, console)
        else:
            show_plan(requests[0], console)
        return
    for note in site_checks(requests, many_allocations):
        console.print(note, soft_wrap=True, highlight=False)
    sweep_id, runs = submit_sweep(requests) if sweep else (None, [submit_run(requests[0])])
    for run in runs:
        console.print(f"Submitted run [bold]{run.id}[/] (job {run.jobs[-1].job_id}), run directory {run.dir}")
    if wait:
        finish_all(runs)
    elif sweep_id:
        console.print(f"Sweep {sweep_id}: {len(runs)} runs. Follow them with: orch status")
    else:
        console.print(f"Follow it with: orch follow {runs[0].id}")


def collect_overrides(
    account: str | None,
    nodes: int | None,
    time: str | None,
    assignments: list[str] | None,
    nodes_min: int | None = None,
    time_min: str | None = None,
):
    """The command line's overrides, in the order they apply: --set (of the profile or the recipe), then the
    profile's --account, --nodes (a range's MAX, then its MIN), --time and --time-min."""
    from orchestrator.core.loading import Override, parse_override

    overrides = [parse_override(text) for text in assignments or []]
    overrides += [Override("profile", "slurm.account", account, "--account")] if account else []
    overrides += [Override("profile", "nodes", nodes, "--nodes")] if nodes is not None else []
    overrides += [Override("profile", "slurm.nodes_min", nodes_min, "--nodes")] if nodes_min is not None else []
    overrides += [Override("profile", "time_limit_min", parse_minutes(time), "--time")] if time else []
    if time_min:
        overrides += [Override("profile", "slurm.time_min_min", parse_minutes(time_min, "--time-min"), "--time-min")]
    return overrides


@app.command()
def resume(
    run_id: Annotated[Optional[str], typer.Argument(help="the run; the newest run when left out")] = None,
    steps: Annotated[Optional[int], typer.Option(help="new training length in optimizer steps")] = None,
    profile: Annotated[Optional[str], typer.Option(help="continue on another profile")] = None,
    account: Annotated[Optional[str], typer.Option(help="Slurm account (project id)")] = None,
    nodes: Annotated[Optional[int], typer.Option(help="number of nodes (the global batch stays the recipe's)")] = None,
    time: Annotated[Optional[str], typer.Option(help="time limit per allocation")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a profile field: FIELD=VALUE")] = None,
    beyond_schedule: Annotated[
        Optional[str],
        typer.Option(
            help="when --steps goes past the end of the run's learning-rate schedule: refuse (the default), extend "
            "(the schedule ends at --steps) or floor (the steps past its end train at alpha × peak); docs/recipes.md"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="cancel a live job first and resume once the scheduler confirms it is gone")
    ] = False,
    wait: Annotated[bool, typer.Option(help="follow the job to its end; the exit code tells success")] = False,
    from_scratch: Annotated[
        bool, typer.Option(help="train from step 0 when no committed checkpoint can be loaded (else the job stops)")
    ] = False,
    update_code: Annotated[
        bool, typer.Option(help="run the checkout's code from now on instead of the code frozen at submission")
    ] = False,
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="a mixture's new weights from the step the run resumes at: NAME=W,... (sources not named keep theirs)"
        ),
    ] = None,
    include_slow_hosts: Annotated[
        bool, typer.Option(help="let the job run on the hosts the run's jobs left for slowness (docs/stragglers.md)")
    ] = False,
) -> None:
    """Continue a run from its newest valid checkpoint, after a timeout, preemption, crash or cancel."""
    from orchestrator.cli.submit import resume as resume_run

    run = get_run_or_latest(run_id)
    overrides = collect_overrides(account, nodes, time, set_)
    job_id = resume_run(
        run, steps, profile, overrides, force, from_scratch, update_code, beyond_schedule, weights, include_slow_hosts
    )
    console.print(f"Resumed run [bold]{run.id}[/] as job {job_id}")
    if beyond_schedule:
        from orchestrator.cli.show import show_run_schedule

        show_run_schedule(run, console)
    if wait:
        finish(run)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="the run to stop")]) -> None:
    """Stop a run's job; its checkpoints stay and `orch resume` continues from them."""
    from orchestrator.cli.submit import cancel as cancel_run
    from orchestrator.core.rundir import get_run

    run = get_run(run_id)
    console.print(f"Cancelled job {cancel_run(run)} of run {run.id}; resume it with: orch resume {run.id}")


@app.command()
def rollback(
    run_id: Annotated[str, typer.Argument(help="the run")],
    to_step: Annotated[int, typer.Option(help="the step of a committed checkpoint: the next job starts there")],
    skip_steps: Annotated[
        str, typer.Option(help="A:B with K <= A < B: the steps from step A to step B (MLflow's A+1..B) skip their data")
    ],
    steps: Annotated[Optional[int], typer.Option(help="new training length in optimizer steps")] = None,
    wait: Annotated[bool, typer.Option(help="follow the job to its end; the exit code tells success")] = False,
) -> None:
    """Go back to the checkpoint at step K, skip the data of steps A..B for good, and resume (docs/rollback.md)."""
    from orchestrator.cli.rollback import rollback as roll_back_run
    from orchestrator.core.rundir import get_run

    run = get_run(run_id)
    for line in roll_back_run(run, to_step, skip_steps, steps):
        console.print(line, highlight=False)
    if wait:
        finish(run)


def get_run_or_latest(run_id: str | None):
    from orchestrator.core.rundir import all_runs, get_run

    if run_id:
        return get_run(run_id)
    runs = all_runs()
    if not runs:
        raise OrchError("There are no runs yet: start one with `orch submit`.")
    return runs[-1]


# Slurm's time formats: (with a day part, number of clock parts) -> the format, its parts and their upper limits.
TIME_FORMATS = {
    (False, 1): ("minutes", ("minutes",), (None,)),
    (False, 2): ("MM:SS", ("minutes", "seconds"), (60, 60)),
    (False, 3): ("HH:MM:SS", ("hours", "minutes", "seconds"), (None, 60, 60)),
    (True, 1): ("D-HH", ("hours",), (24,)),
    (True, 2): ("D-HH:MM", ("hours", "minutes"), (24, 60)),
    (True, 3): ("D-HH:MM:SS", ("hours", "minutes", "seconds"), (24, 60, 60)),
}
TIME_FORMAT = re.compile(r"(?:(?P<days>[0-9]{1,9})-)?(?P<clock>[0-9]{1,9}(?::[0-9]{1,9}){0,2})")  # ASCII digits
TIME_FORMATS_TEXT = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 90, 1:30:00 or 2-00:00:00)"


def parse_minutes(text: str, option: str = "--time") -> float:
    """Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, each part in its range, and at
    least one minute (Slurm would run a limit it reads as 0 without any limit)."""
    from orchestrator.core.config import MAX_TIME_LIMIT_MIN
    from orchestrator.core.yamlio import shown

    match = TIME_FORMAT.fullmatch(text)
    if not match:
        raise OrchError(f"{option} {shown(text)}: expected {TIME_FORMATS_TEXT}.")
    numbers = [int(part) for part in match["clock"].split(":")]
    form, names, limits = TIME_FORMATS[match["days"] is not None, len(numbers)]
    for name, value, limit in zip(names, numbers, limits, strict=True):
        if limit is not None and value >= limit:
            raise OrchError(
                f"{option} {shown(text)}: {name} must be below {limit} in {form} (got {value}); "
                f"write {TIME_FORMATS_TEXT}."
            )
    parts = dict(zip(names, numbers, strict=True))
    days = int(match["days"] or 0)
    total_s = ((days * 24 + parts.get("hours", 0)) * 60 + parts.get("minutes", 0)) * 60 + parts.get("seconds", 0)
    if total_s < 60:
        raise OrchError(
            f"{option} {shown(text)} is {total_s} s: a time limit is at least one minute (in MM:SS, 0:30 is 30 "
            "seconds; for 30 minutes write 30 or 0:30:00)."
        )
    if total_s > MAX_TIME_LIMIT_MIN * 60:
        raise OrchError(f"{option} {shown(text)}: more than a year; write {TIME_FORMATS_TEXT}.")
    return total_s / 60


def finish_all(runs) -> None:
    """Follow each run to its end; exits non-zero unless every one completed."""
    failed = []
    for run in runs:
        try:
            finish(run)
        except OrchError as err:
            if len(runs) == 1:
                raise
            from rich.markup import escape

            errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            failed.append(run.id)
    if failed:
        raise OrchError(f"{len(failed)} of {len(runs)} runs did not complete: {', '.join(failed)}.")


def finish(run) -> None:
    """Follow the run to its end (`--wait`, `orch follow`); Ctrl-C stops the following, never the job."""
    from orchestrator.cli.follow import follow

    try:
        console.print(f"Following run {run.id} to its end; Ctrl-C stops the following, never the job.", highlight=False)
        state = follow(run, console)
    except KeyboardInterrupt:
        console.print(
            f"\nStopped following run {run.id}; its job goes on. Follow it again with `orch follow {run.id}` or "
            f"`orch logs {run.id} -f`; stop it with `orch cancel {run.id}`.",
            highlight=False,
        )
        raise SystemExit(130) from None
    summary = run.summary()
    if state != "completed":
        logs = run.submitit_dir
        raise OrchError(
            f"Run {run.id} {state} at step {summary['step']}: {summary['error'] or 'the job ended early'}. "
            f"Job logs: {logs}"
        )
    console.print(
        f"Run {run.id} completed {summary['step']} steps; last checkpoint at step "
        f"{summary['last_checkpoint_step']}; MLflow run {summary['mlflow_run_id']}."
    )


@app.command()
def status(
    run_id: Annotated[Optional[str], typer.Argument(help="one run; all runs when left out")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    suggest: Annotated[
        bool, typer.Option(help="with RUN: the checkpoint interval that minimises expected lost time (Young/Daly)")
    ] = False,
) -> None:
    """Runs and their state, read from the run directories and the scheduler; with RUN also where its allocated
    hours went (goodput, docs/goodput.md)."""
    from orchestrator.core.eta import clock
    from orchestrator.core.rundir import get_run

    if suggest and not run_id:
        raise OrchError("--suggest needs a run: `orch status RUN --suggest` reads that run's save stalls and failures.")
    run = get_run(run_id) if run_id else None
    summaries = [run.summary()] if run else [summary for _, summary in run_summaries()]
    if run:
        from orchestrator.cli.show import accounting, mlflow_page, straggler_summary

        summaries[0].update(accounting(run, summaries[0]["state"], suggest), mlflow_page=mlflow_page(run))
        summaries[0].update(straggler_summary(run))
    if as_json:
        print(json.dumps(summaries[0] if run_id else summaries, indent=2))
        return
    rows = [
        [
            s["run_id"],
            s["state"],
            f"{s['step']}/{s['steps']}",
            number(s["loss"], ".4f"),
            number(s["tokens_per_s"], ",.0f"),
            clock(s["eta_s"]),
            str(s["last_checkpoint_step"] or "-"),
            str(s["allocations"]),
            number(s["node_hours"], ".2f"),
            s["profile"] or "-",
        ]
        for s in summaries
    ]
    headers = ["run", "state", "step", "loss", "tok/s", "ETA", "checkpoint", "allocations", "node-h", "profile"]
    if any(s["sweep"] for s in summaries):  # runs of a sweep say which
        headers.append("sweep")
        for row, s in zip(rows, summaries, strict=True):
            row.append(s["sweep"] or "-")
    print_columns(headers, rows)
    for s in summaries:
        if run_id and s["error"]:
            console.print(s["error"], style="red", markup=False, highlight=False)  # it quotes logs: [/path:42]
    if run:
        from orchestrator.cli.show import show_accounting, show_mlflow_page, show_stragglers

        show_mlflow_page(summaries[0], console)
        show_accounting(summaries[0], console)
        show_stragglers(summaries[0], console)


def run_summaries() -> list[tuple["Run", dict]]:
    """Every run with what `orch status` shows of it, oldest first, with one scheduler query for all live-looking jobs.
    A finished run whose files are unchanged is taken from the cache (orchestrator.core.status_cache), where the
    scheduler still answers for its newest job as it did; a damaged run is summarised as damaged and the others as
    usual (`orch status`, `orch ls`, `orch budget`)."""
    from orchestrator.core.rundir import Run, listed_run, run_folders
    from orchestrator.core.schedulers.base import Job
    from orchestrator.core.settings import runs_root
    from orchestrator.core.status_cache import StatusCache, inputs_key

    cache = StatusCache(runs_root())
    keys = {folder: inputs_key(folder) for folder in run_folders()}  # before any is read: a change makes a new key
    cached = {folder: entry for folder, key in keys.items() if (entry := cache.lookup(folder.name, key))}
    asked = {f: Job(**entry["job"], folder=Run(f).submitit_dir) for f, entry in cached.items() if entry["job"]}
    listed = [entry for folder in keys if folder not in cached and (entry := listed_run(folder)) is not None]
    read, last_jobs = read_jobs(listed)
    alive, unanswered = ask_alive([*last_jobs.values(), *asked.values()])
    changed = [f for f, job in asked.items() if job.executor in unanswered or alive[job] != cached[f]["alive"]]
    relisted = [(Run(folder), listed_run(folder)[1]) for folder in changed]  # its state may have changed: read it
    read_again, jobs_again = read_jobs(relisted)
    read, last_jobs, listed = read | read_again, last_jobs | jobs_again, listed + relisted
    for folder in changed:
        del cached[folder]
    found = []
    for run, info in listed:
        job = last_jobs.get(run.id)
        summary = summarise(run, info, read.get(run.id), job, alive, unanswered)
        created = info.created if info else 0.0
        cache.keep(run.id, keys[run.dir], summary, created, job, None if job is None else alive.get(job))
        found.append((created, run, summary))
    cache.save()
    found += [(entry["created"], Run(folder), entry["summary"]) for folder, entry in cached.items()]
    return [(run, summary) for _, run, summary in sorted(found, key=lambda item: item[0])]


def read_jobs(listed) -> tuple[dict, dict]:
    """jobs.json and progress.json of each run (a damaged one is left out: its summary says so), and the newest job
    of each whose state the scheduler decides (those not completed)."""
    from orchestrator.core.runfiles import DamagedFile

    read, last_jobs = {}, {}
    for run, _ in listed:
        try:
            read[run.id] = jobs, progress = run.jobs, run.progress
        except DamagedFile:
            continue
        if jobs and not (progress and progress.state == "completed"):
            last_jobs[run.id] = run.job(jobs[-1])
    return read, last_jobs


def ask_alive(jobs: list["Job"]) -> tuple[dict["Job", bool], dict[str, str]]:
    """Whether each job is alive, one query per scheduler; a scheduler that does not answer leaves its jobs out, with
    its error, and the others' as usual."""
    from orchestrator.core.schedulers import alive_jobs

    alive, unanswered = {}, {}
    for executor in {job.executor for job in jobs}:
        try:
            alive |= alive_jobs([job for job in jobs if job.executor == executor])
        except OrchError as err:
            unanswered[executor] = str(err)
    return alive, unanswered


def summarise(
    run: "Run", info, read, job: Optional["Job"], alive: dict["Job", bool], unanswered: dict[str, str]
) -> dict:
    """One run's summary from its files as read and the scheduler's answers."""
    if job is not None and job.executor in unanswered:
        why = f"the scheduler did not answer, so whether job {job.job_id} is alive is unknown: "
        summary = run.summary(True, read, info)  # as if alive: the scheduler is not asked again
        return {**summary, "state": "unknown", "eta_s": None, "error": why + unanswered[job.executor]}
    return run.summary(alive.get(job) if job is not None else None, read, info)  # None: it asks


def run_states():
    """Every run and its state as `orch status` sees it (one scheduler query for all)."""
    return [(run, summary["state"]) for run, summary in run_summaries()]


@app.command()
def budget(
    account: Annotated[
        Optional[str], typer.Option(help="one account (project id); every account orch's runs used when left out")
    ] = None,
    allocation: Annotated[
        Optional[float],
        typer.Option(help="the account's node-hours [default: slurm.allocation_node_hours of its runs' profile]"),
    ] = None,
    since: Annotated[
        Optional[str], typer.Option(help="count from this date, YYYY-MM-DD [default: the account's first run]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Node-hours per account: spent by orch's runs, in flight, still planned, Slurm's own total where its accounting
    answers, against the allocation; the burn rate and when it runs out (docs/goodput.md)."""
    from orchestrator.cli.commands.budget import show_budget

    show_budget(run_states, account, allocation, since, as_json, console)


def print_columns(headers: list[str], rows: list[list[str]]) -> None:
    """Aligned plain columns: fast for hundreds of runs (a rich Table takes seconds to lay out 200 rows)."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    console.print(line.format(*headers), style="bold", emoji=False, highlight=False, soft_wrap=True)
    print("\n".join(line.format(*row) for row in rows))


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@app.command("ls")
def list_runs() -> None:
    """Runs, newest last, with their state and step (one scheduler query for all); a damaged run says why."""
    summaries = [summary for _, summary in run_summaries()]
    if not summaries:
        return
    rows = [
        [s["run_id"], s["state"], f"{s['step'] or 0}/{s['steps'] or '-'}", s["profile"] or "-", s["recipe"] or "-"]
        for s in summaries
    ]
    print_columns(["run", "state", "step", "profile", "recipe"], rows)
    for s in summaries:
        if s["state"] == "damaged":
            console.print(f"{s['run_id']}: {s['error']}", highlight=False, markup=False)


@app.command()
def logs(
    run_id: Annotated[str, typer.Argument(help="the run")],
    rank: Annotated[int, typer.Option(help="which rank's log")] = 0,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing as the log grows, until the run ends")
    ] = False,
    lines: Annotated[int, typer.Option(help="lines from the end to start with")] = 50,
) -> None:
    """The newest job's log of one rank (stdout and stderr, interleaved by time of reading); rank 0's has a progress
    line every `log.every_steps` steps and one per validation, checkpoint and stop."""
    from orchestrator.cli.logs import show_logs
    from orchestrator.core.rundir import get_run

    try:
        show_logs(get_run(run_id), rank, follow, lines)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@app.command("follow")
def follow_run(
    run_id: Annotated[Optional[str], typer.Argument(help="the run; the newest run when left out")] = None,
) -> None:
    """The progress display of `submit --wait` on a run, until it ends (the exit code tells whether it completed);
    Ctrl-C stops the following, never the job."""
    finish(get_run_or_latest(run_id))


@app.command()
def sync(
    run_id: Annotated[Optional[str], typer.Argument(help="one run; without it, every run whose profile spools")] = None,
    follow: Annotated[bool, typer.Option(help="keep sending, as the tracking store's single writer")] = False,
    interval: Annotated[float, typer.Option(help="seconds between rounds with --follow")] = 30.0,
) -> None:
    """Send spooled metrics to MLflow (each step once): one run's after a tracking outage, or those of every run whose
    profile has `job_tracking: spool`, whose jobs leave the sending to this command (or `orch ui`)."""
    from orchestrator.core.rundir import get_run
    from orchestrator.tools.sync import follow as follow_runs
    from orchestrator.tools.sync import spooling_runs, sync_run

    if interval <= 0:
        raise OrchError(f"Option --interval is {interval:g}. Allowed: a number of seconds above 0.")
    if follow:
        console.print(f"Sending the metrics of spooling runs every {interval:g} s; Ctrl-C stops.")
        try:
            follow_runs(interval)
        except KeyboardInterrupt:
            raise SystemExit(130) from None
    for run in [get_run(run_id)] if run_id else spooling_runs():
        try:
            sent = sync_run(run)
        except Exception as err:  # noqa: BLE001 - any failure to reach the server is the user's to know
            raise OrchError(f"Tracking server {run.tracking_uri} unreachable: {err}") from None
        if sent is None:
            console.print(f"Run {run.id} has no committed checkpoint yet: no metrics are due in MLflow.")
        else:
            console.print(f"MLflow has the metrics of run {run.id} through step {sent}.")


@app.command()
def repair(
    run_id: Annotated[str, typer.Argument(help="the run")],
    check: Annotated[bool, typer.Option(help="only say what is wrong and what a repair would do")] = False,
) -> None:
    """Check every file of a run directory and repair what other files make possible (see docs/run-directory.md)."""
    from orchestrator.core.rundir import get_run
    from orchestrator.tools.repair import repair as repair_run

    run = get_run(run_id)
    with run.lock():
        findings = repair_run(run, fix=not check)
    print_columns(["file", "state", "detail"], [[f.file, f.state, f.detail] for f in findings])
    if any(f.state == "damaged" for f in findings):
        raise OrchError(f"Run {run.id} still has damaged files (above); they need a hand or a backup.")


env_app = typer.Typer(help="The software environment where a profile's jobs run.", no_args_is_help=True)
app.add_typer(env_app, name="env")


@env_app.command("setup")
def env_setup(
    profile: Annotated[str, typer.Option(help="cluster profile whose env_script builds the environment")],
    account: Annotated[Optional[str], typer.Option(help="Slurm account, when the environment's path uses it")] = None,
) -> None:
    """Build the job environment on a login node (compute nodes have no internet)."""
    import os
    import subprocess

    from orchestrator.core.config import PROJECT_ROOT
    from orchestrator.core.loading import load_profile
    from orchestrator.core.settings import fill_path

    path, resolved = load_profile(profile, [{"slurm": {"account": account}}] if account else [])
    if not resolved.env_script:
        raise OrchError(
            f"{path}: profile '{profile}' has no env_script; jobs use this machine's environment "
            "(set it up with: bash envs/local.sh)."
        )
    env = dict(os.environ)
    if resolved.paths.venv:
        env["ORCH_VENV"] = fill_path(resolved.paths.venv, resolved)
    sys.exit(subprocess.run(["bash", str(PROJECT_ROOT / resolved.env_script)], env=env).returncode)


def main() -> None:
    try:
        app()
    except (OrchError, OSError) as err:  # an OSError only where the machine is at fault: a full disk, a quota
        from rich.markup import escape

        if isinstance(err, OrchError):
            message = str(err)
        elif fault := machine_fault(err):
            message = f"{fault} {AFTER_FAULT}"
        else:
            raise
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 30] + " ... (message shortened)"
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)


MAX_ERROR_CHARS = 4000  # an error stays one readable paragraph, whatever values it quotes
AFTER_FAULT = (
    "Files are replaced whole, so nothing was left half-written: once fixed, run the same command again (a run "
    "resumes with `orch resume RUN`, an interrupted `orch data prepare` continues where it stopped)."
)
