"""The training job: what every rank runs. Read it top to bottom: guards, build, resume, loop.

`Trainer` is one rank's model, optimizer, schedule and data, built from the recipe's specs; `orch bench` times the
same object. What a checkpoint restores besides the shards is `jobs.state.SavedState`, checked on resume.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import submitit
import torch
import torch.distributed as dist

from jobs import chaos, deadline, recovery, watchdog
from jobs.checkpoint import Checkpointer
from jobs.data import BlockLoader, DataPosition, GlobalOrder, load_blocks, make_order, source_splits
from jobs.distributed import Ranks, agree, start_process_group
from jobs.evaluate import Evaluator
from jobs.loss import causal_lm_loss
from jobs.model import attention_implementation, build_sharded_model, set_gradient_sync
from jobs.optim import build_optimizer, build_scheduler
from jobs.preemption import StopFlag, process_started
from jobs.progress_log import ProgressLog, stop_cause
from jobs.shards import check_fingerprint, shard_damage
from jobs.spikes import SpikeGuard
from jobs.state import SavedState, TrainState
from jobs.stragglers import PhaseClock, Phases, StragglerWatch
from jobs.system_metrics import SystemMonitor, node_name
from jobs.tracking import MetricSpool, Tracker, artifacts, describe, mlflow_run_id
from orchestrator.core import goodput
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.config import Profile, Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.plan import Batching, Plan, granted, make_plan
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import (
    Attempt,
    MixPhases,
    Progress,
    Ranges,
    Recovery,
    mix_phases,
    read_mix_changes,
    read_skips,
    skipped_data,
)
from orchestrator.core.schedulers import scheduler_of

log = logging.getLogger("orch.train")
BEAT_INTERVAL_S = 0.5


def run_training(run_dir: Path, stop: StopFlag) -> int | None:
    """Join this job's process group (from the scheduler's variables), then train. A rank that fails writes why
    into the run (`errors/`), where `orch status` and `--wait` find it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run, job = Run(run_dir), submitit.JobEnvironment()
    position = Position()
    try:
        profile, recipe = run.profile(), run.recipe()
        stop.deadline = process_started() + profile.time_limit_min * 60 - run.info.stop_before_end_s
        if profile.preemptible:
            stop.listen_for_preemption()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        bounds, job_id = profile.watchdog, str(job.job_id)
        ranks = start_process_group(profile.launch.device, profile.launch.backend, bounds.collective_timeout_s)
        hang = partial(end_attempt, run, job_id, "hang")  # counted by the requeue-loop guard like a requeue
        try:
            per_node = profile.launch.tasks_per_node
            with watchdog.Watchdog(run.dir, job_id, ranks.rank, ranks.world, bounds, profile.executor, hang, per_node):
                return train(run, profile, recipe, ranks, job_id, stop, position)
        finally:
            dist.destroy_process_group()
    except Exception as err:
        if not position.recorded:
            run.record_failure(str(job.job_id), job.global_rank, position.step, err)
        raise


@dataclass
class Position:
    """The step this rank is training, and whether its failure is recorded (with what recovery decided)."""

    step: int | None = None
    recorded: bool = False


def train(
    run: Run, profile: Profile, recipe: Recipe, ranks: Ranks, job_id: str, stop: StopFlag, position: Position
) -> int | None:
    profile = granted(profile, ranks.world)  # a node range: the shape this allocation has, not the one asked for
    plan = make_plan(profile, recipe, run.info.steps)
    if not guards_pass(run, ranks.rank, job_id, profile.nodes):
        return None
    check_data(run.data_dir, ranks.rank)
    skipped = agree(ranks.rank, lambda: skipped_data(read_skips(run.dir)))
    phases = agree(ranks.rank, lambda: mix_phases(recipe.data.weights, read_mix_changes(run.dir)))
    trainer = Trainer(recipe, plan.batching, run.data_dir, ranks, skipped, phases)
    chaos.slow_saves(trainer.model, lambda: position.step)
    checkpointer = Checkpointer(run.checkpoints_dir, recipe.checkpoint)
    fresh = TrainState.fresh(run.dir / "recipe.yaml", ranks.world, mlflow_run_id(run.dir))
    state = SavedState(fresh, DataPosition(trainer.loader), trainer.scheduler)
    resume(trainer, checkpointer, state, run.info.from_scratch)
    start = position.step = state.train.step
    evaluator = Evaluator(recipe.eval, run.data_dir, plan.micro_batch, ranks.device, recipe.data.weights)
    report = JobReport(run, job_id, plan, checkpointer, start, trainer.attention) if ranks.rank == 0 else None
    guard = SpikeGuard(recipe.spike_guard, run, ranks.rank, job_id, start) if recipe.spike_guard else None
    watch = StragglerWatch(run, profile, ranks, job_id, plan.steps, plan.save_s, stop)
    log.info(
        "rank %d/%d on %s: steps %d..%d, grad accum %d, attention %s, code %s",
        ranks.rank, ranks.world, socket.gethostname(), start, plan.steps, trainer.grad_accum, trainer.attention,
        Path(__file__).parent.parent,
    )  # fmt: skip
    monitor = SystemMonitor.start(
        run.dir, job_id, profile.system_metrics_interval_s, ranks.device.type == "cuda", lambda: position.step
    )
    follower = deadline.follow(run, plan, job_id, ranks.rank, stop, checkpointer.save_seconds)
    try:
        throughput = Throughput(plan)
        with frozen_heap():
            finished = loop(
                trainer, state, plan, checkpointer, evaluator, report, stop, throughput, position, watch, guard
            )
    except Exception as err:
        decision = recovery.decide(run, profile, job_id, ranks.rank, position.step, err)
        # recorded first: before a peer's exit can end this process, and before the reports below, which a full disk
        # fails too
        run.record_failure(job_id, ranks.rank, position.step, err, decision.reason)
        position.recorded = True
        if report:
            report.failed(err, decision)
        if decision.retried and decision.rank == ranks.rank:
            recovery.requeue(run, profile, job_id, ranks.rank, decision)
        raise
    finally:
        if monitor:
            monitor.stop()
        if follower:
            follower.close()
    if report and finished:
        report.completed()
    return plan.steps if finished else None


def guards_pass(run: Run, rank: int, job_id: str, nodes: int) -> bool:
    """Only the run's newest job may write into it, and a chain of requeues that makes no progress stops."""
    if not agree(rank, lambda: owns_run(run, job_id)):
        raise RuntimeError(f"job {job_id} is not the current job of run {run.id}: refusing to write into it")
    committed = committed_step(run.checkpoints_dir) or 0
    refusal = agree(rank, lambda: record_start(run, job_id, committed, nodes))
    if refusal and rank == 0:
        Heartbeat(run, job_id, run.info.steps, lambda: committed).beat("failed", committed, error=refusal)
    return refusal is None


def check_data(data_dir: Path, rank: int) -> None:
    """The run's data is what it was recorded as (`check_fingerprint`), and its token shards are what `orch data
    prepare` wrote, before any GPU time is spent on them."""

    def damage() -> str | None:
        return next(filter(None, (shard_damage(s.dir) for s in source_splits(data_dir, "train").values())), None)

    agree(rank, lambda: check_fingerprint(data_dir))
    problem = agree(rank, damage)
    if problem:
        raise OrchError(f"the training data is damaged: {problem}. Prepare it again (`orch data prepare`).")


def resume(trainer: Trainer, checkpointer: Checkpointer, state: SavedState, from_scratch: bool) -> None:
    """Restore the newest committed checkpoint that passes its manifest (if any) into the trainer and `state`, which
    checks it against what this run expects; without one, `state` stays as it is. Where checkpoints were committed
    and none can be loaded, the job stops instead of training from step 0, unless the run was resumed
    --from-scratch."""
    watchdog.note("load")
    checkpointer.clean_incomplete()
    existed = committed_step(checkpointer.root)
    step, damaged = checkpointer.choose()
    for problem in damaged:
        log.warning("%s; set aside", problem)
    if step is None and existed is not None and not from_scratch:
        raise OrchError(
            f"no committed checkpoint can be loaded ({'; '.join(damaged) or 'the checkpoint folders are gone'}), "
            f"though one was committed at step {existed}: nothing was trained. `orch repair RUN` shows what is left; "
            "`orch resume RUN --from-scratch` trains from step 0."
        )
    if step is None:
        if existed is not None:
            checkpointer.forget_latest()  # it names a checkpoint that was set aside
        return
    if damaged:
        checkpointer.protect(step, "the last good checkpoint before damaged ones")
    state.load_state_dict(checkpointer.load(step, trainer.model, trainer.optimizer))


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Exempt what set-up made (the imported modules, model, optimizer and data order: some 400,000 objects on a
    local rank) from the garbage collector while training: its full collections otherwise walk all of them once
    enough new objects have survived, 0.2 s on one rank at a moment of its own, which every other rank then waits
    out at the next collective (seen inside a checkpoint's gather of write results). What training makes is
    collected as before; afterwards the exempted objects are ordinary again."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def loop(
    trainer: Trainer,
    state: SavedState,
    plan: Plan,
    checkpointer: Checkpointer,
    evaluator: Evaluator,
    report: JobReport | None,
    stop: StopFlag,
    throughput: Throughput,
    position: Position,
    watch: StragglerWatch,
    guard: SpikeGuard | None = None,
) -> bool:
    """Train from the step `state` holds to the plan's end; False when the job stopped early to be requeued."""
    stall = 0.0  # the wait in the previous step's save: a step's metrics are spooled before its save
    progress = state.train
    while progress.step < plan.steps:
        step = position.step = progress.step
        started = time.perf_counter()
        result = trainer.step(step, timed=watch.compares)
        if guard and guard.spiked(step, result.loss) and roll_back(trainer, checkpointer, state, guard):
            continue
        state.advance()
        metrics = {**result.metrics(), **throughput.metrics(time.perf_counter() - started, result.data_wait)}
        metrics.update(watch.observe(progress.step, result.phases, metrics["step_time_s"], stall))
        watchdog.step_done(progress.step, metrics["step_time_s"])
        metrics["skipped_steps"] = trainer.order.skipped_before(progress.step)
        metrics.update({f"mix/{name}": share for name, share in trainer.order.source_shares(step).items()})
        watchdog.note("eval")
        evaluating = time.perf_counter()
        if evaluated := evaluator.maybe_evaluate(progress.step, plan.steps, trainer.model):
            metrics.update(evaluated, eval_s=time.perf_counter() - evaluating)
        metrics["checkpoint_stall_s"] = stall
        watchdog.note("sync")
        stopping = stop.agreed(trainer.device)
        if report:
            report.step(progress.step, metrics, last=stopping is not None or progress.step == plan.steps)
            progress.mlflow_run_id = progress.mlflow_run_id or report.heartbeat.mlflow_run_id  # once the run exists
        watchdog.note("save")
        saving = time.perf_counter()
        checkpointer.maybe_save(progress.step, plan.steps, stopping is not None, trainer, state)
        stall = time.perf_counter() - saving
        if stopping and progress.step < plan.steps:
            checkpointer.close()
            if stop.follower and stopping == "time" and watch.leaving is None:  # at its deadline: not preempted,
                stop.follower.stopped(progress.step)  # nor leaving a slow host
            if report and stopping == "preempted":
                report.preempted(progress.step)
            elif report:
                report.requeued(progress.step)
                watch.requeue()  # exits this process through submitit
            return False
    checkpointer.close()
    return True


def roll_back(trainer: Trainer, checkpointer: Checkpointer, state: SavedState, guard: SpikeGuard) -> bool:
    """The loss of the training step `state` is at spiked: record the skip of the steps from the last committed
    checkpoint through it (docs/rollback.md), reload that checkpoint into `state` through `resume` and drop the
    spooled steps after it. False before the first checkpoint: training goes on."""
    checkpointer.wait()
    recorded = guard.record()
    if recorded is None:
        return False
    trainer.reorder(recorded[1])
    resume(trainer, checkpointer, state, from_scratch=False)
    guard.forget_after(state.train.step)
    if guard.rank == 0:
        MetricSpool(guard.run.dir).rollback(state.train.step)
    return True


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float
    lr: float
    data_wait: float  # seconds spent waiting for micro-batches
    phases: Phases  # this rank's (jobs.stragglers)

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm}


class Trainer:
    """One rank's model, optimizer, schedule and data, built from the recipe's specs, and its optimizer step."""

    def __init__(
        self,
        recipe: Recipe,
        split: Batching,
        data_dir: Path,
        ranks: Ranks,
        skipped: Ranges = (),
        phases: MixPhases | None = None,
    ) -> None:
        spec = recipe.train
        self.ranks, self.chaos_dir = ranks, data_dir.parent / "chaos"  # the run's chaos/ folder (jobs.chaos)
        self.host = node_name()
        self.device, self.clip = ranks.device, spec.grad_clip
        torch.manual_seed(spec.seed)
        blocks = load_blocks(data_dir)
        order = make_order(blocks, split, spec.seed, skipped, phases or mix_phases(recipe.data.weights, []))
        self.loader = BlockLoader(blocks, order, ranks.rank, ranks.device)
        self.attention = attention_implementation(spec.attention, ranks.device)
        self.model = build_sharded_model(
            recipe.model,
            self.attention,
            spec.fsdp,
            spec.precision,
            ranks.device,
            recompute=spec.activation_checkpointing,
            compile=spec.compile,
        )
        self.optimizer = build_optimizer(self.model.parameters(), recipe.optimizer)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule)

    @property
    def order(self) -> GlobalOrder:
        return self.loader.order

    @property
    def grad_accum(self) -> int:
        return self.order.split.accumulation

    def reorder(self, skipped: Ranges) -> None:
        """Skip these data steps from now on (`skipped_data` of the run's skip list)."""
        self.loader.reorder(replace(self.order, skipped=skipped))

    def step(self, step: int, timed: bool = False) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches of the global batch of `step`; `timed`: its phases
        measured on the device for the straggler watch (`PhaseClock`)."""
        loss, data_wait = torch.zeros((), device=self.device), 0.0
        chaos.fail(step, self.ranks.rank, self.ranks.world, self.chaos_dir)
        clock = PhaseClock(self.device, timed)
        for micro_step in range(self.grad_accum):
            watchdog.note("data", step)
            fetch = time.perf_counter()
            tokens = self.loader.micro_batch(step, micro_step)
            data_wait += time.perf_counter() - fetch
            watchdog.note("forward_backward")
            set_gradient_sync(self.model, micro_step == self.grad_accum - 1)
            micro_loss = causal_lm_loss(self.model, tokens) / self.grad_accum
            micro_loss.backward()
            loss += micro_loss.detach()
        time.sleep(chaos.delay(step, self.ranks.rank, self.host))
        forward_backward = clock.lap() - data_wait
        sync = clock.sync()
        watchdog.note("optimizer")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip).full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        phases = Phases(data_wait, forward_backward, sync, clock.lap())
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        mean_loss = chaos.spike(loss.item() / dist.get_world_size(), self.order.data_step(step))
        return StepResult(mean_loss, grad_norm.item(), lr, data_wait, phases)


class Throughput:
    """Tokens/s, MFU, step time, data-wait fraction and (on GPUs) peak memory of one step."""

    def __init__(self, plan: Plan) -> None:
        self.tokens_per_step, self.world = plan.tokens_per_step, plan.world_size
        self.peak_flops, self.model_flops = plan.peak_flops, plan.flops_per_token

    def metrics(self, elapsed: float, data_wait: float) -> dict[str, float]:
        tokens_per_s = self.tokens_per_step / elapsed
        metrics = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_rank": tokens_per_s / self.world,
            "step_time_s": elapsed,
            "data_wait_fraction": data_wait / elapsed,
        }
        if self.peak_flops:
            metrics["mfu"] = self.model_flops * tokens_per_s / self.peak_flops
        if torch.cuda.is_available():
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return metrics


class JobReport:
    """Rank 0's account of the job: the heartbeat for `orch status`, the metrics for MLflow and the job log's
    progress lines."""

    def __init__(self, run: Run, job_id: str, plan: Plan, checkpointer: Checkpointer, start_step: int, attention: str):
        params, tags = describe(run)
        tags["orch.attention"] = attention
        tags["orch.nodes"] = os.environ.get("SLURM_JOB_NODELIST", socket.gethostname())
        self.run, self.job_id, self.steps = run, job_id, plan.steps
        uri = run.tracking_uri if run.profile().job_tracking == "direct" else None
        self.tracker = Tracker(run.dir, uri, params, tags, checkpointer.last_committed)
        self.tracker.spool.rollback(start_step)
        self.tracker.flush(through=0)  # first contact (an embedded store creates its tables) before the steps
        self.heartbeat = Heartbeat(run, job_id, plan.steps, checkpointer.last_committed)
        self.heartbeat.beat("running", start_step)
        self.log = ProgressLog(plan.recipe.log.every_steps, plan.steps, start_step, checkpointer.last_committed)

    def step(self, done: int, metrics: dict[str, float], last: bool = False) -> None:
        """`last`: the job's final step, whose metrics also carry the run's goodput (MLflow gets them once the final
        save commits the step)."""
        if last:
            metrics = {**metrics, **self.goodput_metrics(done, metrics)}
        self.tracker.log(done, metrics)
        self.heartbeat.beat("running", done, metrics)
        self.log.step(done, metrics, last)

    def goodput_metrics(self, done: int, metrics: dict[str, float]) -> dict[str, float]:
        """goodput/percent and the parts' device-hours (docs/goodput.md); none when a run file cannot be read."""
        try:
            return goodput.before_final_save(self.run, done, metrics, time.time()).metrics()
        except (OrchError, OSError) as err:
            log.warning("no goodput for this job: %s", err)
            return {}

    def requeued(self, done: int) -> None:
        self.stopped_early("requeued", done)

    def preempted(self, done: int) -> None:
        """Saved after the scheduler's SIGTERM. Under Slurm the job then queues itself again (`requeue_preempted`):
        Slurm ends a preempted job that leaves within its GraceTime as completed."""
        self.stopped_early("preempted", done)
        scheduler_of(self.run.profile().executor).requeue_preempted(self.job_id)

    def stopped_early(self, how: Literal["requeued", "preempted"], done: int) -> None:
        """Saved and stopping before the end: the attempt records how, which the requeue-loop guard reads."""
        self.log.stopped(how, done, stop_cause(self.run.dir, self.job_id, done))
        self.tracker.close("RUNNING", artifacts(self.run, self.job_id))
        end_attempt(self.run, self.job_id, how)
        self.heartbeat.beat(how, done)

    def failed(self, err: BaseException, decision: Recovery) -> None:
        """Failed, or requeued from the last checkpoint where recovery retries it (`decision`). A retried job leaves
        MLflow to its next try (the spool and the logs stay): the requeue must not wait on the tracking server while
        the scheduler is ending the job's other tasks."""
        error = f"{type(err).__name__}: {err}; {decision.reason}"
        if decision.retried:
            end_attempt(self.run, self.job_id, "crashed")
            self.tracker.stop()
        else:
            self.tracker.close("FAILED", artifacts(self.run, self.job_id, logs=True))
        self.heartbeat.beat("requeued" if decision.retried else "failed", self.heartbeat.step, error=error)

    def completed(self) -> None:
        self.log.completed()
        self.tracker.close("FINISHED", artifacts(self.run, self.job_id, logs=True))
        end_attempt(self.run, self.job_id, None)
        self.heartbeat.beat("completed", self.steps)


def owns_run(run: Run, job_id: str, wait_s: float = 60) -> bool:
    """Only the run's newest job may write into it (`orch submit` records the id right after queueing)."""
    until = time.time() + wait_s
    while True:
        jobs = run.jobs
        if jobs and jobs[-1].job_id == job_id:
            return True
        if time.time() > until or any(j.job_id == job_id for j in jobs):
            return False
        time.sleep(0.5)


def record_start(run: Run, job_id: str, start_step: int, nodes: int) -> str | None:
    """Record this start in attempts.json (which `orch status` also reads for allocations and node-hours) and stop
    a chain of requeues that makes no progress: the third start of one job at the same committed step after two
    requeues of its own fails (a new `orch resume` is a new job, and starts a new count). Restarts the scheduler
    made (a preemption, a node failure) do not count: the job did not choose them."""
    attempts = run.attempts
    stuck = [
        a for a in attempts if a.job_id == job_id and a.start_step == start_step and a.ended in ("requeued", "hang")
    ]
    attempt = Attempt(
        job_id=job_id, start_step=start_step, started=time.time(), nodes=nodes, launched=process_started()
    )
    run.write_attempts([*attempts, attempt])
    if len(stuck) >= 2:
        return (
            f"requeue loop: job {job_id} started at step {start_step} {len(stuck) + 1} times without committing "
            "a newer checkpoint; the chain is stopped. See the job logs, then `orch resume`."
        )
    return None


def end_attempt(run: Run, job_id: str, how: Literal["requeued", "preempted", "hang", "crashed"] | None) -> None:
    """Mark this job's newest attempt with when it stopped by itself and, where it stopped early, how."""
    attempts = run.attempts
    last = max((i for i, a in enumerate(attempts) if a.job_id == job_id), default=None)
    if last is not None:
        attempts[last] = attempts[last].model_copy(update={"ended": how, "stopped": time.time()})
        run.write_attempts(attempts)


class Heartbeat:
    """progress.json: what `orch status` and `--wait` read, written by rank 0 after every step."""

    def __init__(self, run: Run, job_id: str, steps: int, last_committed: Callable[[], int | None]) -> None:
        self.run, self.job_id, self.steps, self.last_committed = run, job_id, steps, last_committed
        self.step, self.metrics, self.written, self.mlflow_run_id = 0, {}, 0.0, None
        self.validation: dict[str, float] = {}  # this job's newest val_loss and val_step, for the progress display

    def beat(self, state: str, step: int, metrics: dict[str, float] | None = None, error: str | None = None) -> None:
        """A running job beats at most every BEAT_INTERVAL_S (readers poll); any other state is written at once."""
        self.step, self.metrics = step, metrics or self.metrics
        if metrics and "val_loss" in metrics:
            self.validation = {"val_loss": metrics["val_loss"], "val_step": step}
        now = time.time()
        if state == "running" and now - self.written < BEAT_INTERVAL_S:
            return
        self.written = now
        self.mlflow_run_id = self.mlflow_run_id or mlflow_run_id(self.run.dir)
        progress = Progress(
            state=state,
            step=step,
            steps=self.steps,
            job_id=self.job_id,
            updated=now,
            last_checkpoint_step=self.last_committed(),
            mlflow_run_id=self.mlflow_run_id,
            error=error,
            **{k: self.metrics.get(k) for k in ("loss", "tokens_per_s", "lr", "step_time_s")},
            **self.validation,
        )
        self.run.write_progress(progress, durable=state != "running")
