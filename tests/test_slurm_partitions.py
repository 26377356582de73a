"""A Slurm profile's partition as Slurm itself reports it, checked before anything is submitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import make_plan
from orchestrator.core.preflight import MANY_ALLOCATIONS, check_against_slurm, check_allocations
from orchestrator.core.schedulers.slurm import PartitionFacts, partition_facts, slurm_minutes
from tests.conftest import needs_slurm, orch

# As `scontrol show partition --oneliner` prints them (Slurm 22.05), cut to the fields that matter.
QGPU = "PartitionName=qgpu Default=YES GraceTime=0 MaxNodes=16 MaxTime=2-00:00:00 MinNodes=0 PreemptMode=OFF State=UP"
PREEMPT = (
    "PartitionName=qgpu_preempt GraceTime=5 MaxNodes=UNLIMITED MaxTime=2-00:00:00 MinNodes=0 "
    "PreemptMode=REQUEUE State=UP"
)
PATH = Path("cluster_profiles/karolina.yaml")


def karolina(profile: str = "karolina", **layer):
    _, loaded = load_profile(profile, [{"slurm": {"account": "OPEN-00-00"}}, layer])
    _, recipe = load_recipe("cstinyllama-1.2b")
    return loaded, make_plan(loaded, recipe, 200_000)


def partitions(*lines: str) -> dict[str, PartitionFacts]:
    return {facts.name: facts for facts in map(partition_facts, lines)}


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("2-00:00:00", 2880),
        ("01:00:00", 60),
        ("00:02:00", 2),
        ("5", 5),
        ("5:30", 5.5),
        ("1-12", 2160),
        ("UNLIMITED", None),
    ],
)
def test_slurm_time_formats_read_as_minutes(text: str, minutes: float | None):
    assert slurm_minutes(text) == minutes


def test_a_scontrol_line_gives_the_partitions_limits():
    facts = partition_facts(PREEMPT)
    assert facts == PartitionFacts("qgpu_preempt", 2880, 0, None, 5, "REQUEUE", "UP")


def test_a_partition_the_cluster_lacks_is_refused_with_the_ones_it_has():
    profile, plan = karolina()
    with pytest.raises(OrchError, match=r"'slurm.partition' is 'qgpu'.*Allowed: qgpu_exp, qgpu_preempt"):
        check_against_slurm(profile, PATH, plan, partitions(PREEMPT, QGPU.replace("=qgpu ", "=qgpu_exp ")))


def test_a_time_limit_above_slurms_maxtime_is_refused_with_slurms_figure():
    profile, plan = karolina()
    shorter = QGPU.replace("MaxTime=2-00:00:00", "MaxTime=1-00:00:00")
    with pytest.raises(OrchError, match=r"MaxTime of 1440 min as Slurm reports it \(the profile assumed .* 2880\)"):
        check_against_slurm(profile, PATH, plan, partitions(shorter))


def test_nodes_outside_slurms_range_are_refused():
    profile, plan = karolina(nodes=2)
    big = QGPU.replace("MinNodes=0", "MinNodes=17").replace("MaxNodes=16", "MaxNodes=UNLIMITED")
    with pytest.raises(OrchError, match=r"2 node\(s\) is outside partition 'qgpu''s range .*MinNodes 17"):
        check_against_slurm(profile, PATH, plan, partitions(big))


def test_a_partition_as_the_profile_assumes_passes_without_notes():
    profile, plan = karolina()
    assert check_against_slurm(profile, PATH, plan, partitions(QGPU)) == []


def test_a_wrong_assumption_that_does_no_harm_is_noted():
    profile, plan = karolina()
    longer = QGPU.replace("MaxTime=2-00:00:00", "MaxTime=3-00:00:00").replace("State=UP", "State=DRAIN")
    notes = check_against_slurm(profile, PATH, plan, partitions(longer))
    assert any("MaxTime is 4320 min" in note for note in notes)
    assert any("DRAIN" in note for note in notes)


def test_a_grace_time_shorter_than_a_save_says_what_a_preemption_loses():
    profile, plan = karolina("karolina-preempt")
    assert plan.step_s + plan.save_s > 5
    (note,) = check_against_slurm(profile, PATH, plan, partitions(PREEMPT))
    assert "5 s (GraceTime)" in note and f"up to {plan.recipe.checkpoint.every_steps} steps" in note
    roomy = PREEMPT.replace("GraceTime=5", "GraceTime=600")
    assert check_against_slurm(profile, PATH, plan, partitions(roomy)) == []


def test_two_hundred_thousand_steps_on_the_express_partition_are_refused_unless_confirmed():
    profile, plan = karolina("karolina-exp")
    assert plan.allocations > MANY_ALLOCATIONS
    with pytest.raises(OrchError, match=r"allocations of 60 min on partition 'qgpu_exp'.*--many-allocations"):
        check_allocations(profile, PATH, plan, confirmed=False)
    check_allocations(profile, PATH, plan, confirmed=True)
    production, seed_plan = karolina()
    assert seed_plan.allocations <= MANY_ALLOCATIONS
    check_allocations(production, PATH, seed_plan, confirmed=False)


@needs_slurm
@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        ("slurm.partition=nope", "which this cluster does not have. Allowed: big, debug, short"),
        ("slurm.partition=short", "above partition 'short''s MaxTime of 2 min as Slurm reports it"),
        ("slurm.partition=big", "outside partition 'big''s range as Slurm reports it (MinNodes 2"),
    ],
)
def test_the_local_slurm_refuses_before_anything_is_written(orch_home: Path, override: str, refusal: str):
    result = orch("submit", "--profile", "local-slurm", "--steps", "5", "--set", override)
    assert result.returncode == 2, result.stderr
    assert refusal in result.stderr and "Traceback" not in result.stderr
    assert not (orch_home / "runs").exists() or not any((orch_home / "runs").iterdir())
