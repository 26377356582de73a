"""Goodput of a simulated chain of allocations, through the accounting `orch status RUN` uses (docs/goodput.md).

Usage: python -m bench.goodput [--hours 2] [--scale 96] [--nodes 2] [--seed 0] [--folder DIR]

cstinyllama-1.2b on Karolina (the seed's 2 nodes, 16 A100s), figures from the planner and docs/performance.md:
- step: `Plan.step_s` (the planner's tokens/s at the profile's 45 % MFU);
- save stall: `Plan.save_s` (a synchronous write at the planner's 1 GB/s per rank) / 13.8, the stall of an async
  save against a sync one measured by bench.checkpoint_stall (80 ms against 1,099 ms); the recipe saves async;
- commit: `Plan.save_s` plus each rank's XXH3-128 of its own share of the checkpoint (8 bytes per parameter over
  the ranks) at `HASH_GB_S`, as it writes it; a failure before the commit loses that checkpoint;
- evaluation: `eval.blocks` × sequence tokens forward only, a third of a training step's compute per token;
- data wait: `DATA_READ_S` per micro-batch: the loader reads the next micro-batch in the background while the step
  computes (`jobs.data.BlockLoader`), and at most its whole read (bench.data_wait, a 8 × 2,048-token micro-batch)
  is taken from the step;
- start-up: `plan.startup_parts`, the first allocation with empty compile caches, the later ones with the caches
  the first left in the run's `cache/`; restart: 5 minutes from a failure to the next start;
- one failure per allocation, at a time drawn uniformly over its 48 h time limit (seeded): every allocation ends
  in a failure, an observed MTBF near 24 h.

The deadline (docs/goodput.md#the-deadline): with `--fail-share` below 1 only that share of allocations fails; the
others run to their time limit and stop `lead` before it, save, commit and requeue (the queue wait is restart's, not
charged). The same draws run twice: with the fixed lead (`Plan.stop_before_end_s`: the profile's 300 s signal + 30 s)
and with the lead the job now measures (step + commit + `SAFETY_MARGIN_S`); node-hours charged are each job's time
from its start to its failure or to the commit it stopped with, times its nodes.

The checkpoint interval: Young/Daly from the measured stall, but never shorter than a commit (the next save would wait
for it) nor than the checkpoint's bytes over the write budget (`WRITE_BUDGET`: a share of the scratch filesystem's
bandwidth, /work/shared/facts/karolina.md); a failure within a commit of a save loses that checkpoint too.

Scaling: the chain is `--hours` of wall time in which every duration above is divided by `--scale` (96: a 48 h
allocation becomes 30 minutes, a step 37 ms), so 2 hours hold what 192 hours of Karolina allocations hold, step for
step. Goodput is a ratio of times and the Young/Daly interval in steps is sqrt(2 δ M) / step: neither changes when
every time is divided by the same number (`--scale 1 --hours 192` gives the same shares, slower to write).

The chain is written as a job writes a run directory (attempts.json, metrics.jsonl with simulated times, each start
rolling the spool back to the last commit with the job's own `MetricSpool.rollback`), then accounted for with
`orchestrator.core.goodput`: once with the recipe's checkpoint interval, then with the Young/Daly interval that
`orch status RUN --suggest` derives from the first chain, under the same failures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.tracking import MetricSpool
from orchestrator.core import deadline, goodput
from orchestrator.core.checkpoints import write_latest
from orchestrator.core.config import Profile, Recipe
from orchestrator.core.files import write_json_atomic
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import HASH_GB_S, make_plan, startup_parts
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Attempt
from orchestrator.core.yamlio import dump_yaml

ASYNC_STALL_RATIO = 1099.1 / 79.8  # docs/performance.md, "Checkpoint stall": sync against async stall, 56M model
DATA_READ_S = 156e-6  # bench.data_wait: the median read of one micro-batch in the calling thread
RESTART_S = 5 * 60
SCRATCH_WRITE_BYTES_PER_S = 730e9  # Karolina's /scratch, aggregate (karolina.md, "medium")
WRITE_BUDGET = 0.01  # the share of it one run's checkpoints may use on average
T0 = 1_800_000_000.0


@dataclass(frozen=True)
class Chain:
    """Durations of one simulated chain, already divided by the scale."""

    step_s: float
    stall_s: float
    commit_s: float
    eval_s: float
    eval_every: int
    data_wait: float  # share of each step
    startup_cold_s: float  # the chain's first allocation: compile caches empty
    startup_warm_s: float  # every later one
    restart_s: float
    limit_s: float
    horizon_s: float
    nodes: int
    lead_s: float  # an allocation that does not fail stops this long before its time limit
    checkpoint_bytes: float


def karolina_chain(profile: Profile, recipe: Recipe, hours: float, scale: float, exact: bool = False) -> Chain:
    """`exact`: an allocation that does not fail stops at the measured lead (a step, a commit and the margin), else
    at the plan's fixed one."""
    plan = make_plan(profile, recipe, recipe.schedule.total_steps)
    eval_tokens = recipe.eval.blocks * recipe.data.max_seq_len
    commit_s = plan.save_s + 8 * plan.parameters / plan.world_size / (HASH_GB_S * 1e9)
    lead_s = plan.step_s + commit_s + deadline.SAFETY_MARGIN_S if exact else plan.stop_before_end_s
    return Chain(
        step_s=plan.step_s / scale,
        stall_s=plan.save_s / ASYNC_STALL_RATIO / scale,
        commit_s=commit_s / scale,
        eval_s=eval_tokens / plan.tokens_per_step * plan.step_s / 3 / scale,
        eval_every=recipe.eval.every_steps,
        data_wait=DATA_READ_S * plan.grad_accum / plan.step_s,
        startup_cold_s=sum(part.seconds for part in startup_parts(plan, warm_cache=False)) / scale,
        startup_warm_s=sum(part.seconds for part in startup_parts(plan, warm_cache=True)) / scale,
        restart_s=RESTART_S / scale,
        limit_s=profile.time_limit_min * 60 / scale,
        horizon_s=hours * 3600,
        nodes=profile.nodes,
        lead_s=lead_s / scale,
        checkpoint_bytes=8 * plan.parameters,
    )


def shortest_interval(chain: Chain, scale: float) -> tuple[float, str]:
    """The interval below which saving more often buys nothing (Karolina seconds), and why: a commit, or the write
    budget."""
    by_commit = chain.commit_s * scale
    by_budget = chain.checkpoint_bytes / (WRITE_BUDGET * SCRATCH_WRITE_BYTES_PER_S)
    return max((by_commit, "a commit"), (by_budget, f"{WRITE_BUDGET:.0%} of the scratch filesystem's write bandwidth"))


def simulate(
    folder: Path, chain: Chain, profile: Profile, recipe: Recipe, every: int, failures: list[float | None]
) -> tuple[Run, float]:
    """Write the run directory the chain's jobs would leave, saving every `every` steps; `failures`: when each
    allocation fails, as a share of its time limit, None where it runs to its deadline. Also the node-seconds the
    jobs held their nodes (scaled)."""
    folder.mkdir(parents=True)
    recipe = recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"every_steps": every})})
    (folder / "profile.yaml").write_text(dump_yaml(profile.model_dump(mode="json")))
    (folder / "recipe.yaml").write_text(dump_yaml(recipe.model_dump(mode="json")))
    spool, attempts, commits = MetricSpool(folder), [], [(T0, 0)]  # (when committed, step)
    start, horizon, held = T0, T0 + chain.horizon_s, 0.0
    for job, share in enumerate(failures):
        if start >= horizon:
            break
        committed = max(step for _, step in commits)
        spool.rollback(committed)  # what a job's rank 0 does as it starts
        attempts.append(Attempt(job_id=str(1000 + job), start_step=committed, started=start, nodes=chain.nodes))
        stops = share is None
        end = min(start + (chain.limit_s - chain.lead_s if stops else share * chain.limit_s), horizon)
        startup_s = chain.startup_warm_s if job else chain.startup_cold_s
        clock, step, stall, lines = start + startup_s, committed, 0.0, []
        while True:
            evaluation = {"eval_s": chain.eval_s} if (step + 1) % chain.eval_every == 0 else {}
            if clock + chain.step_s + evaluation.get("eval_s", 0.0) > end:
                break
            clock, step = clock + chain.step_s + evaluation.get("eval_s", 0.0), step + 1
            metrics = {"step_time_s": chain.step_s, "data_wait_fraction": chain.data_wait, "checkpoint_stall_s": stall}
            lines.append({"step": step, "time_ms": round(clock * 1000), "metrics": {**metrics, **evaluation}})
            stall = 0.0
            if step % every == 0:
                stall, clock = chain.stall_s, clock + chain.stall_s
                commits.append((clock + chain.commit_s, step))
        if stops and end < horizon and lines:  # the deadline: save the last step, commit, requeue
            clock = clock + chain.stall_s + chain.commit_s
            commits.append((clock, step))
            attempts[-1] = attempts[-1].model_copy(update={"ended": "requeued", "stopped": clock})
            end = clock
        with spool.path.open("a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
        commits = [(when, step) for when, step in commits if when <= end]  # the failure cuts a save short
        held += (end - start) * chain.nodes
        start = end + chain.restart_s
    write_json_atomic(folder / "attempts.json", [a.model_dump() for a in attempts])
    final = max(step for _, step in commits)
    (folder / "checkpoints").mkdir()
    write_latest(folder / "checkpoints", final)
    return Run(folder), held


def report(name: str, result: goodput.Goodput, scale: float) -> None:
    print(f"\n{name}: goodput {result.percent:.2f} % of {result.allocated_h * scale:,.0f} GPU-h (Karolina hours)")
    for part, hours in result.parts_h.items():
        if hours and abs(hours / result.allocated_h) >= 5e-5:  # leaves out parts that round to 0.00 %
            print(f"  {part:<17} {100 * hours / result.allocated_h:6.2f} %")
    print(f"  steps counted {result.steps['counted']:,}, rolled back {result.steps['rolled_back']:,}")


def show_startup(profile: Profile, recipe: Recipe) -> None:
    """Each part of an allocation's start-up (Karolina seconds) and where its figure comes from."""
    plan = make_plan(profile, recipe, recipe.schedule.total_steps)
    cold, warm = startup_parts(plan, warm_cache=False), startup_parts(plan, warm_cache=True)
    print("start-up, cold compile caches / warm:")
    for first, then in zip(cold, warm, strict=True):
        print(f"  {first.name:<18}{first.seconds:7.1f} s{then.seconds:7.1f} s  {then.source}")
    print(f"  {'total':<18}{sum(p.seconds for p in cold):7.1f} s{sum(p.seconds for p in warm):7.1f} s")


def draws(seed: int, count: int, fail_share: float) -> list[float | None]:
    """When each allocation fails (a share of its limit), None for those that run to their deadline; the failure
    times are the same draws whatever `fail_share`."""
    when, which = random.Random(seed), random.Random(seed + 1)
    return [share if which.random() < fail_share else None for share in (when.uniform(0, 1) for _ in range(count))]


def compare_deadlines(folder: Path, args: argparse.Namespace, profile: Profile, recipe: Recipe, every: int) -> None:
    """The same draws with the fixed lead and with the measured one: node-hours the jobs held per step trained and
    kept (counted, and uncommitted at the horizon: the chain goes on from them)."""
    print(f"\ndeadline, saving every {every} steps, {args.fail_share:.0%} of allocations failing:")
    per_step = {}
    for exact in (False, True):
        chain = karolina_chain(profile, recipe, args.hours, args.scale, exact)
        failures = draws(args.seed, math.ceil(chain.horizon_s / chain.restart_s), args.fail_share)
        name = "measured" if exact else "fixed"
        run, held = simulate(folder / f"deadline-{name}", chain, profile, recipe, every, failures)
        result = goodput.of_run(run, "running", now=T0 + chain.horizon_s)[1]
        node_h = held * args.scale / 3600
        kept = result.steps["counted"] + result.steps["uncommitted"]
        per_step[exact] = node_h / kept
        print(f"  {name} lead {chain.lead_s * args.scale:.1f} s: {node_h:,.3f} node-h held, {kept:,} steps kept, "
              f"goodput {result.percent:.2f} %")  # fmt: skip
    steps = recipe.schedule.total_steps
    saved = (per_step[False] - per_step[True]) * steps
    print(f"  node-h saved by the measured lead over the recipe's {steps:,} steps: {saved:,.3f} "
          f"({100 * saved / (per_step[False] * steps):.3f} %)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=2.0, help="wall time of the simulated chain")
    parser.add_argument("--scale", type=float, default=96.0, help="every Karolina duration is divided by this")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fail-share", type=float, default=1.0, help="share of allocations that fail")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the simulated runs")
    args = parser.parse_args()
    _, profile = load_profile("karolina", [{"nodes": args.nodes}])
    _, recipe = load_recipe("cstinyllama-1.2b")
    chain = karolina_chain(profile, recipe, args.hours, args.scale)
    failures = draws(args.seed, math.ceil(chain.horizon_s / chain.restart_s), args.fail_share)
    print(
        f"simulated chain: {args.hours:g} h at 1/{args.scale:g} of Karolina's durations ({args.nodes} nodes): step "
        f"{chain.step_s * args.scale:.3f} s, save stall {chain.stall_s * args.scale:.3f} s, commit "
        f"{chain.commit_s * args.scale:.1f} s, evaluation {chain.eval_s * args.scale:.2f} s every "
        f"{chain.eval_every} steps, data wait {chain.data_wait:.3%} of a step, start-up "
        f"{chain.startup_cold_s * args.scale / 60:.1f} min (then {chain.startup_warm_s * args.scale / 60:.1f} min "
        f"with warm compile caches), restart "
        f"{chain.restart_s * args.scale / 60:.0f} min, {args.fail_share:.0%} of the "
        f"{chain.limit_s * args.scale / 3600:.0f} h allocations fail (uniform over it)"
    )
    show_startup(profile, recipe)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="goodput-"))
    every = recipe.checkpoint.every_steps
    run, _ = simulate(folder / "recipe-interval", chain, profile, recipe, every, failures)
    began = time.perf_counter()
    history, result = goodput.of_run(run, "running", now=T0 + chain.horizon_s)
    took = time.perf_counter() - began
    suggestion = goodput.suggest(history, result)
    report(f"saving every {every} steps (the recipe's)", result, args.scale)
    shortest_s, bound = shortest_interval(chain, args.scale)
    interval_s = max(suggestion.interval_s * args.scale, shortest_s)
    interval = max(1, round(interval_s / (chain.step_s * args.scale)))
    print(
        f"  {suggestion.interruptions} failures in {suggestion.wall_h * args.scale:,.0f} h: MTBF "
        f"{suggestion.mtbf_h * args.scale:.1f} h; median save stall {suggestion.save_stall_s * args.scale:.3f} s; "
        f"Young/Daly interval {suggestion.interval_s * args.scale:,.0f} s, no shorter than {shortest_s:.1f} s "
        f"({bound}): {interval} steps"
    )
    print(f"  accounting {len(history.steps):,} steps took {took:.2f} s")
    tuned, _ = simulate(folder / "young-daly", chain, profile, recipe, interval, failures)
    report(f"saving every {interval} steps (Young/Daly)", goodput.of_run(tuned, "running",
           now=T0 + chain.horizon_s)[1], args.scale)  # fmt: skip
    compare_deadlines(folder, args, profile, recipe, interval)
    print(f"\nrun directories: {folder}")


if __name__ == "__main__":
    main()
