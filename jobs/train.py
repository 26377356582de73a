"""The training job: what every rank runs. Read it top to bottom."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import submitit
import torch
import torch.distributed as dist
import yaml
from accelerate import PartialState
from transformers import LlamaForCausalLM

from jobs.checkpoint import Checkpointer
from jobs.data import BlockLoader, GlobalOrder, data_ready, load_blocks, load_val_blocks, prepare_data
from jobs.evaluate import evaluate
from jobs.loss import causal_lm_loss
from jobs.model import attention_implementation, build_sharded_model, set_gradient_sync
from jobs.optim import build_optimizer, build_scheduler
from jobs.preemption import StopFlag, process_started
from jobs.tracking import Tracker, committed_step, mlflow_run_id
from orchestrator.config import Profile, Recipe
from orchestrator.estimate import flops_per_token
from orchestrator.plan import Plan, make_plan
from orchestrator.runs import Run, read_json, write_json_atomic

log = logging.getLogger("orch.train")
BEAT_INTERVAL_S = 0.5


def run_training(run_dir: Path, stop: StopFlag) -> int | None:
    """Set up this rank's process group from the scheduler's variables, then train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = Run(run_dir)
    profile = Profile.model_validate(yaml.safe_load((run.dir / "profile.yaml").read_text()))
    recipe = Recipe.model_validate(yaml.safe_load((run.dir / "recipe.yaml").read_text()))
    stop.deadline = process_started() + profile.time_limit_min * 60 - run.info["stop_before_end_s"]
    job = submitit.JobEnvironment()
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    state = PartialState(cpu=profile.launch.device == "cpu", backend=profile.launch.backend)
    try:
        return train(run, profile, recipe, state, str(job.job_id), stop)
    finally:
        dist.destroy_process_group()


def train(run: Run, profile: Profile, recipe: Recipe, state: PartialState, job_id: str, stop: StopFlag) -> int | None:
    rank, world, device = state.process_index, state.num_processes, state.device
    plan = make_plan(profile, recipe, run.info["steps"])
    torch.manual_seed(recipe.train.seed)
    if not agree(rank, lambda: owns_run(run, job_id)):
        raise RuntimeError(f"job {job_id} is not the current job of run {run.id}: refusing to write into it")
    committed = committed_step(run.checkpoints_dir) or 0
    if refusal := agree(rank, lambda: requeue_loop(run, job_id, committed, profile.nodes)):
        if rank == 0:
            Heartbeat(run, job_id, plan.steps, lambda: committed).beat("failed", committed, error=refusal)
        return None

    data_dir = run.dir / "data"
    if rank == 0 and not data_ready(data_dir):
        prepare_data(recipe.data, recipe.model.vocab_size, recipe.train.seed, data_dir)
    dist.barrier()
    blocks = load_blocks(data_dir)
    order = GlobalOrder(
        len(blocks), recipe.train.global_batch_size, recipe.train.micro_batch_size, world, recipe.train.seed
    )
    loader = BlockLoader(blocks, order, rank, device)
    val_blocks = load_val_blocks(data_dir) if recipe.eval else None

    attention = attention_implementation(recipe.train.attention, device)
    model = build_sharded_model(
        recipe.model,
        attention,
        recipe.train.fsdp,
        recipe.train.precision,
        device,
        recompute=recipe.train.activation_checkpointing,
        compile=recipe.train.compile,
    )
    optimizer = build_optimizer(model.parameters(), recipe.optimizer)
    scheduler = build_scheduler(optimizer, recipe.schedule)

    spec = recipe.checkpoint
    checkpointer = Checkpointer(run.checkpoints_dir, spec.keep_last, spec.keep_every, spec.async_save)
    checkpointer.clean_incomplete()
    resume_from, damaged = checkpointer.choose()
    for problem in damaged:
        log.warning("%s; using the previous committed checkpoint", problem)
    start_step, recipe_hash = 0, hashlib.sha256((run.dir / "recipe.yaml").read_bytes()).hexdigest()
    if resume_from is not None:
        saved = checkpointer.load(resume_from, model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        start_step = saved["step"]
        log.info(
            "resumed from the checkpoint at step %d (saved by %d ranks, now %d)", start_step, saved["world_size"], world
        )
        if saved["recipe_hash"] != recipe_hash:
            log.warning("the recipe changed since the checkpoint at step %d was saved", start_step)

    report = Report(run, job_id, plan, checkpointer, start_step, attention) if rank == 0 else None
    peak_flops = world * (profile.node.peak_bf16_tflops or 0) * 1e12
    model_flops = flops_per_token(recipe.model, recipe.data.max_seq_len)
    log.info(
        "rank %d/%d: steps %d..%d, grad accum %d, attention %s",
        rank,
        world,
        start_step,
        plan.steps,
        plan.grad_accum,
        attention,
    )

    try:
        for step in range(start_step, plan.steps):
            started = time.perf_counter()
            loss, grad_norm, lr, data_wait = train_step(
                model, optimizer, scheduler, loader, step, plan.grad_accum, recipe.train.grad_clip
            )
            done, elapsed = step + 1, time.perf_counter() - started
            tokens_per_s = plan.tokens_per_step / elapsed
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_rank": tokens_per_s / world,
                "step_time_s": elapsed,
                "data_wait_fraction": data_wait / elapsed,
            }
            if peak_flops:
                metrics["mfu"] = model_flops * tokens_per_s / peak_flops
            if torch.cuda.is_available():
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if recipe.eval and (done % recipe.eval.every_steps == 0 or done == plan.steps):
                metrics.update(evaluate(model, val_blocks, recipe.eval.blocks, recipe.train.micro_batch_size, device))
            if report:
                report.step(done, metrics)

            stopping = stop.agreed(device)
            if done % spec.every_steps == 0 or done == plan.steps or stopping:
                train_state = {
                    "scheduler": scheduler.state_dict(),
                    "world_size": world,
                    "recipe_hash": recipe_hash,
                    "data": {"samples_consumed": done * recipe.train.global_batch_size, "seed": recipe.train.seed},
                    "mlflow_run_id": mlflow_run_id(run.dir),
                }
                checkpointer.save(done, model, optimizer, train_state)
            if stopping and done < plan.steps:
                checkpointer.close()
                if report:
                    report.requeued(done)
                    stop.requeue()  # exits this process through submitit
                return None
        checkpointer.close()
    except Exception as err:
        if report:
            report.failed(err)
        raise
    if report:
        report.completed()
    return plan.steps


def train_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: BlockLoader,
    step: int,
    grad_accum: int,
    clip: float,
) -> tuple[float, float, float, float]:
    """One optimizer step over `grad_accum` micro-batches; returns loss (mean over ranks), grad norm, lr and the
    seconds spent waiting for data."""
    loss, data_wait = torch.zeros((), device=loader.device), 0.0
    for micro_step in range(grad_accum):
        fetch = time.perf_counter()
        tokens = loader.micro_batch(step, micro_step)
        data_wait += time.perf_counter() - fetch
        set_gradient_sync(model, micro_step == grad_accum - 1)
        micro_loss = causal_lm_loss(model, tokens) / grad_accum
        micro_loss.backward()
        loss += micro_loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).full_tensor()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item(), grad_norm.item(), lr, data_wait


class Report:
    """Rank 0's account of the job: the heartbeat for `orch status` and the metrics for MLflow."""

    def __init__(self, run: Run, job_id: str, plan: Plan, checkpointer: Checkpointer, start_step: int, attention: str):
        profile, recipe = run.dir / "profile.yaml", run.dir / "recipe.yaml"
        params = {"recipe": yaml.safe_load(recipe.read_text()), "profile": yaml.safe_load(profile.read_text())}
        params["run"] = {"steps": plan.steps, "world_size": plan.world_size, "grad_accum": plan.grad_accum}
        tags = {
            "orch.job_ids": ",".join(j["job_id"] for j in run.jobs),
            "orch.profile": run.info["profile"],
            "orch.recipe": run.info["recipe"],
            "orch.attention": attention,
            "orch.git_commit": run.info.get("git_commit") or "unknown",
            "orch.nodes": os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()),
        }
        self.run, self.job_id, self.steps = run, job_id, plan.steps
        self.tracker = Tracker(run.dir, run.info["tracking_uri"], params, tags, checkpointer.last_committed)
        self.tracker.spool.rollback(start_step)
        self.tracker.flush(through=0)  # first contact (an embedded store creates its tables) before the steps
        self.heartbeat = Heartbeat(run, job_id, plan.steps, checkpointer.last_committed)
        self.heartbeat.beat("running", start_step)

    def step(self, done: int, metrics: dict[str, float]) -> None:
        self.tracker.log(done, metrics)
        self.heartbeat.beat("running", done, metrics)

    def requeued(self, done: int) -> None:
        self.tracker.close("RUNNING", artifacts(self.run, self.job_id))
        self.heartbeat.beat("requeued", done)

    def failed(self, err: BaseException) -> None:
        self.tracker.close("FAILED", artifacts(self.run, self.job_id, logs=True))
        self.heartbeat.beat("failed", self.heartbeat.step, error=f"{type(err).__name__}: {err}")

    def completed(self) -> None:
        self.tracker.close("FINISHED", artifacts(self.run, self.job_id, logs=True))
        self.heartbeat.beat("completed", self.steps)


def artifacts(run: Run, job_id: str, logs: bool = False) -> list[Path]:
    """What the MLflow run keeps of a job: the resolved recipe and profile, the job script, at the end the logs."""
    files = [run.dir / "recipe.yaml", run.dir / "profile.yaml", run.submitit_dir / job_id / f"{job_id}_submission.sh"]
    return files + (sorted((run.submitit_dir / job_id).glob("*_log.*")) if logs else [])


def agree(rank: int, decide):
    """Rank 0 decides, every rank gets the same answer."""
    answer = [decide() if rank == 0 else None]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def owns_run(run: Run, job_id: str, wait_s: float = 60) -> bool:
    """Only the run's newest job may write into it (`orch submit` records the id right after queueing)."""
    until = time.time() + wait_s
    while True:
        jobs = run.jobs
        if jobs and jobs[-1]["job_id"] == job_id:
            return True
        if time.time() > until or any(j["job_id"] == job_id for j in jobs):
            return False
        time.sleep(0.5)


def requeue_loop(run: Run, job_id: str, start_step: int, nodes: int) -> str | None:
    """Stop a chain of requeues that makes no progress: the third start of one job at the same committed step
    fails (a new `orch resume` is a new job, and starts a new count)."""
    path = run.dir / "attempts.json"
    attempts = read_json(path, [])
    stuck = [a for a in attempts if a["job_id"] == job_id and a["start_step"] == start_step]
    attempt = {"job_id": job_id, "start_step": start_step, "started": time.time(), "nodes": nodes}
    write_json_atomic(path, attempts + [attempt])
    if len(stuck) >= 2:
        return (
            f"requeue loop: job {job_id} started at step {start_step} {len(stuck) + 1} times without committing "
            "a newer checkpoint; the chain is stopped. See the job logs, then `orch resume`."
        )
    return None


class Heartbeat:
    """progress.json: what `orch status` and `--wait` read, written by rank 0 after every step."""

    def __init__(self, run: Run, job_id: str, steps: int, last_committed: Callable[[], int | None]) -> None:
        self.run, self.job_id, self.steps, self.last_committed = run, job_id, steps, last_committed
        self.step, self.metrics, self.written, self.mlflow_run_id = 0, {}, 0.0, None

    def beat(self, state: str, step: int, metrics: dict[str, float] | None = None, error: str | None = None) -> None:
        """A running job beats at most every BEAT_INTERVAL_S (readers poll); any other state is written at once."""
        self.step, self.metrics = step, metrics or self.metrics
        now = time.time()
        if state == "running" and now - self.written < BEAT_INTERVAL_S:
            return
        self.written = now
        self.mlflow_run_id = self.mlflow_run_id or mlflow_run_id(self.run.dir)
        write_json_atomic(
            self.run.dir / "progress.json",
            durable=state != "running",
            data={
                "state": state,
                "step": step,
                "steps": self.steps,
                "job_id": self.job_id,
                "updated": now,
                "last_checkpoint_step": self.last_committed(),
                "mlflow_run_id": self.mlflow_run_id,
                "error": error,
                **{k: self.metrics.get(k) for k in ("loss", "tokens_per_s", "lr", "step_time_s")},
            },
        )
