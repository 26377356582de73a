"""The training job: what every rank runs. Read it top to bottom."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import submitit
import torch
import torch.distributed as dist
import yaml
from accelerate import PartialState

from jobs import checkpoint
from jobs.data import BlockLoader, GlobalOrder, load_blocks, prepare_data
from jobs.model import attention_implementation, build_model, shard
from jobs.optim import build_optimizer, build_scheduler
from jobs.tracking import Tracker
from orchestrator.config import Profile, Recipe
from orchestrator.plan import make_plan
from orchestrator.runs import Run, write_json_atomic

log = logging.getLogger("orch.train")


def run_training(run_dir: Path) -> int:
    """Set up this rank's process group from the scheduler's variables, then train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = Run(run_dir)
    profile = Profile.model_validate(yaml.safe_load((run.dir / "profile.yaml").read_text()))
    recipe = Recipe.model_validate(yaml.safe_load((run.dir / "recipe.yaml").read_text()))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    state = PartialState(cpu=profile.launch.device == "cpu", backend=profile.launch.backend)
    try:
        return train(run, profile, recipe, state)
    finally:
        dist.destroy_process_group()


def train(run: Run, profile: Profile, recipe: Recipe, state: PartialState) -> int:
    rank, world, device = state.process_index, state.num_processes, state.device
    plan = make_plan(profile, recipe, run.info["steps"])
    torch.manual_seed(recipe.train.seed)

    data_dir = run.dir / "data"
    if rank == 0 and not (data_dir / "blocks.npy").is_file():
        prepare_data(recipe.data, recipe.model.vocab_size, recipe.train.seed, data_dir)
    dist.barrier()
    blocks = load_blocks(data_dir)
    order = GlobalOrder(
        len(blocks), recipe.train.global_batch_size, recipe.train.micro_batch_size, world, recipe.train.seed
    )
    loader = BlockLoader(blocks, order, rank, device)

    attention = attention_implementation(recipe.train.attention, device)
    model = shard(build_model(recipe.model, attention).to(device), recipe.train.fsdp, recipe.train.precision)
    optimizer = build_optimizer(model.parameters(), recipe.optimizer)
    scheduler = build_scheduler(optimizer, recipe.schedule)

    start_step, mlflow_run_id = 0, None
    resume_from = checkpoint.latest_step(run.checkpoints_dir)
    if resume_from is not None:
        saved = checkpoint.load(run.checkpoints_dir, resume_from, model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        start_step, mlflow_run_id = saved["step"], saved["mlflow_run_id"]
        log.info("resumed from the checkpoint at step %d", start_step)

    tracker = None
    if rank == 0:
        params = {"recipe": recipe.model_dump(mode="json"), "profile": profile.model_dump(mode="json")}
        params["run"] = {
            "steps": plan.steps,
            "world_size": world,
            "grad_accum": plan.grad_accum,
            "attention": attention,
        }
        tracker = Tracker(run.info["tracking_uri"], mlflow_run_id, run.id, params)
        mlflow_run_id = tracker.run_id
    heartbeat = Heartbeat(run, plan.steps, mlflow_run_id, resume_from) if rank == 0 else None
    log.info(
        "rank %d/%d: %d steps from %d, grad accum %d, attention %s",
        rank,
        world,
        plan.steps,
        start_step,
        plan.grad_accum,
        attention,
    )

    try:
        for step in range(start_step, plan.steps):
            started = time.perf_counter()
            loss = torch.zeros((), device=device)
            for micro_step in range(plan.grad_accum):
                tokens = loader.micro_batch(step, micro_step)
                model.set_requires_gradient_sync(micro_step == plan.grad_accum - 1)
                micro_loss = model(input_ids=tokens, labels=tokens).loss / plan.grad_accum
                micro_loss.backward()
                loss += micro_loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip).full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            done = step + 1

            if done % recipe.checkpoint.every_steps == 0 or done == plan.steps:
                checkpoint.save(
                    run.checkpoints_dir,
                    done,
                    model,
                    optimizer,
                    {"scheduler": scheduler.state_dict(), "mlflow_run_id": mlflow_run_id},
                )
                if heartbeat:
                    heartbeat.last_checkpoint_step = done
            elapsed = time.perf_counter() - started
            if tracker and heartbeat:
                metrics = {
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": plan.tokens_per_step / elapsed,
                    "step_time_s": elapsed,
                }
                tracker.log(done, metrics)
                heartbeat.beat("running", done, metrics)
    except BaseException as err:
        if tracker and heartbeat:
            tracker.finish("FAILED")
            heartbeat.beat("failed", heartbeat.step, error=f"{type(err).__name__}: {err}")
        raise
    if tracker and heartbeat:
        tracker.finish("FINISHED")
        heartbeat.beat("completed", plan.steps)
    return plan.steps


class Heartbeat:
    """progress.json: what `orch status` and `--wait` read, written by rank 0 after every step."""

    def __init__(self, run: Run, steps: int, mlflow_run_id: str, last_checkpoint_step: int | None) -> None:
        self.path, self.steps, self.mlflow_run_id = run.dir / "progress.json", steps, mlflow_run_id
        self.last_checkpoint_step, self.step, self.metrics = last_checkpoint_step, 0, {}

    def beat(self, state: str, step: int, metrics: dict[str, float] | None = None, error: str | None = None) -> None:
        self.step, self.metrics = step, metrics or self.metrics
        write_json_atomic(
            self.path,
            {
                "state": state,
                "step": step,
                "steps": self.steps,
                "mlflow_run_id": self.mlflow_run_id,
                "last_checkpoint_step": self.last_checkpoint_step,
                "updated": time.time(),
                "error": error,
                **{k: self.metrics.get(k) for k in ("loss", "tokens_per_s", "lr")},
            },
        )
