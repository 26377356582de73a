"""Turn a validated profile + recipe into a run directory and a submitit job."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.cli.executors import check_environment, from_frozen_code, make_executor, max_requeues
from orchestrator.core import stragglers
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.config import PROJECT_ROOT, Profile, Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.files import write_atomic
from orchestrator.core.loading import Override, load_profile, load_recipe, merge_all, validate
from orchestrator.core.plan import Plan, check_range
from orchestrator.core.preflight import check_against_slurm, check_allocations, checked_plan, data_warnings
from orchestrator.core.rundir import Run, create_run, new_run_id, remove_run
from orchestrator.core.runfiles import MIXTURE, DamagedFile, MixChange, mix_phases, read_mix_changes
from orchestrator.core.schedule import extended, extension_effect
from orchestrator.core.schedulers import cancel_job, scheduler_of, wait_until_gone
from orchestrator.core.schedulers.base import ForeignJob, Job, Scheduler
from orchestrator.core.settings import fill_path, named_tracking_uri
from orchestrator.core.yamlio import dump_yaml, read_yaml, shown


@dataclass(frozen=True)
class Request:
    """Everything `orch submit` was asked, resolved and checked; nothing written yet."""

    profile: Profile
    recipe: Recipe
    plan: Plan
    info: dict[str, Any]


def build_request(
    profile_name: str, recipe_name: str | None, steps: int, overrides: Sequence[Override | dict[str, Any]] = ()
) -> Request:
    """Load and check everything before anything is written or submitted; no recipe named: the profile's. An
    override is an `Override` of the profile or the recipe, or a mapping laid over the profile."""
    profile_path, profile = load_profile(profile_name, profile_layers(overrides))
    recipe_path, recipe = load_recipe(recipe_name or profile.default_recipe, [o for o in overrides if is_recipe(o)])
    plan = checked_plan(profile, profile_path, recipe, recipe_path, steps)
    check_range(profile, profile_path, plan)
    info = {
        "profile": profile_path.stem,
        "recipe": recipe_path.stem,
        "steps": steps,
        "profile_file": str(profile_path),
        "recipe_file": str(recipe_path),
        "tracking_uri": named_tracking_uri(profile.tracking_uri),  # None: the embedded store beside the run
        "stop_before_end_s": plan.stop_before_end_s,
        "git_commit": git_commit(),
        "overrides": [str(o) for o in overrides if isinstance(o, Override)],
    }
    return Request(profile, plan.recipe, plan, info)  # `auto` train settings decided: the run's recipe.yaml keeps them


def build_requests(
    profile_name: str, recipe_name: str | None, steps: int, points: list[list[Override]]
) -> list[Request]:
    """A request per point of a sweep (`orchestrator.core.loading.sweep_points`), every one checked before any is
    submitted; a refusal names the point."""
    requests = []
    for number, point in enumerate(points, 1):
        swept = ", ".join(str(o) for o in point if o.option == "--sweep")
        try:
            requests.append(build_request(profile_name, recipe_name, steps, point))
        except OrchError as err:
            if not swept:
                raise
            raise OrchError(f"Sweep point {number} of {len(points)} ({swept}): {err}") from None
    return requests


def profile_layers(overrides: Sequence[Override | dict[str, Any]]) -> list[dict[str, Any]]:
    return [o.mapping() if isinstance(o, Override) else o for o in overrides if not is_recipe(o)]


def is_recipe(override: Override | dict[str, Any]) -> bool:
    return isinstance(override, Override) and override.target == "recipe"


def git_commit() -> str | None:
    """The code a run trains with, for its MLflow tags."""
    import subprocess

    out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def site_checks(requests: list[Request], many_allocations: bool = False) -> list[str]:
    """What a real submission needs beyond a plan, asked before any request is submitted: trainable data, a number
    of allocations that is reasonable (`many_allocations`: confirmed), the profile's environment script, run here
    (`check_environment`), and its partition as Slurm reports it (`check_against_slurm`; skipped where no Slurm
    answers: sbatch then says why). Returns the warnings (`plan_warnings`) and notes to show."""
    path = Path(requests[0].info["profile_file"])  # a sweep's points share a profile file, and so its script
    for request in requests:
        check_trainable_data(request)
        check_allocations(request.profile, path, request.plan, many_allocations)
    check_environment(requests[0].profile, path)
    partitions = scheduler_of(requests[0].profile.executor).partitions()
    if partitions is None:
        return plan_warnings(requests)
    notes = [note for r in requests for note in check_against_slurm(r.profile, path, r.plan, partitions)]
    return plan_warnings(requests) + list(dict.fromkeys(notes))  # the points' notes, each once


def plan_warnings(requests: list[Request]) -> list[str]:
    """What the requests' plans allow but is rarely wanted (`data_warnings`), each once for a sweep's points."""
    return list(dict.fromkeys(w for r in requests for w in data_warnings(r.recipe, r.info["recipe_file"], r.plan)))


def check_trainable_data(request: Request) -> None:
    """The demo corpus is for a dry run's plan on profiles whose node-hours cost (`demo_data: false`)."""
    if request.recipe.data.source == "demo" and not request.profile.demo_data:
        raise OrchError(
            f"{request.info['profile_file']}: this profile trains prepared data only (demo_data: false), and the "
            f"recipe {request.info['recipe_file']} names the demo corpus (data.source: demo). Prepare your corpus on "
            "a login or CPU node (`orch data prepare`, docs/data.md), then set data.source and data.tokenizer."
        )


def submit(request: Request, run_id: str | None = None) -> Run:
    """Create the run, attach its data and queue its job; if any of it fails, the new run is removed again."""
    profile = request.profile
    runs_dir = Path(fill_path(profile.paths.runs, profile)) if profile.paths.runs else None
    run_id = run_id or new_run_id(request.info["recipe"])
    run = create_run(run_id, request.info, dump(profile), dump(request.recipe), runs_dir)
    try:
        with run.lock():
            attach_run_data(run, request.recipe)
            run.freeze_code()
            launch(run, profile, request.plan)
    except BaseException:
        remove_run(run)
        raise
    return run


def submit_sweep(requests: list[Request]) -> tuple[str, list[Run]]:
    """One run per point of a sweep (every point checked before this), each a normal run whose run.json names the
    sweep; run ids are the sweep's id and the point's number. A point the scheduler refuses stops the sweep with the
    runs already queued named: they go on."""
    sweep = new_run_id(requests[0].info["recipe"])
    runs: list[Run] = []
    for number, request in enumerate(requests, 1):
        try:
            runs.append(submit(replace(request, info={**request.info, "sweep": sweep}), f"{sweep}-p{number}"))
        except OrchError as err:
            queued = ", ".join(run.id for run in runs) or "none"
            raise OrchError(
                f"Sweep {sweep}: point {number} of {len(requests)} ({', '.join(request.info['overrides'])}) was not "
                f"submitted: {err} Runs of the sweep already queued, which go on (`orch cancel RUN` stops one): "
                f"{queued}."
            ) from None
    return sweep, runs


def attach_run_data(run: Run, recipe: Recipe) -> None:
    """The run's data, set up here before its job is queued (the job never tokenizes), and its fingerprint recorded:
    from now on the run trains on this content only."""
    from jobs.shards import check_fingerprint
    from orchestrator.tools.run_data import attach_data

    attach_data(recipe.data, recipe.model.vocab_size, recipe.train.seed, run.data_dir)
    check_fingerprint(run.data_dir)


def launch(run: Run, profile: Profile, plan: Plan, include_slow_hosts: bool = False) -> str:
    """Queue the run's next job and record it (the caller holds the run's lock), and say which hosts it keeps off
    for slowness."""
    frozen = from_frozen_code(profile, run.code_dir)
    queued, notes = kept_off(run, frozen, scheduler_of(profile.executor), include_slow_hosts)
    job_id = queue(queued, plan, run.submitit_dir, job_function(run), f"run {run.id}")
    run.add_job(job_id, profile.executor)
    for note in notes:
        Console(stderr=True).print(note, soft_wrap=True, highlight=False, markup=False)
    return job_id


def kept_off(
    run: Run, profile: Profile, scheduler: Scheduler, include_slow_hosts: bool = False
) -> tuple[Profile, list[str]]:
    """The profile the run's next job is queued with: off the hosts where its tries crashed or hung (jobs.recovery)
    and, unless `include_slow_hosts`, those its jobs left for slowness (jobs.stragglers: a new job would find them
    as slow), where the scheduler can keep a job off hosts; and a line per host left for slowness, saying what
    became of it."""
    suspects = run.suspect_hosts(profile.recovery.exclude_after)
    try:
        left = stragglers.left_hosts(run.dir)
    except DamagedFile as damage:
        return scheduler.excluding(profile, suspects), [f"{damage} (in {run.dir}): no host is kept off for slowness"]
    queued = scheduler.excluding(profile, sorted({*suspects, *([] if include_slow_hosts else left)}))
    excluded = set(scheduler.excluded(queued))
    notes = []
    for host, decision in sorted(left.items()):
        if include_slow_hosts:
            why = "stays excluded: the profile or crashes there exclude it" if host in excluded else "is included"
            notes.append(f"{stragglers.left_note(decision)}, {why} (--include-slow-hosts)")
        elif host in excluded:
            notes.append(f"excluding {stragglers.left_note(decision)} (`orch resume --include-slow-hosts` "
                         "takes it back)")  # fmt: skip
        elif not scheduler.excludes_hosts:
            notes.append(f"not excluding {stragglers.left_note(decision)}: the {scheduler.name} scheduler cannot "
                         "keep a job off hosts")  # fmt: skip
        else:
            notes.append(f"not excluding {stragglers.left_note(decision)}: without it (and the hosts excluded "
                         f"besides) the partition has too few nodes for the job's {profile.nodes}")  # fmt: skip
    return queued, notes


def queue(
    profile: Profile, plan: Plan | None, folder: Path, job: Callable[[], Any], what: str, requeues: int | None = None
) -> str:
    """Queue `job` with the profile's executor, its submitit files under `folder`; returns the job id. A refusal by
    the scheduler is an OrchError with its message, naming `what` the job was for. `requeues`: how often the job may
    requeue itself at its time limit, where not as the plan needs (`max_requeues`)."""
    try:
        requeues = max_requeues(plan, requeues)
        with scheduler_of(profile.executor).submission(profile, folder / "controller.log", requeues):
            return make_executor(profile, plan, folder, requeues).submit(job).job_id
    except Exception as err:  # noqa: BLE001 - sbatch's or the executor's refusal, whatever its type
        message = " ".join(str(err).split())[:1000] or type(err).__name__
        raise OrchError(f"The {profile.executor} scheduler refused the job of {what}: {message}") from None


CONFIRM_TIMEOUT_S = 300


ENDED_JOB_SETTLE_S = 60  # how long a scheduler may go on listing a job that has reported its end (Slurm: COMPLETING)


def settle_s(run: Run, job_id: str) -> float:
    """How long a resume waits for the run's newest job to leave the scheduler's list: a while where the job has
    reported that it ended (Slurm lists it as COMPLETING while it cleans up after it), else not at all."""
    try:
        progress = run.progress
    except DamagedFile:
        return 0
    ended = progress is not None and progress.job_id == job_id and progress.state in ("completed", "failed")
    return ENDED_JOB_SETTLE_S if ended else 0


def stop_and_confirm(run: Run, job: Job) -> None:
    """Cancel a job of the run and wait until the scheduler no longer lists it."""
    cancel_job(job)
    run.mark_cancelled()
    if not wait_until_gone(job, CONFIRM_TIMEOUT_S):
        raise OrchError(
            f"Job {job.job_id} of run {run.id} is still alive {CONFIRM_TIMEOUT_S} s after cancelling it; "
            "nothing was resubmitted."
        )


def resume(
    run: Run,
    steps: int | None,
    profile_name: str | None,
    overrides: Sequence[Override | dict[str, Any]],
    force: bool,
    from_scratch: bool = False,
    update_code: bool = False,
    beyond_schedule: str | None = None,
    weights: str | None = None,
    include_slow_hosts: bool = False,
) -> str:
    """Submit a new job that continues the run from its newest valid checkpoint; returns the job id. Nothing in the
    run changes unless the job is queued, except its code with `update_code` (the checkout's, asked for), and what a
    submission that stopped before queueing a job left undone (`check_code_and_data`). Steps past
    the end of the run's schedule need `beyond_schedule` (`past_schedule`); `weights` change a mixture's weights
    from the step the job starts at (`mixture_changed`). The job keeps off the hosts the run's jobs left for slowness
    unless `include_slow_hosts` (`kept_off`)."""
    check_resume_input(run, overrides, beyond_schedule)
    with run.lock():
        jobs, info = run.jobs, run.info
        recipe_path = run.dir / "recipe.yaml"
        stored = validate(recipe_path, Recipe, read_yaml(recipe_path))
        steps = steps or info.steps
        start = committed_step(run.checkpoints_dir) or 0
        # Everything is checked before a live job is stopped (--force): a refusal after it would leave the run
        # cancelled, its allocation and queue position lost.
        check_steps(run, steps, start, from_scratch)
        recipe, choice = past_schedule(run, stored, steps, start, beyond_schedule)
        if profile_name:
            profile_path, profile = load_profile(profile_name, profile_layers(overrides))
        else:
            profile_path = run.dir / "profile.yaml"
            profile = validate(profile_path, Profile, merge_all(read_yaml(profile_path), profile_layers(overrides)))
        plan = checked_plan(profile, profile_path, recipe, recipe_path, steps)
        check_range(profile, profile_path, plan)
        if weights is not None:
            mixture_changed(run, recipe, weights, start)
        checked = Request(profile, recipe, plan, {"profile_file": str(profile_path), "recipe_file": str(recipe_path)})
        for note in site_checks([checked], many_allocations=True):  # a resume continues what was confirmed
            Console(stderr=True).print(note, soft_wrap=True, highlight=False)
        check_code_and_data(run, recipe, bool(jobs), update_code)
        if jobs and not wait_until_gone(run.job(jobs[-1]), settle_s(run, jobs[-1].job_id)):
            if not force:
                raise OrchError(
                    f"Run {run.id} already has a live job {jobs[-1].job_id} ({run.state()}): two jobs must never "
                    f"write one run. Wait for it to end, stop it with `orch cancel {run.id}`, or pass --force to "
                    "cancel it and resume once the scheduler confirms it is gone."
                )
            stop_and_confirm(run, run.job(jobs[-1]))
        done = committed_step(run.checkpoints_dir) or 0  # where the next job starts (the stopped job may have saved)
        check_steps(run, steps, done, from_scratch)
        mixture = mixture_changed(run, recipe, weights, done) if weights is not None else None
        changed = info.model_copy(
            update={
                "steps": steps,
                "profile": profile_name or info.profile,
                "stop_before_end_s": plan.stop_before_end_s,
                "from_scratch": from_scratch,
                "beyond_schedule": choice or info.beyond_schedule,
            }
        )
        if update_code or not run.code_dir.is_dir():  # runs submitted before code was frozen get it now
            run.freeze_code()
        with rewritten(run.dir / "run.json", json.dumps(changed.model_dump(), indent=2, sort_keys=True)):
            with rewritten(run.dir / "profile.yaml", dump(profile)):
                with rewritten(recipe_path, dump(recipe)) if recipe != stored else nullcontext():
                    with rewritten(run.dir / MIXTURE, mixture) if mixture else nullcontext():
                        return launch(run, profile, plan, include_slow_hosts)


def check_code_and_data(run: Run, recipe: Recipe, submitted: bool, update_code: bool) -> None:
    """What the job would refuse at its start, refused before it waits in a queue: damaged frozen code (unless the
    checkout's is to replace it) and data whose content changed. A run whose submission stopped before its job was
    queued (`submitted` false) gets its data attached and recorded now, as `orch submit` would have."""
    from jobs.shards import check_fingerprint

    problem = None if update_code else run.code_damage()
    if problem:
        raise OrchError(f"Run {run.id}: {problem}")
    if submitted:
        check_fingerprint(run.data_dir)
    else:
        attach_run_data(run, recipe)


def mixture_changed(run: Run, recipe: Recipe, given: str, at: int) -> str:
    """mixture.json with one more change: `--weights NAME=W,...` from step `at` on, the sources not named keeping the
    weights in force there. Refused (nothing written) for a run of one source or weights that do not parse."""
    recipe_weights = recipe.data.weights
    allowed = (
        f"Allowed: NAME=WEIGHT pairs separated by commas, NAME one of the run's sources ({', '.join(recipe_weights)}), "
        "WEIGHT a number of at least 0, the weights then in force summing to a positive number (docs/data.md)."
    )
    if not recipe_weights:
        raise OrchError(
            f"--weights {shown(given)}: run {run.id} trains on one source (data.source in {run.dir / 'recipe.yaml'}); "
            "weights belong to a mixture of sources (data.sources, docs/data.md)."
        )
    changes = read_mix_changes(run.dir)
    in_force = [weights for step, weights in mix_phases(recipe_weights, changes) if step <= at][-1]
    new = dict(in_force)
    for pair in given.split(","):
        name, _, value = pair.strip().partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if name not in in_force or not 0 <= weight < math.inf:
            raise OrchError(f"--weights {shown(given)}: {shown(pair.strip())} is not NAME=WEIGHT. {allowed}")
        new[name] = weight
    if not sum(new.values()) > 0:
        raise OrchError(f"--weights {shown(given)}: the weights would be {new}, which sum to 0. {allowed}")
    changes.append(MixChange(from_step=at, weights=new, time=time.time()))
    return json.dumps([change.model_dump() for change in changes], indent=2)


BEYOND_SCHEDULE = ("refuse", "extend", "floor")


def check_resume_input(run: Run, overrides: Sequence[Override | dict[str, Any]], beyond_schedule: str | None) -> None:
    """What `orch resume` cannot do, refused before the run is touched."""
    if beyond_schedule not in (None, *BEYOND_SCHEDULE):
        raise OrchError(
            f"--beyond-schedule {shown(beyond_schedule)}: allowed: {', '.join(BEYOND_SCHEDULE)} (docs/recipes.md)."
        )
    fixed = [str(o) for o in overrides if is_recipe(o)]
    if fixed:
        raise OrchError(
            f"--set {', '.join(fixed)}: the recipe of run {run.id} was fixed at submission "
            f"({run.dir / 'recipe.yaml'}); `orch resume` changes its profile, its length (--steps) and, past the "
            "schedule's end, the schedule (--beyond-schedule). Submit a new run to train another recipe."
        )


def check_steps(run: Run, steps: int, done: int, from_scratch: bool) -> None:
    """A resumed run trains up to or past its newest committed step (going back is `orch rollback`'s); one that has
    completed them, past it."""
    if steps > done or from_scratch or (steps == done and run.state() != "completed"):
        return
    if steps == done:
        raise OrchError(f"Run {run.id} already completed {done} steps; pass --steps N with N > {done} to train on.")
    raise OrchError(
        f"Run {run.id} has committed step {done}; --steps {steps} is below it, and a resume only trains further. "
        f"Allowed: --steps N with N >= {done}; to go back to an earlier checkpoint, `orch rollback {run.id} "
        "--to-step K`."
    )


def past_schedule(run: Run, recipe: Recipe, steps: int, at: int, choice: str | None) -> tuple[Recipe, str | None]:
    """The recipe a resumed run trains with when `steps` goes past the end of its schedule, and the choice applied.
    Without a choice this is refused where the run is asked to train further than before: it would train the steps
    past the end at the schedule's floor without anyone having decided so. extend: the schedule ends at `steps`
    (`orchestrator.core.schedule.extended`); floor: unchanged, the steps past its end train at alpha × peak."""
    spec, peak = recipe.schedule, recipe.optimizer.lr
    if steps <= spec.total_steps or (choice is None and steps <= run.info.steps):
        return recipe, None
    if choice == "extend":
        return recipe.model_copy(update={"schedule": extended(spec, steps)}), choice
    if choice == "floor":
        return recipe, choice
    floor = spec.alpha * peak
    raise OrchError(
        f"Run {run.id}: --steps {steps:,} goes past the end of its learning-rate schedule at step "
        f"{spec.total_steps:,} ({spec.name}, schedule.total_steps in {run.dir / 'recipe.yaml'}), where the rate has "
        f"reached its floor, alpha {spec.alpha:g} × peak {peak:g} = {floor:.3g}; nothing was submitted. Choose with "
        f"--beyond-schedule: extend (schedule.total_steps becomes {steps:,}: "
        f"{extension_effect(spec, steps, at, peak)}) or floor (steps {spec.total_steps:,} to {steps - 1:,} train "
        f"at {floor:.3g}); refuse is the default. See the schedules in docs/recipes.md."
    )


@contextmanager
def rewritten(path: Path, text: str) -> Iterator[None]:
    """`path` holds `text` from here on, unless the block fails: then it is put back as it was."""
    before = path.read_bytes() if path.exists() else None
    write_atomic(path, text)
    try:
        yield
    except BaseException:
        if before is None:
            path.unlink()
        else:
            write_atomic(path, before)
        raise


def cancel(run: Run) -> str:
    """Stop the run's live job; its checkpoints stay and `orch resume` continues from them."""
    with run.lock():
        jobs = run.jobs
        try:
            cancelled = bool(jobs) and cancel_job(run.job(jobs[-1]))
        except ForeignJob as err:
            raise OrchError(
                f"Run {run.id} was not cancelled: its {err}. `orch cancel` of the run that folder belongs to stops it."
            ) from None
        if not cancelled:
            raise OrchError(f"Run {run.id} has no live job to cancel (state: {run.state()}).")
        run.mark_cancelled()
        return jobs[-1].job_id


def job_function(run: Run):
    from jobs.entry import TrainJob

    return TrainJob(run.dir)


def dump(config: Profile | Recipe) -> str:
    """YAML that reads back to the same values (strings such as 'yes' or '1e5' stay quoted). Only the fields the
    files, the overrides or the planner set: a run's frozen code reads it, and a field added to the schema later
    (with its default) must not make that code refuse the file on a resume."""
    return dump_yaml(config.model_dump(mode="json", exclude_unset=True))
