"""`orch ui`: the MLflow UI over the runs' store, as a user sees it in a browser."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli.commands.analysis import app
from orchestrator.core.errors import OrchError
from orchestrator.core.settings import TRAINING_VIEW, UI_PORT
from tests.conftest import ROOT, free_port, orch, submitted_run_id

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
STEPS = 20


@dataclass(frozen=True)
class Served:
    port: int
    home: Path
    run_id: str
    mlflow_run_id: str
    experiment_url: str  # the address `orch ui` printed


def wait_until_answering(port: int, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    until = time.time() + timeout
    while time.time() < until:
        if server.poll() is not None:
            pytest.fail(f"orch ui exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"orch ui never answered on port {port}:\n{log.read_text()}")


def stop(server: subprocess.Popen) -> None:
    """The server and its workers share the process group that `start_new_session` gave them."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def start_ui(log: Path, *args: str) -> subprocess.Popen:
    """`orch ui ARGS` as a user starts it, its output in `log`, in a process group of its own (`stop` ends it)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "ui", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            cwd=ROOT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real tiny run in a fresh ORCH_HOME, and `orch ui` serving its store on a free port."""
    home = tmp_path_factory.mktemp("ui") / "orch-home"
    log = home.parent / "orch-ui.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORCH_HOME", str(home))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_id = submitted_run_id(
            orch("submit", "--profile", "local", "--recipe", "tiny", "--steps", str(STEPS), "--wait")
        )
        port = free_port()
        server = start_ui(log, "--port", str(port))
    try:
        wait_until_answering(port, server, log)
        printed = re.search(rf"Open: (http://127\.0\.0\.1:{port}/\S+)", log.read_text())
        assert printed, log.read_text()
        mlflow_run_id = json.loads((home / "runs" / run_id / "mlflow.json").read_text())["run_id"]
        yield Served(port, home, run_id, mlflow_run_id, printed.group(1))
    finally:
        stop(server)


def chromium() -> str:
    """The browser; CI must have it, elsewhere its absence skips the browser test."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium); CI never skips the browser test")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


def browse(url: str, profile: Path, *output: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on the page, given time for MLflow's charts to draw (they come late)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,3000",  # tall enough that MLflow draws every chart card of a run (it draws those in view)
        "--virtual-time-budget=60000",
        "--run-all-compositor-stages-before-draw",
    ]
    return subprocess.run([chromium(), *flags, *output, url], capture_output=True, text=True, timeout=240)


def chart_cards(dom: str) -> dict[str, str]:
    """The chart cards of the rendered page by their titles (a card's first title attribute), in the page's order."""
    cards = dom.split('data-testid="experiment-view-compare-runs-card"')[1:]
    return {re.search(r'title="([^"]+)"', card).group(1): card for card in cards}


def api(served: Served, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/api/2.0/mlflow/{path}", timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_ui_serves_the_runs_store_over_http(served: Served):
    history = api(served, f"metrics/get-history?run_id={served.mlflow_run_id}&metric_key=loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, STEPS + 1))
    run = api(served, f"runs/get?run_id={served.mlflow_run_id}")["run"]
    metrics, tags = {m["key"] for m in run["data"]["metrics"]}, {t["key"] for t in run["data"]["tags"]}
    assert {"system/grad_norm", "system/step_time_s"} <= metrics and "goodput/percent" in tags  # not Model metrics
    experiment = api(served, f"experiments/get?experiment_id={run['info']['experiment_id']}")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    assert served.experiment_url.endswith(f"/#/experiments/{run['info']['experiment_id']}/runs?{TRAINING_VIEW}")


@pytest.mark.slow
def test_ui_draws_the_runs_charts_loss_first_at_the_address_orch_status_prints(served: Served, tmp_path: Path):
    """MLflow lays out a run's charts by name, sections first: orch names its metrics so that the Model metrics tab
    holds the training curves only, loss first (orch's one-point goodput and its per-step job figures used to come
    first)."""
    status = orch("status", served.run_id, "--json", ORCH_HOME=str(served.home))
    printed = json.loads(status.stdout)["mlflow_page"]
    assert printed.startswith(f"http://127.0.0.1:{UI_PORT}/#/experiments/"), status.stdout + status.stderr
    page = printed.replace(f":{UI_PORT}/", f":{served.port}/", 1)
    assert page.endswith(f"/runs/{served.mlflow_run_id}/model-metrics?{TRAINING_VIEW}")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "orch-ui-run-page.png"
    screenshot.unlink(missing_ok=True)
    shot = browse(page, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert screenshot.is_file(), shot.stderr
    header = screenshot.read_bytes()[:24]
    assert header.startswith(b"\x89PNG") and int.from_bytes(header[16:20]) == 1400
    dump = browse(page, tmp_path / "profile-dom", "--dump-dom")
    cards = chart_cards(dump.stdout)
    assert list(cards) == ["loss", "lr", "tokens_per_s", "val_loss", "val_perplexity"], screenshot
    chart = cards["loss"]
    assert f"{served.run_id} (loss)" in chart  # the legend names the run
    assert 'class="main-svg"' in chart and 'class="js-line"' in chart  # plotly drew the curve
    assert chart.count('class="point"') == STEPS  # one marker per logged step


def test_ui_prints_the_remote_tracking_servers_address_and_exits(orch_home: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "https://mlflow.example.org"}
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "ui"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "https://mlflow.example.org" in result.stdout
    assert not orch_home.exists()


def test_ui_on_a_spooling_profile_creates_the_store_and_serves_an_empty_experiment(orch_home: Path):
    """Jobs of a spooling profile (Karolina's) never create the store: `orch ui` does, before its first metric."""
    port = free_port()
    log = orch_home.parent / "orch-ui.log"
    server = start_ui(log, "--profile", "local-gpu", "--port", str(port))
    try:
        wait_until_answering(port, server, log)
        printed = log.read_text()
        assert f"Created the tracking store {orch_home / 'mlflow.db'}" in printed
        experiment_id = re.search(rf"Open: http://127\.0\.0\.1:{port}/#/experiments/(\d+)", printed).group(1)
        search = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(search, timeout=30) as answer:
            assert json.load(answer).get("runs", []) == []
    finally:
        stop(server)


def test_ui_refuses_a_port_that_is_taken(orch_home: Path):
    orch_home.mkdir()
    (orch_home / "mlflow.db").touch()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        result = CliRunner().invoke(app, ["ui", "--port", str(holder.getsockname()[1])])
    assert isinstance(result.exception, OrchError)
    assert "another user may hold the port" in str(result.exception)
