"""`orch data prepare --profile P` and `orch tokenizer train --profile P`: the work of `prepare` as jobs on a profile's
CPU nodes, one Slurm array task per node with every core busy (the worker pool of `prepare`).

An array rather than one multi-node job: the slices are independent, so each task starts as soon as a node is free,
a task that dies or is preempted is requeued alone (its committed slices stay), and the tasks need no collective.
The last task to commit a slice merges the slices into the splits (`prepare_slices.merge_when_complete`).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.config import Profile
from orchestrator.core.errors import OrchError
from orchestrator.core.files import read_json, write_json_atomic
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.schedulers.base import Job
from orchestrator.tools.prepare import (
    ChunkTokenizer,
    FileTally,
    InputFile,
    Report,
    Settings,
    TokenizerFiles,
    list_inputs,
    read_chunks,
    read_tokenizer_files,
    tokenizer_pool,
)
from orchestrator.tools.prepare_slices import (
    SLICES,
    Plan,
    check_output,
    failures,
    header_of,
    merge_when_complete,
    plan_slices,
    read_result,
    record_failure,
    recorded_settings,
    slice_dir,
    slice_states,
    start,
    stopped,
    tokenize_slice,
    worker_args,
)

JOBS = "jobs.json"
SAMPLE_BYTES = 4 << 20  # input tokenized here to measure the rate a dry run estimates with
MERGE_BYTES_PER_S = 500e6  # the merge reads, hashes and writes each token once: about this, on one node's disk


# --- on the nodes ---------------------------------------------------------------------------------------------------


def task_cpus() -> int:
    """The CPUs this task may use: the allocation's, where Slurm or the system says."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(allowed, int(os.environ.get("SLURM_CPUS_PER_TASK", allowed)))


def requeue_self(*_: Any) -> None:
    """Ask the scheduler to start this task again and leave: its committed slices stay, the slice it was in is redone.
    Also the handler of the warning signal before the time limit (SIGUSR2)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "")
    code = scheduler_of(os.environ.get("SUBMITIT_EXECUTOR", "local")).requeue(job_id, [])
    os._exit(code)


def run_slices(output: str, tokenizer_dir: str, numbers: list[int]) -> str:
    """One array task: tokenize and commit its slices, then merge if every slice is committed. A slice that fails is
    noted and the task requeued once its other slices are done; the same failure twice stops that slice."""
    signal.signal(signal.SIGUSR2, requeue_self)
    folder, tokenizer = Path(output), read_tokenizer_files(Path(tokenizer_dir))
    plan = Plan.load(folder / SLICES)
    workers, again = task_cpus(), False
    todo = [
        n for n in numbers if not (slice_dir(folder, n) / "slice.json").is_file() and not stopped(failures(folder, n))
    ]
    with tokenizer_pool(worker_args(plan, tokenizer), workers) as tokenize:
        for number in todo:
            beat = folder / SLICES / f"{number:05d}.running"
            write_json_atomic(beat, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
            try:
                tokenize_slice(plan, number, folder, tokenize, workers)
            except Exception as err:  # noqa: BLE001 - any failure of a slice is noted with its reason
                again |= record_failure(folder, number, f"{type(err).__name__}: {err}")
    if again:
        requeue_self()
    try:
        merge_when_complete(folder, header_of(tokenizer))
    except OrchError as err:
        write_json_atomic(folder / SLICES / "merge.failed.json", {"reason": str(err)})
        raise
    return f"{len(numbers)} slices on {socket.gethostname()} with {workers} cores"


# --- here: plan, submit, follow --------------------------------------------------------------------------------------


def data_profile(profile: Profile) -> Profile:
    """The profile as one task per node that takes every core of it, no GPU: how a prepare task runs."""
    update: dict[str, Any] = {
        "launch": profile.launch.model_copy(update={"tasks_per_node": 1}),
        "node": profile.node.model_copy(update={"gpus": 0}),
        "nodes": 1,
    }
    if profile.slurm:
        update["slurm"] = profile.slurm.model_copy(update={"cpus_per_task": profile.node.cores})
    return profile.model_copy(update=update)


def check_cpus(profile: Profile, path: Path) -> str | None:
    """A partition with no CPUs to give, or fewer per node than the profile counts on, is refused; None where Slurm
    cannot be asked here (the note to show instead is returned)."""
    if profile.slurm is None:  # no partition to check
        return None
    partition = profile.slurm.partition
    known = scheduler_of(profile.executor).partitions()
    if known is None:
        return f"Note: Slurm could not be asked about partition '{partition}' here; its CPUs were not checked."
    if partition not in known:
        raise OrchError(
            f"{path}: partition '{partition}' (slurm.partition) does not exist on this cluster, so it has no CPUs to "
            f"give. Allowed: one of {', '.join(sorted(known))}."
        )
    facts = known[partition]
    cpus, nodes = facts.cpus, facts.nodes
    if not cpus or not nodes or facts.state != "UP":
        raise OrchError(
            f"{path}: partition '{partition}' (slurm.partition) has no CPUs to give (Slurm says TotalCPUs={cpus}, "
            f"TotalNodes={nodes}, State={facts.state}). Allowed: a partition that is UP with CPU nodes, "
            "e.g. Karolina's qcpu (--profile karolina-cpu)."
        )
    if profile.node.cores > cpus // nodes:
        raise OrchError(
            f"{path}: node.cores is {profile.node.cores}, but partition '{partition}' has {cpus // nodes} CPUs per "
            f"node. Allowed: at most {cpus // nodes}, so that a task's request fits a node."
        )
    return None


@dataclass(frozen=True)
class Estimate:
    """What a dry run says, from a rate measured here on the start of the input."""

    input_bytes: int
    tokens: int
    tokens_per_core_s: float
    wall_s: float
    node_hours: float
    output_bytes: int


def measure(files: list[InputFile], tokenizer: TokenizerFiles, dtype: str, sample_bytes: int) -> tuple[float, float]:
    """(tokens per input byte, tokens per second on one core) of the first `sample_bytes` of the input."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    worker = ChunkTokenizer(tokenizer.json, tokenizer.eos_id, dtype, 0, 0.0)
    read_bytes = tokens = 0
    started = time.process_time()
    for file_no, file in enumerate(files):
        for chunk in read_chunks(file, file_no, 0, 1 << 18, FileTally()):
            read_bytes += chunk.input_bytes
            tokens += len(worker(chunk).parts["train"].tokens)
            if read_bytes >= sample_bytes:
                break
        if read_bytes >= sample_bytes:
            break
    seconds = max(time.process_time() - started, 1e-6)
    return tokens / max(read_bytes, 1), tokens / seconds


def estimate(plan: Plan, tokenizer: TokenizerFiles, profile: Profile, tasks: int) -> Estimate:
    per_byte, per_core = measure(plan.files, tokenizer, plan.settings["dtype"], SAMPLE_BYTES)
    input_bytes = sum(f.size for f in plan.files)
    tokens = int(input_bytes * per_byte)
    itemsize = 2 if plan.settings["dtype"] == "uint16" else 4
    node_rate = per_core * profile.node.cores
    busy = min(tasks, profile.nodes, len(plan.slices))
    merge_s = 2 * tokens * itemsize / MERGE_BYTES_PER_S
    wall = tokens / node_rate / busy + merge_s
    node_hours = (tokens / node_rate + merge_s) / 3600
    return Estimate(input_bytes, tokens, per_core, wall, node_hours, tokens * itemsize)


def make_plan(
    tokenizer_dir: Path, inputs: list[Path], output: Path, settings: Settings, slice_bytes: int
) -> tuple[Plan, TokenizerFiles]:
    """The slices of the input, and the refusals a prepare makes before anything runs."""
    from jobs.shards import token_dtype

    if not 0 <= settings.val_fraction < 1:
        raise OrchError(f"--val-fraction {settings.val_fraction}: not a fraction of documents. Allowed: 0 <= f < 1.")
    tokenizer = read_tokenizer_files(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size, settings.dtype)
    saved = Plan.load(output / SLICES)
    if saved is not None:  # the input as first planned; a rerun continues it
        files, ignored = saved.files, [Path(p) for p in saved.ignored]
    else:
        files, ignored = list_inputs(inputs)
    recorded = recorded_settings(settings, dtype, tokenizer, files)
    check_output(output, recorded)
    if saved is not None:
        return saved, tokenizer
    return Plan(recorded, files, plan_slices(files, slice_bytes), [str(p) for p in ignored]), tokenizer


def submit(profile: Profile, output: Path, tokenizer: TokenizerFiles, plan: Plan, tasks: int) -> list[Job]:
    """Queue the slices not yet committed (or only the merge) as an array, `tasks` tasks, `profile.nodes` at a time."""
    start(output, plan, tokenizer)
    if any_alive(queued_jobs(output)):
        raise OrchError(
            f"--output {output}: its prepare job is still queued or running; nothing was "
            f"queued. Allowed: follow it with `orch data status {output} --wait`, or run again once it ended."
        )
    states = slice_states(output, plan)
    pending = sorted(states["waiting"] + states["interrupted"] + states["running"])
    for number in states["failed"]:  # a new command is a new chance for a slice stopped before
        (output / SLICES / f"{number:05d}.failures.json").unlink(missing_ok=True)
    pending = sorted(pending + states["failed"])
    count = max(1, min(tasks, len(pending)))
    groups = [pending[i::count] for i in range(count)]
    (output / SLICES / "merge.failed.json").unlink(missing_ok=True)
    scheduler, folder = scheduler_of(profile.executor), output / SLICES / "submitit"
    runner = data_profile(profile)
    executor = scheduler.array_executor(runner, folder, profile.signal_delay_s, profile.nodes)
    try:
        with scheduler.submission(runner, folder / "controller.log", 0):
            queued = executor.map_array(run_slices, [str(output)] * count, [str(tokenizer.path)] * count, groups)
    except Exception as err:  # noqa: BLE001 - sbatch's or the executor's refusal, whatever its type
        message = " ".join(str(err).split())[:1000] or type(err).__name__
        raise OrchError(f"The {profile.executor} scheduler refused the prepare job: {message}") from None
    jobs = [Job(profile.executor, str(job.job_id), time.time(), folder) for job in queued]
    recorded = read_json(output / SLICES / JOBS, [])
    write_json_atomic(output / SLICES / JOBS, recorded + [job.__dict__ | {"folder": str(folder)} for job in jobs])
    return jobs


def sbatch_text(profile: Profile, output: Path) -> str | None:
    """The script each array task's sbatch gets, where the scheduler has one."""
    folder = output / SLICES / "submitit"
    return scheduler_of(profile.executor).script(data_profile(profile), folder, 0, profile.signal_delay_s)


# --- progress -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a prepare job stands, from its folder alone."""

    slices: int
    states: dict[str, list[int]]
    tokens: int
    done_bytes: int
    total_bytes: int
    rate: float  # tokens per second since the first job was queued
    eta_s: float | None
    complete: bool
    alive: bool
    problems: list[str]
    peak_rss_mb: float


def progress(output: Path) -> Progress:
    plan = Plan.load(output / SLICES)
    if plan is None:
        raise OrchError(
            f"{output}: no prepare job was queued for this folder ({output / SLICES / 'plan.json'} does not exist). "
            "Allowed: the --output of `orch data prepare --profile P`."
        )
    states = slice_states(output, plan)
    results = {n: read_result(output, n) for n in states["done"]}
    tokens = sum(r.tokens for r in results.values())
    done_bytes = sum(plan.slices[n].end - plan.slices[n].start for n in states["done"])
    total_bytes = sum(s.end - s.start for s in plan.slices)
    jobs = queued_jobs(output)
    since = min((job.submitted for job in jobs), default=time.time())
    rate = tokens / max(time.time() - since, 1e-6)
    complete = all((output / split / "index.json").is_file() for split in ("train", "val"))
    left = (total_bytes - done_bytes) * (tokens / done_bytes) if done_bytes else None
    eta = None if complete else (left / rate if left is not None and rate else None)
    alive = any_alive(jobs) if jobs and not complete else False
    problems = [f"slice {n} ({slice_name(plan, n)}) failed: {'; then '.join(failures(output, n))}"
                for n in states["failed"]]  # fmt: skip
    problems += [f"slice {n} skipped {r.unreadable}" for n, r in results.items() if r.unreadable]
    merge_failure = read_json(output / SLICES / "merge.failed.json")
    if merge_failure:
        problems.append(f"the merge failed: {merge_failure['reason']}")
    peak = max((r.peak_rss_mb for r in results.values()), default=0.0)
    return Progress(
        len(plan.slices), states, tokens, done_bytes, total_bytes, rate, eta, complete, alive, problems, peak
    )


def queued_jobs(output: Path) -> list[Job]:
    return [Job(j["executor"], j["job_id"], j["submitted"], Path(j["folder"]))
            for j in read_json(output / SLICES / JOBS, [])]  # fmt: skip


def any_alive(jobs: list[Job]) -> bool:
    """Whether a task of the jobs is queued, running or requeued."""
    executors = {job.executor for job in jobs}
    return any(scheduler_of(name).any_task_alive([job for job in jobs if job.executor == name]) for name in executors)


def finished(output: Path) -> bool:
    """Whether a prepare job completed in this folder: its plan and both split indexes are there."""
    return Plan.load(output / SLICES) is not None and all(
        (output / split / "index.json").is_file() for split in ("train", "val")
    )


def slice_name(plan: Plan, number: int) -> str:
    part = plan.slices[number]
    file = plan.files[part.file_no]
    return str(file.path) if part.whole else f"{file.path} bytes {part.start:,}-{part.end:,}"


def follow(output: Path, poll_s: float = 2.0) -> Iterator[Progress]:
    """The progress of a prepare job, whenever it changes, until its jobs are all gone or it is complete."""
    shown = None
    while True:
        now = progress(output)
        key = (tuple(map(len, now.states.values())), now.complete, now.alive, tuple(now.problems))
        if key != shown:
            shown = key
            yield now
        if now.complete or not now.alive:
            return
        time.sleep(poll_s)


def report(output: Path) -> Report:
    """What `prepare` reports of a folder, from the slices' records of what reading each file found."""
    from orchestrator.core.shard_index import read_index

    plan = Plan.load(output / SLICES)
    tallies: dict[int, FileTally] = {}
    for number, part in enumerate(plan.slices):
        result = read_result(output, number)
        tally = tallies.setdefault(part.file_no, FileTally())
        tally.records += result.records if result else 0
        tally.first_lines = tally.first_lines or (result.first_lines if result and part.start == 0 else 0)
    indexes = {split: read_index(output / split) for split in ("train", "val")}
    return Report(indexes, plan.files, tallies, [Path(p) for p in plan.ignored])


def train_tokenizer_job(inputs: list[str], vocab_size: int, output: str, sample_bytes: int) -> str:
    """The tokenizer job: `orch tokenizer train` on one node, on a sample of the corpus."""
    from orchestrator.tools.prepare import SampledTexts, train_tokenizer

    files, _ = list_inputs([Path(p) for p in inputs])
    texts = SampledTexts(files, sample_bytes)
    record = {"sample_bytes": sample_bytes, "input_bytes": sum(f.size for f in files)}
    size = train_tokenizer(iter(texts), vocab_size, Path(output), record=record)
    return f"{size:,} tokens from {texts.used:,} documents; skipped {dict(texts.skipped)}"


def submit_tokenizer(profile: Profile, inputs: list[Path], vocab_size: int, output: Path, sample_bytes: int) -> Job:
    scheduler, folder = scheduler_of(profile.executor), output.with_name(f".{output.name}.submitit")
    runner = data_profile(profile)
    executor = scheduler.executor(runner, folder, 0, profile.signal_delay_s)
    try:
        with scheduler.submission(runner, folder / "controller.log", 0):
            queued = executor.submit(
                train_tokenizer_job, [str(p.resolve()) for p in inputs], vocab_size, str(output.resolve()), sample_bytes
            )
    except Exception as err:  # noqa: BLE001 - sbatch's or the executor's refusal, whatever its type
        message = " ".join(str(err).split())[:1000] or type(err).__name__
        raise OrchError(f"The {profile.executor} scheduler refused the tokenizer job: {message}") from None
    return Job(profile.executor, str(queued.job_id), time.time(), folder)
