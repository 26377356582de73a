"""The files of a run directory as typed models, read through one function that tells damage apart from absence.

A file that is missing reads as its default (a run that has not got that far); a file that is there but cannot be
parsed or does not match its model raises `DamagedFile`, which names the file and says why. Callers decide what a
damaged file means for them: `orch status` marks that one run damaged and lists the others.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from orchestrator.core.errors import OrchError
from orchestrator.core.files import NotAPlainFile, file_sha256, read_plain, write_json_atomic
from orchestrator.core.schedulers import scheduler_of

MAX_RUN_FILE_BYTES = 64 << 20  # no run file is near this; a larger one is damage, not something to parse


class DamagedFile(OrchError):
    """A run file that is present but unreadable or not what its model says."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = path, why[:300]
        super().__init__(f"damaged: {path.name}: {self.why}")


class RunFile(BaseModel):
    # extra: fields of later versions are kept out; defer_build: a model's validator is built when first used, not
    # at import (`orch status` uses five of the run files' models)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, defer_build=True)


class ManifestEntry(RunFile):
    bytes: int = Field(ge=0)
    sha256: str

    digest_name: ClassVar[str] = "SHA-256"

    def matches(self, path: Path) -> bool:
        return file_sha256(path) == self.sha256


class Listed(Protocol):
    """A manifest's entry for one file: its size, and whether a file's content has its digest."""

    bytes: int

    @property
    def digest_name(self) -> str: ...

    def matches(self, path: Path) -> bool: ...


def first_mismatch(folder: Path, files: Mapping[str, Listed], checksums: bool) -> str | None:
    """The first of `files` that is missing from `folder` or differs from it (in size, or with `checksums` in its
    digest); None when all match. Files the manifest does not list are not looked at."""
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.bytes:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.bytes}"
        if checksums and not entry.matches(path):
            return f"{name} fails its {entry.digest_name} checksum"
    return None


class FolderManifest(RunFile):
    """Every file of a folder with its size and SHA-256, written into the folder once it is complete: the manifest of
    a run's frozen code (`Run.freeze_code`)."""

    files: dict[str, ManifestEntry]

    @staticmethod
    def listing(folder: Path, leave_out: str) -> dict[str, ManifestEntry]:
        """The files under `folder` but `leave_out` (the manifest itself), by path relative to it."""
        return {
            str(p.relative_to(folder)): ManifestEntry(bytes=p.stat().st_size, sha256=file_sha256(p))
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != leave_out
        }

    def mismatch(self, folder: Path, checksums: bool = True) -> str | None:
        return first_mismatch(folder, self.files, checksums)


class RunInfo(RunFile):
    """run.json: what was asked."""

    run_id: str
    created: float
    profile: str
    recipe: str
    steps: int = Field(ge=1)
    tracking_uri: str | None = None  # None: the embedded store of the ORCH_HOME the run lives in
    stop_before_end_s: int = Field(ge=0)
    git_commit: str | None = None
    profile_file: str | None = None
    recipe_file: str | None = None
    from_scratch: bool = False  # the next job starts at step 0 even where damaged checkpoints exist
    overrides: list[str] = []  # the command line's --set, --sweep point, --account, --nodes, --time: "recipe.x=v"
    sweep: str | None = None  # the sweep this run is a point of
    beyond_schedule: Literal["extend", "floor"] | None = None  # what `orch resume` did with steps past the schedule


class JobRecord(RunFile):
    """One entry of jobs.json: a job of the run, as the scheduler named it."""

    job_id: str
    executor: Literal["local", "slurm"]
    submitted: float
    cancelled: bool = False

    @model_validator(mode="after")
    def _job_id_fits_its_scheduler(self) -> JobRecord:
        """Ids reach `kill` and `scancel`: a negative PID or an option-like string must never get there."""
        if problem := scheduler_of(self.executor).job_id_problem(self.job_id):
            raise ValueError(problem)
        return self


class Progress(RunFile):
    """progress.json: the job's heartbeat."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=True)  # a diverged loss is NaN: still a readable run

    state: Literal["running", "requeued", "preempted", "failed", "completed"]
    step: int = Field(ge=0)
    steps: int = Field(ge=1)
    job_id: str
    updated: float
    last_checkpoint_step: int | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    lr: float | None = None
    step_time_s: float | None = None
    val_loss: float | None = None  # this job's newest validation, at step val_step
    val_step: int | None = None


class Attempt(RunFile):
    """One entry of attempts.json: a start of a job."""

    job_id: str
    start_step: int = Field(ge=0)
    started: float
    launched: float | None = None  # when the job's process started (before imports): allocations count from here
    nodes: int = Field(default=1, ge=1)
    # how the job stopped early, where it saw that itself
    ended: Literal["requeued", "preempted", "hang", "crashed"] | None = None
    stopped: float | None = None  # when the job ended itself (requeue, preemption, hang, completion): goodput's end

    @property
    def start(self) -> float:
        """When the allocation began as far as the run knows: its process's start, else (older jobs) this record's."""
        return self.launched or self.started


class MlflowState(RunFile):
    """mlflow.json: the MLflow run and the step it has every metric through."""

    run_id: str
    sent_through: int = Field(ge=0)
    tracking_uri: str | None = None  # the store that has this run; another store (a moved run) starts over
    # bytes of each system/ file (per-node system metrics) MLflow has; None: not known (an older file, or a run found
    # again by its tag), then read from the MLflow run's histories
    system_sent: dict[str, int] | None = None
    experiment_id: str | None = None  # for the run's address in the MLflow UI; None in files of older versions
    # bytes of rolled_back.jsonl the sender has looked through for steps MLflow has that a rollback dropped; None: not
    # known (an older file, or a run found again by its tag), then taken as the file's size
    rolled_back_checked: int | None = None


class Failure(RunFile):
    """errors/<job>.rank<N>.json: why a rank of a job stopped."""

    job_id: str
    rank: int = Field(ge=0)
    host: str
    step: int | None = None
    type: str
    message: str
    time: float

    def describe(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return f"{self.type}: {self.message[:500]} (rank {self.rank} on {self.host}{at})"


class Skip(RunFile):
    """One entry of skips.json: optimizer steps whose samples are never trained (`orch rollback`, the spike guard).

    `data_steps` is what the data order honours: data step d is global samples [d·B, (d+1)·B), and training step s
    reads the s-th data step that no entry skips (`data_step`). `steps` are the training steps [start, end) as the run
    numbered them when the skip was recorded (the same numbers where no earlier skip lies before them)."""

    steps: tuple[int, int]
    data_steps: tuple[int, int]
    by: Literal["guard", "hand"]
    reason: str
    time: float
    job_id: str | None = None

    @model_validator(mode="after")
    def _ranges_are_not_empty(self) -> Skip:
        for name, (start, end) in (("steps", self.steps), ("data_steps", self.data_steps)):
            if not 0 <= start < end:
                raise ValueError(f"{name} [{start}, {end}) is not a range of steps from 0 up")
        return self


SILENT_S = 5.0  # the least silence that counts as no sign of life, however often a rank's beat is rewritten


class RankBeat(RunFile):
    """ranks/<job>.rank<N>.json: what one rank of a job is doing, rewritten every `every_s` by its watchdog thread
    (jobs/watchdog.py): the step, the phase and since when, and the time by which that phase should be over."""

    job_id: str
    rank: int = Field(ge=0)
    host: str
    pid: int = Field(gt=1)
    step: int = Field(ge=0)  # steps done: the rank is training the next one, or evaluating or saving this one
    phase: str
    since: float
    deadline: float
    updated: float
    every_s: float = Field(default=1.0, gt=0)  # when the next rewrite is due

    def silent(self, now: float) -> bool:
        """No sign of life (two rewrites missed): the process is stopped or gone, or its host unreachable."""
        return now - self.updated > max(SILENT_S, 2 * self.every_s)

    def describe(self, now: float) -> str:
        where = f"rank {self.rank} on {self.host} (pid {self.pid}) in {self.phase} after step {self.step}"
        silence = f", silent for {now - self.updated:.0f} s" if self.silent(now) else ""
        return f"{where} for {now - self.since:.0f} s{silence}"


class Recovery(RunFile):
    """errors/<job>.attempt<N>.recovery.json: what was decided after a crash of that attempt of the job, written once
    by the first rank that failed (jobs/recovery.py)."""

    job_id: str
    attempt: int = Field(ge=1)
    rank: int = Field(ge=0)  # the rank that decided, and requeues the job where it was retried
    host: str
    step: int | None
    error: str  # "Type: first line of the message": what makes two failures the same
    retried: bool
    reason: str
    excluded_hosts: list[str] = []
    time: float


class Hang(RunFile):
    """hangs/<job>.<time>.json: a job its watchdog stopped because no step finished within the bound; every rank's
    last beat, and which ranks were stuck (silent, or furthest behind)."""

    job_id: str
    detected_by: int = Field(ge=0)
    time: float
    bound_s: float
    stuck: list[int]
    ranks: list[RankBeat]

    def describe(self) -> str:
        heard = {beat.rank for beat in self.ranks}
        named = [beat.describe(self.time) for beat in self.ranks if beat.rank in self.stuck]
        named += [f"rank {rank}, never heard of" for rank in self.stuck if rank not in heard]
        return f"no step finished within {self.bound_s:.0f} s: stuck {'; '.join(named)}"


Model = TypeVar("Model")


def read_model(path: Path, model: type[Model] | Any, default: Any = None) -> Any:
    """The file parsed as `model` (a model class or a type such as list[JobRecord]); `default` when it is absent."""
    try:
        text = read_plain(path, MAX_RUN_FILE_BYTES).decode()
    except FileNotFoundError:
        return default
    except NotAPlainFile as err:
        raise DamagedFile(path, err.strerror) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedFile(path, f"cannot be read ({err})") from None
    if not text.strip():
        raise DamagedFile(path, "empty")
    try:  # pydantic's own parser: a third of the time of json.loads and validate_python (`orch status`)
        return adapter(model).validate_json(text)
    except ValueError:
        pass  # the path below decides, as it always has: the same values, the same words for the damage
    try:
        return adapter(model).validate_python(json.loads(text))
    except ValueError as err:  # json.JSONDecodeError and pydantic's ValidationError are both ValueErrors
        raise DamagedFile(path, describe(err)) from None


SPOOL = "metrics.jsonl"  # every step's metrics, one JSON object a line: {"step", "time_ms", "metrics"}
ROLLED_BACK = "rolled_back.jsonl"  # the same lines for steps a resume discarded from the spool


def spool_entries(path: Path) -> list[dict[str, Any]]:
    """Every readable line of a spool file (metrics.jsonl, rolled_back.jsonl); a torn or garbled line (a crash
    mid-write, a damaged disk) is left out, so that one bad line never blocks a resume or `orch status`."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    try:  # all lines at once: several times faster than line by line (200,000 steps are 50 MB)
        return [spool_entry(entry) for entry in json.loads("[" + ",".join(lines) + "]")]
    except (ValueError, KeyError, TypeError):
        pass
    entries = []
    for line in lines:
        try:
            entries.append(spool_entry(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def spool_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One spool line, typed: a line whose step, time or metric values are not numbers is damage (TypeError)."""
    metrics = dict(entry["metrics"])
    if any(isinstance(value, bool) or not isinstance(value, int | float) for value in metrics.values()):
        raise TypeError("a metric value that is not a number")
    return {"step": int(entry["step"]), "time_ms": int(entry["time_ms"]), "metrics": metrics}


SKIPS = "skips.json"
Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint [start, end) ranges of data steps


def read_skips(run_dir: Path) -> list[Skip]:
    """The run's skip list, oldest first (none when skips.json is absent)."""
    return read_model(run_dir / SKIPS, list[Skip], [])


def add_skip(run_dir: Path, skip: Skip) -> list[Skip]:
    """Append a skip to skips.json (replaced atomically); returns the whole list."""
    skips = [*read_skips(run_dir), skip]
    write_json_atomic(run_dir / SKIPS, [s.model_dump() for s in skips])
    return skips


def skipped_data(skips: list[Skip]) -> Ranges:
    """The data steps the skips cover, as sorted, disjoint [start, end) ranges."""
    merged: list[list[int]] = []
    for start, end in sorted(s.data_steps for s in skips):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((start, end) for start, end in merged)


def data_step(skipped: Ranges, step: int) -> int:
    """The data step training step `step` reads: the step-th data step outside `skipped` (from `skipped_data`)."""
    for start, end in skipped:
        if start > step:
            break
        step += end - start
    return step


FINGERPRINT = "fingerprint.json"  # in the run's data/ folder


class SourceData(RunFile):
    """What one source of the run's data held when it was recorded: the content, not the path."""

    folder: str
    fingerprint: str  # SHA-256 of its splits' shard checksums and token counts (`jobs.shards.fingerprint`)
    train_tokens: int = Field(ge=0)


class DataFingerprint(RunFile):
    """data/fingerprint.json: the run's data as it was when the run was submitted (or, for a run from before, when its
    next job started), by source name ("" for one source). Every job and `orch resume` compares the data with it, so
    a run never trains on another corpus put in the same folder."""

    sources: dict[str, SourceData]
    recorded: float


MIXTURE = "mixture.json"
MixPhases = list[tuple[int, dict[str, float]]]  # (first training step, weights by source), in step order


class MixChange(RunFile):
    """One entry of mixture.json: from training step `from_step` on, the mixture's sources have `weights`
    (`orch resume --weights`). The recipe's weights hold from step 0 until the first change."""

    from_step: int = Field(ge=0)
    weights: dict[str, float]
    time: float

    @model_validator(mode="after")
    def _weights_sum_to_a_positive_number(self) -> MixChange:
        if any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()) > 0:
            raise ValueError("weights must be at least 0 and sum to a positive number")
        return self


def read_mix_changes(run_dir: Path) -> list[MixChange]:
    """The run's changes of mixture weights, oldest first (none when mixture.json is absent)."""
    return read_model(run_dir / MIXTURE, list[MixChange], [])


def mix_phases(weights: dict[str, float], changes: list[MixChange]) -> MixPhases:
    """The weights in force from each step on: the recipe's from step 0, then each change in the order recorded. A
    change replaces the phases that start at or after its step (a run taken back to an earlier checkpoint and given
    other weights there)."""
    phases: MixPhases = [(0, weights)]
    for change in changes:
        phases = [p for p in phases if p[0] < change.from_step] + [(change.from_step, change.weights)]
    return phases


def new_skip(
    skips: list[Skip], start: int, end: int, by: Literal["guard", "hand"], reason: str, job_id: str | None
) -> Skip:
    """A skip of training steps [start, end) of the run's current order: the data steps they read, as one range
    (data steps an earlier entry skips inside it are covered again, which changes nothing)."""
    skipped = skipped_data(skips)
    data = (data_step(skipped, start), data_step(skipped, end - 1) + 1)
    return Skip(steps=(start, end), data_steps=data, by=by, reason=reason, time=time.time(), job_id=job_id)


@functools.cache
def adapter(model: Any) -> TypeAdapter:
    """Building a validator takes milliseconds: once per model, not once per file read (`orch status` reads five
    files of every run)."""
    return TypeAdapter(model)


def describe(err: ValueError) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        return f"{where}: {first['msg']}" + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")
    return f"not valid JSON ({err})"
