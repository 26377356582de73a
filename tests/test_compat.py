"""The private and version-dependent library APIs that orch relies on (jobs/compat.py, orchestrator/core/compat.py):
each test fails when a library changes under its wrapper. tests/run.sh also runs them on the lowest versions that
pyproject.toml allows."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from jobs import compat
from orchestrator.core.compat import (
    LOCAL_CONTROLLER_PROGRAM,
    LOCAL_REQUEUE_RETURN_CODE,
    SUBMITIT_CONTROLLER_MODULE,
    SUBMITIT_TASK_MODULE,
    sbatch_script,
)
from tests.conftest import free_port, tiny_llama

# --- submitit -----------------------------------------------------------------------------------------------------


def test_the_dry_runs_sbatch_script_is_the_one_submit_hands_to_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import submitit

    handed = tmp_path / "handed.sh"
    fake_sbatch = tmp_path / "bin" / "sbatch"
    fake_sbatch.parent.mkdir()
    fake_sbatch.write_text(f'#!/bin/sh\ncp "$1" {handed}\necho "Submitted batch job 4242"\n')
    fake_sbatch.chmod(fake_sbatch.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_sbatch.parent}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.SlurmExecutor(folder=tmp_path / "jobs" / "%j")
    executor.update_parameters(job_name="orch-compat", nodes=2, ntasks_per_node=4, time=60)

    script = sbatch_script(executor)
    assert executor.submit(print).job_id == "4242"
    assert handed.read_text() == script
    assert "#SBATCH --nodes=2\n" in script and f"-m {SUBMITIT_TASK_MODULE} " in script


@pytest.fixture(scope="module")
def local_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LocalExecutor job whose task, on its first start, notes its own and its parent's command lines, then exits
    with the requeue code; started again, it returns."""
    import submitit

    folder = tmp_path_factory.mktemp("local-job")
    first_start = folder / "first_start"
    task = f"""
import os, pathlib
noted = pathlib.Path({str(first_start)!r})
if not noted.exists():
    lines = [open(f"/proc/{{pid}}/cmdline", "rb").read().replace(b"\\0", b" ") for pid in ("self", os.getppid())]
    noted.write_bytes(b"\\n".join([str(os.getppid()).encode(), *lines]))
    os._exit({LOCAL_REQUEUE_RETURN_CODE})
"""
    executor = submitit.LocalExecutor(folder=folder / "%j")
    executor.update_parameters(timeout_min=2)
    job = executor.submit(exec, task)
    result = job.result()
    parent, own_command, parent_command = first_start.read_bytes().split(b"\n")
    return {"job_id": job.job_id, "result": result, "parent": parent.decode(),
            "task": own_command.decode(), "controller": parent_command.decode()}  # fmt: skip


def test_a_local_jobs_controller_runs_as_the_module_its_job_id_is_recognised_by(local_job: dict[str, Any]):
    assert local_job["parent"] == local_job["job_id"]  # the task's parent, the controller, is the job id
    assert f"-m {SUBMITIT_CONTROLLER_MODULE} " in local_job["controller"]


def test_a_local_jobs_task_runs_as_the_module_the_benchmark_finds_ranks_by(local_job: dict[str, Any]):
    assert f"-m {SUBMITIT_TASK_MODULE} " in local_job["task"]


def test_a_task_that_exits_with_the_requeue_code_is_started_again_by_the_local_controller(local_job: dict[str, Any]):
    from submitit.local import local

    assert LOCAL_REQUEUE_RETURN_CODE == local.LOCAL_REQUEUE_RETURN_CODE
    assert local_job["result"] is None  # the second start ran the task to its end: exec returns None


def test_a_local_job_is_started_as_often_as_its_requeues_allow_beyond_submitits_six(tmp_path: Path):
    """submitit's own controller module stops after six starts; the one `Local.submission` runs gives every requeue
    the plan allows (here 7: eight starts), and is still recognised as the job's controller."""
    import submitit

    from orchestrator.core.loading import load_profile
    from orchestrator.core.schedulers.local import Local

    starts = tmp_path / "starts"
    task = f"""
import os, pathlib
starts = pathlib.Path({str(starts)!r})
with starts.open("a") as noted:
    noted.write(open(f"/proc/{{os.getppid()}}/cmdline", "rb").read().replace(b"\\0", b" ").decode() + "\\n")
if len(starts.read_text().splitlines()) < 8:
    os._exit({LOCAL_REQUEUE_RETURN_CODE})
"""
    _, profile = load_profile("local")
    with Local().submission(profile, tmp_path / "controller.log", max_requeues=7):
        executor = submitit.LocalExecutor(folder=tmp_path / "jobs" / "%j")
        executor.update_parameters(timeout_min=2)
        job = executor.submit(exec, task)
    assert job.result() is None  # the eighth start ran the task to its end
    controllers = starts.read_text().splitlines()
    assert len(controllers) == 8 and len(set(controllers)) == 1, controllers  # one controller started all eight
    assert LOCAL_CONTROLLER_PROGRAM in controllers[0] and controllers[0].split()[-1] == "8", controllers[0]


# --- accelerate ---------------------------------------------------------------------------------------------------


def test_after_the_reset_a_process_group_can_be_started_again_in_the_same_process(monkeypatch: pytest.MonkeyPatch):
    import torch.distributed as dist

    from jobs.distributed import start_process_group

    one_rank = dict(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    for name, value in {**one_rank, "OMP_NUM_THREADS": "1"}.items():  # else accelerate sets torch's threads
        monkeypatch.setenv(name, value)
    try:
        for _ in range(2):
            monkeypatch.setenv("MASTER_PORT", str(free_port()))
            assert start_process_group("cpu", "gloo").world == 1
            assert dist.is_initialized()
            dist.destroy_process_group()
            compat.reset_accelerate_state()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        compat.reset_accelerate_state()


# --- transformers -------------------------------------------------------------------------------------------------


def test_rotary_frequencies_are_outside_the_state_dict_and_materialised_as_a_fresh_model_has_them():
    import torch
    from transformers import LlamaForCausalLM

    reference = tiny_llama()
    with torch.device("meta"):
        model = LlamaForCausalLM(reference.config)
    model.to_empty(device="cpu")
    compat.materialise_rotary(model, "cpu")

    rotary = [name for name, _ in reference.named_buffers() if name.endswith("inv_freq")]
    assert rotary and not set(rotary) & set(reference.state_dict())
    buffers = dict(model.named_buffers())
    for name, value in reference.named_buffers():
        assert torch.equal(buffers[name], value), name


def test_activation_checkpointing_runs_each_decoder_layer_again_in_backward():
    import torch

    def forward_calls(model: torch.nn.Module) -> int:
        calls = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))  # in the checkpoint
        model(input_ids=torch.arange(8).reshape(1, 8), labels=torch.arange(8).reshape(1, 8)).loss.backward()
        return len(calls)

    checkpointed = tiny_llama()
    compat.enable_activation_checkpointing(checkpointed)
    assert (forward_calls(tiny_llama()), forward_calls(checkpointed)) == (1, 2)


def test_bytes_to_unicode_is_the_byte_level_alphabet_of_the_tokenizers_library():
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = compat.bytes_to_unicode()
    assert sorted(alphabet) == list(range(256))
    assert sorted(alphabet.values()) == sorted(ByteLevel.alphabet())
    assert (alphabet[ord(" ")], alphabet[ord("A")]) == ("Ġ", "A")


# --- torch --------------------------------------------------------------------------------------------------------


def test_set_last_lr_is_what_get_last_lr_returns_until_the_next_step():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    compat.set_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25]
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.5]


def test_compiled_graphs_counts_each_new_graph_once_until_forgotten():
    import torch

    double = torch.compile(lambda x: x * 2, backend="eager")
    compat.forget_compiled_graphs()
    double(torch.ones(2))
    double(torch.ones(2))
    assert compat.compiled_graphs() == 1
    compat.forget_compiled_graphs()
    assert compat.compiled_graphs() == 0
