"""Slow ranks, found and acted on (docs/stragglers.md): every step's phases per rank, a score per host on rank 0,
and, for a host that stays slow, the cost test that decides whether the job saves and requeues without it.

Each rank times its step's phases (`PhaseClock`): data wait, forward+backward, the wait in the step's sync (a small
all-reduce right after the backward, where a fast rank waits for a slow one) and the optimizer. `StragglerWatch`
gathers them every step (one all-gather of four numbers per rank); rank 0 keeps a window of each host's compute time
(its slowest rank's forward+backward and optimizer: waiting is left out, or the slow one would hide among its
waiting peers), scores the hosts (`orchestrator.core.stragglers`), sends the per-host figures with the step's
metrics to MLflow, and writes them to `stragglers.json` for `orch status`. A host slow over the whole window is logged
once per job; the cost test decides whether to leave it, and where the profile lets the job act and leaving pays,
rank 0 asks for the stop a timeout asks for (`StopFlag`): every rank saves at the step boundary, rank 0 requeues
through submitit, and the requeued (pending) job gets the host in its exclusion list (Slurm refuses that change for
a running job).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist

from jobs.distributed import Ranks
from jobs.preemption import StopFlag, process_started
from jobs.system_metrics import node_name
from orchestrator.core import stragglers
from orchestrator.core.config import Profile
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import DamagedFile
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.stragglers import Decision, HostScore, Stragglers

log = logging.getLogger("orch.stragglers")
WRITE_EVERY_S = 2.0  # stragglers.json is rewritten at most this often (and at once on a persistent straggler)


@dataclass(frozen=True)
class Phases:
    """One rank's step, in seconds."""

    data_s: float
    forward_backward_s: float
    sync_s: float
    optimizer_s: float

    @property
    def compute_s(self) -> float:
        return self.forward_backward_s + self.optimizer_s


class PhaseClock:
    """Lap times of a step's phases; on a GPU the device is synchronized first, so that a lap is the kernels' time,
    not their launch's. Untimed (a job with no other host to compare with), it neither synchronizes nor adds the
    sync's collective: its laps are launch times, which nothing reads."""

    def __init__(self, device: torch.device, timed: bool) -> None:
        self.device, self.timed = device, timed
        self.last = self.now()

    def now(self) -> float:
        if self.timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        lap, self.last = now - self.last, now
        return lap

    def sync(self) -> float:
        """The step's sync: an all-reduce of nothing, timed. A rank waits here for the slowest rank's backward."""
        self.lap()
        if self.timed:
            dist.all_reduce(torch.zeros(1, device=self.device))
        return self.lap()


class StragglerWatch:
    """The job's straggler detection (all ranks take part in `observe`; rank 0 scores, records and decides)."""

    def __init__(
        self, run: Run, profile: Profile, ranks: Ranks, job_id: str, steps: int, save_s: float, stop: StopFlag
    ) -> None:
        self.run, self.profile, self.ranks, self.job_id, self.steps = run, profile, ranks, job_id, steps
        self.stop = stop
        self.spec, self.planned_save_s = profile.stragglers, save_s
        scheduler = scheduler_of(profile.executor)
        self.acting = scheduler.excludes_hosts and self.spec.act is not False
        self.hosts: list[str] = [""] * ranks.world
        dist.all_gather_object(self.hosts, node_name())
        self.compares = len(set(self.hosts)) > 1  # one host: nothing to compare it with, no phase to time
        self.window: deque[dict[str, float]] = deque(maxlen=self.spec.window_steps)
        self.step_times: deque[float] = deque(maxlen=self.spec.window_steps)
        self.saves: list[float] = []
        self.timed = 0  # steps of this job observed; its first (warm-up, compilation) is left out of the window
        self.startup_s: float | None = None
        self.decided: set[str] = set()  # hosts the cost test has judged in this job
        self.leaving: Decision | None = None
        self.figures = self.earlier_figures() if ranks.rank == 0 else None
        self.written, self.decided_now = 0.0, False

    def earlier_figures(self) -> Stragglers:
        """This run's decisions so far (the scores start afresh with each job)."""
        try:
            found = stragglers.read(self.run.dir)
        except DamagedFile as damage:
            log.warning("%s: its earlier decisions are not kept", damage)
            found = None
        decisions = found.decisions if found else []
        return Stragglers(job_id=self.job_id, step=0, window=self.spec.window_steps, scores=[], decisions=decisions)

    def observe(self, step: int, phases: Phases, step_s: float, stall_s: float) -> dict[str, float]:
        """Collective: every rank's phases of training step `step` to rank 0, which returns the per-host metrics
        (`straggler/HOST/...`; MLflow's system/straggler/HOST/...) and decides; {} elsewhere and in a one-host job.
        `stall_s`: the previous step's save stall, if any."""
        if not self.compares:
            return {}
        mine = torch.tensor(astuple(phases), dtype=torch.float64, device=self.ranks.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.ranks.world)]
        dist.all_gather(gathered, mine)
        if self.ranks.rank != 0:
            return {}
        if stall_s > 0:
            self.saves.append(stall_s)
        self.timed += 1
        if self.timed == 1:
            self.startup_s = time.time() - process_started()
            return {}
        by_host = self.slowest_rank_per_host([Phases(*t.tolist()) for t in gathered])
        self.window.append({host: p.compute_s for host, p in by_host.items()})
        self.step_times.append(step_s)
        scores = stragglers.score_hosts(list(self.window), self.spec.window_steps, self.spec.threshold)
        for score in scores:
            if score.persistent and score.host not in self.decided:
                self.persistent(step, score)
        self.record(step, scores)
        return self.metrics(by_host, scores)

    def slowest_rank_per_host(self, ranks: list[Phases]) -> dict[str, Phases]:
        found: dict[str, Phases] = {}
        for host, phases in zip(self.hosts, ranks, strict=True):
            if host not in found or phases.compute_s > found[host].compute_s:
                found[host] = phases
        return found

    def metrics(self, by_host: dict[str, Phases], scores: list[HostScore]) -> dict[str, float]:
        found = {}
        for host, phases in by_host.items():
            for field in ("data_s", "forward_backward_s", "sync_s", "optimizer_s", "compute_s"):
                found[f"straggler/{host}/{field}"] = getattr(phases, field)
        found.update({f"straggler/{s.host}/slowdown": s.slowdown for s in scores})
        return found

    def persistent(self, step: int, score: HostScore) -> None:
        """A host slow over the whole window: logged with its host, then the cost test; a decision to leave stops
        the job at this step boundary where the profile lets it act."""
        log.warning(
            "persistent straggler: host %s computes %.0f %% longer than the others (%.3f s against %.3f s, z %.1f) "
            "in each of the last %d steps",
            score.host, 100 * score.slowdown, score.compute_s, score.others_s, score.z, len(self.window),
        )  # fmt: skip
        decision = self.cost_test(step, score)
        if decision.leave and not self.acting:
            decision = decision.model_copy(update={"leave": False, "action": f"report only: {decision.action} "
                                                   "would pay, but stragglers.act is off"})  # fmt: skip
        elif decision.leave and self.leaving is None and not self.excluded_hosts([score.host]):
            decision = decision.model_copy(update={"leave": False, "action": f"keep {score.host}: the partition has "
                                                   "no other nodes for the job"})  # fmt: skip
        self.decided.add(score.host)
        log.warning(
            "%s: keeping it costs %.0f s (%.3f s × %d steps), leaving %.0f s (save %.1f + queue %.0f + start %.1f)",
            decision.action, decision.keep_loss_s, decision.excess_s, decision.steps_ahead, decision.leave_cost_s,
            decision.save_s, decision.queue_wait_s, decision.startup_s,
        )  # fmt: skip
        assert self.figures is not None
        self.figures.decisions.append(decision)
        self.decided_now = True
        if decision.leave and self.leaving is None:
            self.leaving = decision
            self.stop.signalled = True  # the stop a timeout asks for: save together, then requeue

    def cost_test(self, step: int, score: HostScore) -> Decision:
        """The figures: the run's measured queue waits (else the profile's), this job's start-up, its longest save
        stall or the plan's estimate of a save if longer, its median step and the time left in this allocation."""
        gaps = stragglers.restart_gaps(self.run.attempts)
        deadline = self.stop.deadline
        return stragglers.cost_test(
            score,
            job_id=self.job_id,
            step=step,
            step_s=statistics.median(self.step_times),
            steps_left=self.steps - step,
            allocation_left_s=(deadline - time.time()) if deadline is not None else float("inf"),
            save_s=max([*self.saves, self.planned_save_s]),
            queue_wait_s=statistics.median(gaps) if gaps else self.spec.queue_wait_s,
            startup_s=self.startup_s or 0.0,
            now=time.time(),
        )

    def record(self, step: int, scores: list[HostScore]) -> None:
        """stragglers.json: at most every WRITE_EVERY_S, and at once when a decision was made."""
        assert self.figures is not None
        now = time.time()
        if now - self.written < WRITE_EVERY_S and not self.decided_now:
            return
        self.figures = self.figures.model_copy(update={"step": step, "scores": scores})
        try:
            stragglers.write(self.run.dir, self.figures, durable=self.decided_now)
            self.written, self.decided_now = now, False
        except OSError as err:  # a full disk must not stop training; said once a write period
            log.warning("stragglers.json not written: %s", err)

    def excluded_hosts(self, new: list[str]) -> list[str]:
        """Every host the run left (its decisions, and `new`) together with the profile's own exclusions, where the
        partition keeps enough nodes without them; [] where it would not."""
        assert self.figures is not None
        hosts = sorted({*new, *(d.host for d in self.figures.decisions if d.leave)})
        scheduler = scheduler_of(self.profile.executor)
        kept = scheduler.excluding(self.profile, hosts)
        return [] if kept is self.profile else scheduler.excluded(kept)

    def requeue(self) -> None:
        """Rank 0, after the save: requeue (submitit's path, which exits), then keep the pending job off the hosts
        the run left."""
        try:
            self.stop.requeue()
        finally:
            if self.leaving is not None:
                excluded = self.excluded_hosts([self.leaving.host])
                if excluded:
                    scheduler_of(self.profile.executor).keep_off(self.job_id, excluded)
