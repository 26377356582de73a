"""Cluster profiles: inheritance, overrides, the generated Slurm job, and every check before submission."""

import re
from pathlib import Path

import pytest

from orchestrator.cli.executors import from_frozen_code, job_script
from orchestrator.cli.submit import build_request
from orchestrator.core.compat import SUBMITIT_TASK_MODULE
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_profile, parse_assignment
from tests.conftest import ROOT, orch
from tests.test_cli_input import assert_refused

KAROLINA_2_NODES = [
    "--profile",
    "karolina",
    "--recipe",
    "cstinyllama-1.2b",
    "--steps",
    "200000",
    "--account",
    "OPEN-29-12",
    "--nodes",
    "2",
]


def test_karolina_sbatch_script_for_two_nodes_has_the_expected_directives():
    request = build_request(
        "karolina", "cstinyllama-1.2b", 200_000, [{"slurm": {"account": "OPEN-29-12"}}, {"nodes": 2}]
    )
    run_dir = Path("/scratch/project/open-29-12/orch/runs/RUN")
    script = job_script(from_frozen_code(request.profile, run_dir / "code"), request.plan, run_dir)
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--cpus-per-task=16",
        "--gpus-per-node=8",
        "--time=2880",
        "--partition=qgpu",
        "--account=OPEN-29-12",
        "--signal=USR2@300",
        "--job-name=orch-RUN",
    ):
        assert f"#SBATCH {directive}\n" in script
    assert "export ORCH_VENV=/scratch/project/open-29-12/orch/venv\n" in script
    assert f"source {run_dir}/code/envs/karolina.sh\n" in script  # the run's frozen copy, not the checkout's
    assert f"export PYTHONPATH={run_dir}/code\nexport PYTHONSAFEPATH=1\n" in script
    assert "srun --unbuffered" in script and f"-m {SUBMITIT_TASK_MODULE}" in script
    assert "#SBATCH --requeue\n" in script and "--wckey" not in script  # requeue always; no wckey the site may refuse
    assert "--cpus-per-task=16 --kill-on-bad-exit=1 python" in script  # srun gets both itself


def test_the_design_cards_command_plans_the_seed_recipe_and_says_the_demo_corpus_needs_replacing():
    result = orch("submit", "--profile", "karolina", "--steps", "200000", "--account", "OPEN-00-00", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "karolina / cstinyllama-1.2b" in result.stdout and "DEMO CORPUS" in result.stdout


def test_a_real_submission_of_the_demo_corpus_on_a_cluster_profile_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    result = orch("submit", "--profile", "karolina", "--steps", "10", "--account", "OPEN-00-00")
    assert result.returncode == 2 and "demo_data: false" in result.stderr and "orch data prepare" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "home" / "runs").exists()


def explicit_recipe(folder: Path, micro_batch: int) -> str:
    """The seed recipe with its auto train settings written out: this micro batch, no compile, no checkpointing."""
    written = {"micro_batch_size": micro_batch, "compile": "false", "activation_checkpointing": "false"}
    text = (ROOT / "recipes/cstinyllama-1.2b.yaml").read_text()
    for field, value in written.items():
        text = text.replace(f"{field}: auto", f"{field}: {value}")
    path = folder / f"micro{micro_batch}.yaml"
    path.write_text(text)
    return str(path)


def test_a_batch_that_does_not_divide_names_the_micro_batches_and_node_counts_that_do(tmp_path: Path):
    args = ["--profile", "karolina", "--recipe", explicit_recipe(tmp_path, 8), "--steps", "10", "--account", "X"]
    result = orch("submit", *args, "--nodes", "16", "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Micro batches that divide at 16 node(s): 1, 2, 4." in result.stderr  # 512 / (4 × 128 ranks) = 1
    assert "Node counts that work with micro batch 8: 1, 2, 4, 8." in result.stderr


def test_karolina_plan_numbers():
    plan = build_request("karolina", "cstinyllama-1.2b", 200_000, [{"slurm": {"account": "X"}}, {"nodes": 2}]).plan
    assert (plan.world_size, plan.grad_accum, plan.total_tokens) == (16, 4, 200_000 * 512 * 2048)
    assert plan.allocations == 5
    assert 30 < plan.peak_memory_gb < 40


def test_dry_run_prints_the_plan_and_submits_nothing(orch_home: Path):
    result = orch("submit", *KAROLINA_2_NODES, "--dry-run")
    assert result.returncode == 0, result.stderr
    for text in ("16 ranks", "8 × 4 per rank", "209.7 B", "allocations", "node-hours", "of 40 GB", "#SBATCH --nodes=2"):
        assert text in result.stdout
    assert not (orch_home / "runs").exists()


def test_exp_profile_inherits_hardware_and_overrides_the_partition():
    _, exp = load_profile("karolina-exp")
    _, base = load_profile("karolina")
    assert (exp.slurm.partition, exp.slurm.max_walltime_min, exp.time_limit_min) == ("qgpu_exp", 60, 60)
    assert exp.node == base.node and exp.launch == base.launch and exp.slurm.cpus_per_task == 16


def test_command_line_overrides_win_over_the_file():
    _, profile = load_profile("karolina", [parse_assignment("slurm.qos=normal"), parse_assignment("nodes=4")])
    assert (profile.slurm.qos, profile.nodes, profile.world_size) == ("normal", 4, 32)


def test_extends_cycle_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("orchestrator.core.loading.PROFILES_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(OrchError, match="without cycles"):
        load_profile("a")


class TestChecksBeforeSubmission:
    def test_missing_account_says_how_to_set_it(self, orch_home):
        args = [a for a in KAROLINA_2_NODES if a not in ("--account", "OPEN-29-12")]
        assert_refused(orch("submit", *args), "needs an account", "--account PROJECT-ID")

    def test_time_above_the_partition_maximum(self, orch_home):
        assert_refused(orch("submit", *KAROLINA_2_NODES, "--time", "2-01:00:00"), "above partition 'qgpu''s maximum")

    def test_nodes_above_the_partition_limit(self, orch_home):
        assert_refused(orch("submit", *KAROLINA_2_NODES, "--nodes", "20"), "20 nodes is above", "limit of 16")

    def test_three_nodes_do_not_divide_the_global_batch(self, orch_home):
        assert_refused(
            orch("submit", *KAROLINA_2_NODES, "--nodes", "3"),
            "micro batch 1 × world size 24 = 24",
            "Node counts that work with any micro batch: 1, 2, 4, 8, 16",
        )

    def test_memory_above_the_gpu(self, orch_home, tmp_path: Path):
        args = [*KAROLINA_2_NODES[:2], "--recipe", explicit_recipe(tmp_path, 16), *KAROLINA_2_NODES[4:], "--nodes", "1"]
        assert_refused(orch("submit", *args), "Estimated peak memory", "above the 40 GB of A100-SXM4-40GB")

    @pytest.mark.parametrize(
        "args",
        [
            ["--account", "OPEN-1; rm -rf ~"],
            ["--set", "slurm.qos=$(reboot)"],
            ["--set", "env_vars.NCCL_DEBUG=INFO`id`"],
            ["--set", "paths.venv=/tmp/a b"],
        ],
    )
    def test_values_that_could_inject_shell_are_refused(self, orch_home, args):
        assert_refused(orch("submit", *KAROLINA_2_NODES, *args), "may only contain", "reaches the job script")

    def test_line_breaks_in_overrides_are_refused(self, orch_home):
        assert_refused(
            orch("submit", *KAROLINA_2_NODES, "--set", "slurm.partition=qgpu\n#SBATCH --exclusive"),
            "may not contain line breaks",
        )

    @pytest.mark.parametrize("field", ["partition", "account", "qos"])
    def test_newline_or_nul_in_a_profile_value_is_refused(self, field):
        for bad in ("qgpu\n#SBATCH --exclusive", "qgpu\x00"):
            with pytest.raises(OrchError, match="may only contain"):
                build_request("karolina", "cstinyllama-1.2b", 10, [{"slurm": {"account": "X", field: bad}}])

    def test_sbatch_directive_outside_the_allow_list(self, orch_home):
        assert_refused(
            orch("submit", *KAROLINA_2_NODES, "--set", "slurm.extra_sbatch.wrap=sh"),
            "sbatch directive 'wrap' is not allowed",
        )


@pytest.mark.parametrize(
    ("assignments", "said"),
    [
        (["launch.tasks_per_node=4"], "a CUDA job runs one rank per GPU"),
        (["slurm.cpus_per_task=32"], "more than node.cores (128)"),
    ],
)
def test_ranks_that_do_not_match_the_nodes_gpus_or_cores_are_refused(assignments, said):
    with pytest.raises(OrchError, match=re.escape(said)):
        load_profile("karolina", [parse_assignment(a) for a in assignments])
