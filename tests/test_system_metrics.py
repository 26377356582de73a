"""System metrics per node: the sampler's fields, the spool files' reading, and a run's samples in MLflow, once."""

import json
import logging
import os
import time

import mlflow
import pytest

from jobs.system_metrics import Sampler, SystemMonitor, node_name, offset_through, read_from, spool_files
from jobs.tracking import system_sent_in
from orchestrator.core.runfiles import MlflowState, read_model
from tests.conftest import orch, run_dir_of, submitted_run_id

HOST_FIELDS = {"cpu_percent", "memory_used_gb", "memory_percent", "load_1m", "ranks_rss_gb"}


def samples_of(monitor: SystemMonitor, count: int, timeout: float = 60) -> list[dict]:
    """Until the monitor has written `count` samples (then stopped: one more, the last)."""
    until = time.time() + timeout
    while time.time() < until:
        if monitor.path.is_file() and len(read_from(monitor.path, 0)[0]) >= count:
            break
        time.sleep(0.01)
    monitor.stop()
    return read_from(monitor.path, 0)[0]


def nvml_answers() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # noqa: BLE001 - not installed, no driver
        return False


def test_samples_have_plausible_host_fields_the_training_step_and_no_gpu_fields_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monitor = SystemMonitor.start(tmp_path, "123", 0.05, False, lambda: 7)
    samples = samples_of(monitor, 3)
    assert monitor.path == tmp_path / "system" / f"123.{node_name()}.jsonl"
    assert len(samples) >= 4  # three at the interval, one when stopped
    assert [s["time_ms"] for s in samples] == sorted(s["time_ms"] for s in samples)
    for sample in samples:
        metrics = sample["metrics"]
        assert set(metrics) == HOST_FIELDS and sample["step"] == 7
        assert 0 <= metrics["cpu_percent"] <= 100
        assert 0 < metrics["memory_used_gb"] and 0 < metrics["memory_percent"] <= 100
        assert metrics["load_1m"] >= 0 and metrics["ranks_rss_gb"] > 0  # this process at least


def test_gpu_fields_come_from_nvml_where_it_answers_and_are_left_out_with_one_log_line_elsewhere(caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.system_metrics"):
        sampler = Sampler(gpus=True)
        sample = sampler.sample()
        sampler.close()
    if nvml_answers():
        assert 0 <= sample["gpu0_util_percent"] <= 100 and 0 < sample["gpu0_temperature_c"] < 120
        assert sample["gpu0_memory_used_gb"] >= 0 and sample["gpu0_power_w"] > 0
    else:
        assert set(sample) == HOST_FIELDS
        assert len([r for r in caplog.records if "NVML unavailable" in r.getMessage()]) == 1


def test_only_each_nodes_local_rank_0_samples_and_interval_0_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert SystemMonitor.start(tmp_path, "123", 10, False, lambda: 0) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert SystemMonitor.start(tmp_path, "123", 0, False, lambda: 0) is None
    assert not (tmp_path / "system").exists()


def test_a_file_being_written_is_read_in_whole_lines_each_once(tmp_path):
    path = tmp_path / "7.node1.jsonl"
    lines = [json.dumps({"time_ms": 1000 * i, "step": i, "metrics": {"cpu_percent": i}}) + "\n" for i in (1, 2, 3)]
    path.write_text(lines[0] + "not json\n" + lines[1] + lines[2][:10])  # a garbled line, one being written
    first, offset = read_from(path, 0)
    assert [s["step"] for s in first] == [1, 2] and offset == len(lines[0] + "not json\n" + lines[1])
    with path.open("a") as f:
        f.write(lines[2][10:])
    rest, end = read_from(path, offset)
    assert [s["step"] for s in rest] == [3] and end == path.stat().st_size
    assert read_from(path, end) == ([], end)
    assert offset_through(path, 2000) == offset and offset_through(path, None) == 0  # how far MLflow has it


@pytest.mark.slow
def test_a_run_sends_its_nodes_system_metrics_to_mlflow_each_sample_once(orch_home):
    run_id = submitted_run_id(orch("submit", "--steps", "6", "--set", "system_metrics_interval_s=0.5", "--wait"))
    run_dir = run_dir_of(orch_home, run_id)
    [path] = spool_files(run_dir)  # one node: one file, JOB.NODE.jsonl
    samples, size = read_from(path, 0)
    state = json.loads((run_dir / "mlflow.json").read_text())
    assert state["system_sent"] == {path.name: size} == {path.name: path.stat().st_size}

    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    history = client.get_metric_history(state["run_id"], f"system/{node_name()}/cpu_percent")
    pairs = [(m.step, m.timestamp) for m in history]
    assert len(pairs) >= 1 and len(pairs) == len(set(pairs))  # each sample once
    assert sorted(pairs) == sorted((s["step"], s["time_ms"]) for s in samples)  # and every one
    assert max(step for step, _ in pairs) <= 6
    assert system_sent_in(client, state["run_id"], run_dir) == state["system_sent"]  # found again without mlflow.json


@pytest.mark.slow
def test_spooling_jobs_leave_system_metrics_to_orch_sync(orch_home):
    args = ("--steps", "6", "--set", "system_metrics_interval_s=0.5", "--set", "job_tracking=spool", "--wait")
    run_id = submitted_run_id(orch("submit", *args))
    run_dir = run_dir_of(orch_home, run_id)
    assert not (orch_home / "mlflow.db").exists()
    [path] = spool_files(run_dir)
    samples, _ = read_from(path, 0)

    assert orch("sync").returncode == 0
    assert orch("sync").returncode == 0  # nothing is due again
    state = json.loads((run_dir / "mlflow.json").read_text())
    assert state["system_sent"] == {path.name: os.path.getsize(path)}
    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    history = client.get_metric_history(state["run_id"], f"system/{node_name()}/memory_used_gb")
    assert sorted((m.step, m.timestamp, m.value) for m in history) == sorted(
        (s["step"], s["time_ms"], s["metrics"]["memory_used_gb"]) for s in samples
    )


def test_mlflow_json_of_an_older_version_still_reads(tmp_path):
    path = tmp_path / "mlflow.json"
    path.write_text(json.dumps({"run_id": "abc", "sent_through": 5}))
    assert read_model(path, MlflowState).system_sent is None  # not known: found from MLflow's histories
