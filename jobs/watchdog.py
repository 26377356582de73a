"""Hang detection: a watchdog thread on every rank stops a job whose steps stopped finishing, and requeues it.

A hung collective (a peer frozen, dead or cut off) cannot be left cleanly: the training thread is blocked inside
the backend. So the training thread only notes what it is doing (`note`, `step_done`: attribute writes, no I/O),
and a thread per rank (`Watchdog`) writes that to `ranks/<job>.rank<N>.json`, with the time by which the phase
should be over (the profile's `watchdog` section). The ranks of a node take turns, so that a node rewrites one beat
every NODE_BEAT_S (a parallel filesystem's metadata server serves every node of every job), each rank at most a
third of the silence that counts as a hang:

- a step (phases data, forward_backward, optimizer, sync): max(min_step_s, step_factor × the median of this job's
  recent step times), or first_step_s until this job has timed a step after its first;
- the job's start, a checkpoint load, an evaluation or a save (phases start, load, eval, save): first_step_s.

While its own rank is within the step bound, a watchdog reads nothing. Past it, it reads the other ranks' beats and
declares a hang when a rank has been silent (its beat not rewritten: the process stopped or gone, its host cut off)
for longer than the step bound, or when every rank is past its own bound. The lowest rank that is not silent then
writes `hangs/<job>.<time>.json` (who was stuck, where), marks the attempt `hang` in attempts.json (the requeue-loop
guard counts it like a requeue of the job's own) and requeues the job, which resumes from its last committed
checkpoint:

- LocalExecutor: it kills the other ranks of the job (each with what it started) and exits with submitit's requeue
  code, on which the controller starts every task again;
- Slurm: `scontrol requeue <job>` (what submitit's own requeue runs); Slurm ends every task on every node and
  queues the job again.

The other ranks that saw the hang leave it to that rank, and act themselves if its requeue has not ended them
within ACTOR_GRACE_S.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from orchestrator.core.config import WatchdogSpec
from orchestrator.core.files import write_json_atomic
from orchestrator.core.runfiles import SILENT_S, DamagedFile, Hang, RankBeat, read_model
from orchestrator.core.schedulers import scheduler_of

log = logging.getLogger("orch.watchdog")
BEAT_S = 1.0  # how often a watchdog looks at its own rank (and, past its bound, at the others)
NODE_BEAT_S = 2.5  # a node's ranks together rewrite one beat this often: the run folder is on a shared filesystem
ACTOR_GRACE_S = 30.0
RECENT_STEPS = 20  # step times the median is taken over
SLOW_PHASES = frozenset({"start", "load", "eval", "save"})  # bounded by first_step_s: step times do not predict them
EXITED = "exited"  # the phase of a rank whose watchdog stopped with its training


class Notes:
    """What this rank is doing, noted by the training thread. (phase, step, since) is replaced as one tuple, which
    the watchdog thread reads without a lock; `since` restarts with each step and each slow phase."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.now: tuple[str, int, float] = ("start", 0, time.time())
        self.step_times: deque[float] = deque(maxlen=RECENT_STEPS)
        self.steps_done = 0

    def note(self, phase: str, step: int | None = None) -> None:
        current, noted, since = self.now
        if phase != current and (phase in SLOW_PHASES or current in SLOW_PHASES):
            since = time.time()
        self.now = (phase, noted if step is None else step, since)

    def step_done(self, step: int, seconds: float) -> None:
        """`step` steps are done, the last in `seconds`; the first of a job (compiling, warming up) is not timed."""
        if self.steps_done:
            self.step_times.append(seconds)
        self.steps_done += 1
        self.now = (self.now[0], step, time.time())


NOTES = Notes()  # one rank per process
note = NOTES.note
step_done = NOTES.step_done


class Watchdog:
    """The watchdog thread of one rank, for the duration of a `with` block (module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        job_id: str,
        rank: int,
        world: int,
        spec: WatchdogSpec,
        executor: str,
        on_hang: Callable[[], None],
        ranks_per_node: int = 1,
    ) -> None:
        self.run_dir, self.job_id, self.rank, self.world = run_dir, job_id, rank, world
        self.spec, self.executor, self.on_hang = spec, executor, on_hang
        self.host, self.pid, self.started = socket.gethostname(), os.getpid(), time.time()
        self.ranks_per_node = ranks_per_node
        # A node's ranks take turns: each starts its rhythm at its own offset.
        self.next_write = self.started + (rank % ranks_per_node) * self.write_period() / ranks_per_node
        self.written_slow = True  # whether the beat last written was of a slow phase ("start" is)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        NOTES.reset()
        self._write(self.beat(time.time()))
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10 * BEAT_S)
        self._write(self.beat(time.time()).model_copy(update={"phase": EXITED}))

    def beat_path(self, rank: int) -> Path:
        return self.run_dir / "ranks" / f"{self.job_id}.rank{rank}.json"

    def step_bound(self) -> float:
        times = list(NOTES.step_times)
        if not times:
            return self.spec.first_step_s
        return max(self.spec.min_step_s, self.spec.step_factor * statistics.median(times))

    def write_period(self) -> float:
        """How often this rank rewrites its beat: one beat per node every NODE_BEAT_S, but at most a third of the
        silence after which the others find it hung (`hung`), so that a live rank never looks silent; the watchdog's
        bounds are the same whatever the period."""
        silence = max(self.step_bound(), SILENT_S)
        return max(BEAT_S, min(self.ranks_per_node * NODE_BEAT_S, silence / 3))

    def beat(self, now: float) -> RankBeat:
        phase, step, since = NOTES.now
        bound = self.spec.first_step_s if phase in SLOW_PHASES else self.step_bound()
        return RankBeat(
            job_id=self.job_id, rank=self.rank, host=self.host, pid=self.pid, step=step, phase=phase, since=since,
            deadline=since + bound, updated=now, every_s=self.write_period(),
        )  # fmt: skip

    def _write(self, beat: RankBeat) -> None:
        try:
            write_json_atomic(self.beat_path(self.rank), beat.model_dump(), durable=False)
        except OSError as err:  # a full or stalled disk: the others will find this rank silent
            log.warning("could not write the rank's beat: %s", err)

    def _watch(self) -> None:
        while not self.stopped.wait(BEAT_S):
            self.look(time.time())

    def look(self, now: float) -> None:
        """Write this rank's beat when due, and at once when it enters a save, an evaluation or a load (whose longer
        deadline keeps peers past their step bound from taking it for hung); past its step bound, read the others'
        and act on a hang. A rank that finds the hang already reported by a peer (it was frozen, and the scheduler's
        requeue woke it) leaves: the job is requeued."""
        own = self.beat(now)
        slow, due = own.phase in SLOW_PHASES, now >= self.next_write
        if due or (slow and not self.written_slow):
            self._write(own)
            self.written_slow = slow
        if due:  # on the rank's own rhythm, whatever was written between
            self.next_write = max(self.next_write + own.every_s, now)
        bound = self.step_bound()
        if now - own.since <= bound:
            return
        beats = self.beats(own)
        if hung(beats, self.world, now, bound, self.started):
            if (known := reported(self.run_dir, self.job_id, self.started)) is not None:
                log.error("rank %d found this job hung and requeued it; rank %d leaves", known.detected_by, self.rank)
                exit_now(1)
            self.fire(beats, now, bound)

    def beats(self, own: RankBeat) -> dict[int, RankBeat]:
        """Every rank's last beat of this attempt of the job that can be read (this rank's own as it is now); a beat
        written before this attempt started (the same job before a requeue) counts as none."""
        found = {self.rank: own}
        for rank in range(self.world):
            if rank != self.rank:
                try:
                    beat = read_model(self.beat_path(rank), RankBeat)
                except DamagedFile:
                    beat = None
                if beat is not None and beat.updated >= self.started - SILENT_S:
                    found[rank] = beat
        return found

    def fire(self, beats: dict[int, RankBeat], now: float, bound: float) -> NoReturn:
        hang = Hang(
            job_id=self.job_id, detected_by=self.rank, time=now, bound_s=bound,
            stuck=stuck(beats, self.world, now), ranks=[beats[rank] for rank in sorted(beats)],
        )  # fmt: skip
        log.error("hang: %s; the job is requeued from its last checkpoint", hang.describe())
        actor = min(rank for rank, beat in beats.items() if rank == self.rank or not beat.silent(now))
        if actor != self.rank:
            log.error("rank %d requeues the job; rank %d acts itself if it has not within %.0f s", actor, self.rank,
                      ACTOR_GRACE_S)  # fmt: skip
            time.sleep(ACTOR_GRACE_S)
        try:
            write_json_atomic(self.run_dir / "hangs" / f"{self.job_id}.{int(now)}.json", hang.model_dump())
            self.on_hang()
        except Exception as err:  # noqa: BLE001 - the requeue must happen whatever the records
            log.error("could not record the hang: %s", err)
        requeue(self.executor, self.job_id, [beat for rank, beat in beats.items() if rank != self.rank])


def hung(beats: dict[int, RankBeat], world: int, now: float, step_bound: float, started: float) -> bool:
    """A rank silent (or never heard of) for longer than the step bound, or every rank past its own bound. Silence
    counts from SILENT_S up however short the bound: beats are rewritten only now and then (`write_period`). Once a
    rank has left training (finished, or failed and reported why) the job is ending, not hung: a collective that
    waits for it fails when its process ends."""
    if any(beat.phase == EXITED for beat in beats.values()):
        return False
    waiting = list(beats.values())
    silence = max(step_bound, SILENT_S)
    if any(now - beat.updated > silence for beat in waiting):
        return True
    if len(beats) < world:
        return now - started > silence
    return all(now > beat.deadline for beat in waiting)


def reported(run_dir: Path, job_id: str, since: float) -> Hang | None:
    """The hang a rank of the job reported after `since` (when this rank's processes started): the job is being
    requeued, and what still fails in it is that hang's aftermath."""
    for path in sorted((run_dir / "hangs").glob(f"{job_id}.*.json")):
        try:
            hang = read_model(path, Hang)
        except DamagedFile:
            continue
        if hang is not None and hang.time >= since:
            return hang
    return None


def stuck(beats: dict[int, RankBeat], world: int, now: float) -> list[int]:
    """The ranks the others wait for: those silent or never heard of; where there are none, those with the fewest
    steps done."""
    silent = [rank for rank, beat in beats.items() if beat.silent(now)]
    silent += [rank for rank in range(world) if rank not in beats]
    if silent:
        return sorted(silent)
    behind = min(beat.step for beat in beats.values())
    return sorted(rank for rank, beat in beats.items() if beat.step == behind)


def requeue(executor: str, job_id: str, peers: list[RankBeat]) -> NoReturn:
    """End this job so that its scheduler starts it again (module docstring)."""
    exit_now(scheduler_of(executor).requeue(job_id, [peer.pid for peer in peers]))


def exit_now(code: int) -> NoReturn:
    """The training thread is blocked in a collective: the process ends from here, without unwinding it."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
