"""What a run's jobs say about where and why they stop and start: a resumed run keeps off the hosts its jobs left for
slowness (orchestrator/cli/submit.py `kept_off`, docs/stragglers.md) unless the user takes them back; a job that
stops to be requeued says what for (jobs/progress_log.py `stop_cause`); `--nodes` is read in one place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.progress_log import stop_cause, stop_line
from orchestrator.cli.commands.shapes import NodesAsked, parse_nodes
from orchestrator.cli.submit import kept_off
from orchestrator.core import deadline, stragglers
from orchestrator.core.config import Profile
from orchestrator.core.deadline import Deadline, End, Lead
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_profile
from orchestrator.core.rundir import Run
from orchestrator.core.schedulers import slurm
from orchestrator.core.schedulers.local import Local
from orchestrator.core.stragglers import Decision, Stragglers

PARTITION = ["orch-n1", "orch-n2", "orch-n3"]


class FixedPartition(slurm.Slurm):
    """Slurm's exclusions over a partition of known nodes, recording the hosts each job is asked to keep off."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes, self.asked = nodes, []

    def excluding(self, profile: Profile, hosts: list[str]) -> Profile:
        self.asked.append(hosts)
        return slurm.excluding(profile, hosts, lambda partition: self.nodes)


def decision(host: str, leave: bool, job_id: str = "84", step: int = 9, slowdown: float = 6.59) -> Decision:
    return Decision(job_id=job_id, step=step, host=host, slowdown=slowdown, excess_s=5.0, steps_ahead=31,
                    keep_loss_s=154, save_s=0, queue_wait_s=0, startup_s=70, leave_cost_s=70,
                    action=f"requeue without {host}" if leave else f"keep {host}", leave=leave, time=0)  # fmt: skip


def run_with(tmp_path: Path, *decisions: Decision) -> Run:
    run = Run(tmp_path / "run")
    run.dir.mkdir()
    stragglers.write(run.dir, Stragglers(job_id="84", step=40, window=3, scores=[], decisions=list(decisions)))
    return run


def two_node_profile(**slurm_fields: object) -> Profile:
    return load_profile("local-slurm-2node", [{"slurm": slurm_fields}] if slurm_fields else [])[1]


def test_a_resume_keeps_off_the_host_its_jobs_left_for_slowness_and_says_so(tmp_path: Path):
    run = run_with(tmp_path, decision("orch-n3", leave=False, step=5), decision("orch-n2", leave=True))
    scheduler = FixedPartition(PARTITION)
    queued, notes = kept_off(run, two_node_profile(), scheduler)
    assert scheduler.asked == [["orch-n2"]]  # a host the cost test kept is not left
    assert queued.slurm is not None and queued.slurm.extra_sbatch["exclude"] == "orch-n2"
    assert notes == [
        "excluding orch-n2, left for slowness at step 9 (+659 %) (`orch resume --include-slow-hosts` takes it back)"
    ]


def test_the_profile_s_own_exclusions_stay_beside_the_left_host(tmp_path: Path):
    run = run_with(tmp_path, decision("orch-n2", leave=True))
    queued, _ = kept_off(run, two_node_profile(extra_sbatch={"exclude": "orch-n4"}), FixedPartition([*PARTITION,
                         "orch-n4"]))  # fmt: skip
    assert queued.slurm is not None and queued.slurm.extra_sbatch["exclude"] == "orch-n2,orch-n4"


def test_include_slow_hosts_takes_the_left_hosts_back(tmp_path: Path):
    run = run_with(tmp_path, decision("orch-n2", leave=True))
    scheduler = FixedPartition(PARTITION)
    queued, notes = kept_off(run, two_node_profile(), scheduler, include_slow_hosts=True)
    assert scheduler.asked == [[]] and "exclude" not in queued.slurm.extra_sbatch  # type: ignore[union-attr]
    assert notes == ["orch-n2, left for slowness at step 9 (+659 %), is included (--include-slow-hosts)"]


def test_a_left_host_the_partition_cannot_spare_is_kept_and_said_so(tmp_path: Path):
    run = run_with(tmp_path, decision("orch-n2", leave=True))
    queued, [note] = kept_off(run, two_node_profile(), FixedPartition(PARTITION[:2]))
    assert "exclude" not in queued.slurm.extra_sbatch  # type: ignore[union-attr]
    assert note.startswith("not excluding orch-n2, left for slowness") and "too few nodes for the job's 2" in note


def test_a_scheduler_that_cannot_exclude_hosts_says_so(tmp_path: Path):
    run = run_with(tmp_path, decision("orch-n2", leave=True))
    profile = load_profile("local")[1]
    queued, [note] = kept_off(run, profile, Local())
    assert queued == profile and "the local scheduler cannot keep a job off hosts" in note


def test_a_run_that_left_no_host_asks_for_no_exclusion(tmp_path: Path):
    run = Run(tmp_path / "run")
    run.dir.mkdir()
    scheduler = FixedPartition(PARTITION)
    assert kept_off(run, two_node_profile(), scheduler) == (two_node_profile(), [])
    assert scheduler.asked == [[]]


def test_a_damaged_stragglers_file_is_named_and_excludes_nothing_for_slowness(tmp_path: Path):
    run = Run(tmp_path / "run")
    run.dir.mkdir()
    (run.dir / stragglers.FILE).write_text("{")
    _, [note] = kept_off(run, two_node_profile(), FixedPartition(PARTITION))
    assert note.startswith("damaged: stragglers.json") and "no host is kept off for slowness" in note


# --- what a requeued job stopped for --------------------------------------------------------------------------------


def stopped_at(run: Run, source: str, step: int, job_id: str = "84") -> None:
    chosen = Deadline(End(1000.0, source), Lead(1.0, 10, 4.0, True))
    deadline.append_record(run.dir, deadline.record(job_id, chosen, 990.0, stopped_step=step))


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("reservation maint", "before the reservation maint"),
        ("time limit", "at the time limit"),
        ("warning signal", "at a warning signal"),
    ],
)
def test_a_requeued_job_says_which_end_it_stopped_for(tmp_path: Path, source: str, said: str):
    run = run_with(tmp_path)
    stopped_at(run, "time limit", 4, job_id="83")  # an earlier job's stop says nothing of this one
    stopped_at(run, source, 12)
    assert stop_cause(run.dir, "84", 12) == said
    assert stop_line("requeued", 12, 40, 12, said) == (
        f"stopping at step 12/40, {said}, requeued: the next start resumes from the checkpoint at step 12"
    )


def test_a_job_that_stops_to_leave_a_slow_host_says_so(tmp_path: Path):
    run = run_with(tmp_path, decision("orch-n2", leave=True))
    stopped_at(run, "time limit", 9)  # the deadline it followed is recorded with the stop, but did not cause it
    assert stop_cause(run.dir, "84", 9) == "to leave the slow host orch-n2"


def test_without_a_record_of_its_stop_a_job_stopped_at_the_time_limit_s_signal(tmp_path: Path):
    run = Run(tmp_path / "run")
    run.dir.mkdir()
    assert stop_cause(run.dir, "84", 9) == "at the time limit"
    (run.dir / deadline.FILE).write_text(json.dumps([{"job_id": 84}]))
    assert stop_cause(run.dir, "84", 9) == "at the time limit"


# --- --nodes ----------------------------------------------------------------------------------------------------------


def test_nodes_is_a_count_a_range_or_a_list():
    assert parse_nodes("2") == NodesAsked([2])
    assert parse_nodes(" 1 - 4") == NodesAsked([4], low=1)
    assert parse_nodes("1,2,4,8") == NodesAsked([1, 2, 4, 8])
    for bad, said in (("2-1", "a node range is MIN-MAX"), ("1,1", "a list of distinct numbers"), ("0", "allowed")):
        with pytest.raises(OrchError, match=said):
            parse_nodes(bad)
