"""The README's "Running on Karolina", run as written on the simulated Karolina of envs/karolina-sim.sh
(docs/karolina-sim.md): its `bash` blocks in order, each in a new login shell on the login host (after step 3's
lines, as the README says every new shell needs), with only the substitutions in SUBSTITUTIONS. When the README
changes, this test runs the new words.

Along the way the run meets what a Karolina run meets: a time-limit requeue, a preemption on qgpu_preempt by a
higher-priority job (saved within GraceTime, requeued by Slurm, continued), and at the end its per-step losses equal
those of a run that was never interrupted."""

from __future__ import annotations

import json
import math
import re
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.core import deadline
from orchestrator.core.checkpoints import committed_step
from orchestrator.core.rundir import Run
from orchestrator.core.settings import TRAINING_VIEW
from tests.conftest import ROOT, free_port, spooled_losses, submitted_run_id, wait_until
from tests.test_ui import browse, chart_cards

pytestmark = pytest.mark.slow
SIM = ROOT / "envs" / "karolina-sim.sh"
PROJECT = Path("/scratch/project/open-00-00")
ORCH = PROJECT / "orch"
HOME = Path("/var/lib/karolina-sim/home")
CHECKOUT = HOME / "orch"
CONF = "/etc/slurm-two-node/slurm.conf"
LIMIT_MIN = 3  # the time limit of each allocation of the rehearsal's job
HEADROOM_S = 6  # a shortened end comes this long beyond the job's lead and its poll (a step, the scheduler's answer)

# What cannot be real here, and what stands in for it. Every other word of the README's blocks runs as written.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"open-xx-yy", "open-00-00", "a project id (and its scratch folder)"),
    (r"OPEN-XX-YY", "OPEN-00-00", "a project id, as Slurm's account"),
    (r"<this repository>", str(ROOT), "the checkout under test"),
    (r"--profile karolina(-exp|-preempt|-cpu)?\b(?!-)", r"--profile karolina-sim\1", "the simulated profiles"),
    (r"--vocab-size 64000", "--vocab-size 512", "a vocabulary the tiny model holds"),
    (r"extends: cstinyllama-1\.2b", "extends: tiny", "a model a CPU trains in seconds"),
]


def readme_blocks() -> dict[str, str]:
    """The Karolina section's bash blocks, named by their step's first command."""
    section = (ROOT / "README.md").read_text().split("## Running on Karolina", 1)[1].split("\n## ", 1)[0]
    blocks = [textwrap.dedent(b) for _, b in re.findall(r"^( *)```bash\n(.*?)^\1```", section, flags=re.M | re.S)]
    named = {
        "login": "git clone",
        "build": "bash envs/karolina.sh",
        "shell": "source envs/karolina.sh",
        "data": "orch data prepare",
        "plan": "--dry-run",
        "doctor": "orch doctor",
        "submit": "orch submit",
        "watch": "orch ui",
        "tunnel": "ssh -N -L",
        "score": "orch export",
    }
    found = {name: [b for b in blocks if marker in b] for name, marker in named.items()}
    found["submit"] = [b for b in found["submit"] if "--dry-run" not in b]
    assert all(len(b) == 1 for b in found.values()), f"each step's block once: {found}"
    assert len(blocks) == len(named), f"a block this test does not know: {blocks}"
    return {name: b[0] for name, b in found.items()}


def substituted(block: str, **extra: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        block = re.sub(pattern, replacement, block)
    for word, value in extra.items():
        block = block.replace(word, value)
    return block


def shell(commands: str, online: bool = False, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """COMMANDS in a new login shell on the login host (`online`: in this machine's network, which reaches the
    package registry as a Karolina login node reaches the internet)."""
    return subprocess.run(
        ["bash", str(SIM), "online" if online else "login", commands],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def slurm(*command: str, check: bool = False) -> str:
    """A Slurm command against the simulated Karolina's controller (`check`: one that must succeed)."""
    done = subprocess.run(command, capture_output=True, text=True, env={"SLURM_CONF": CONF})
    assert not check or done.returncode == 0, done.stderr
    return done.stdout.strip()


def squeue(job_id: str, fmt: str) -> str:
    return slurm("squeue", "-h", "-j", job_id, "-o", fmt)


def restarts(job_id: str) -> int:
    """How often Slurm has started the job again (requeues)."""
    found = re.search(r"Restarts=(\d+)", slurm("scontrol", "show", "job", job_id))
    return int(found[1]) if found else 0


def logs(run: Run, rank: str = "0") -> str:
    """What a rank (`*`: every rank) of every job of the run logged."""
    return "".join(p.read_text(errors="replace") for p in sorted(run.submitit_dir.glob(f"*/*_{rank}_log.err")))


def corpus(folder: Path) -> None:
    """A few hundred short Czech-like documents (the project's tests make their own data)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "praha brno řeka hora město les pole dům cesta voda slunce vítr kniha škola práce den noc rok".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + "." for i in range(600)]
    (folder / "cs.txt").write_text("\n\n".join(" ".join(lines[i : i + 3]) for i in range(0, 600, 3)) + "\n")


@pytest.fixture(scope="module")
def karolina() -> None:
    """The simulated Karolina, with its scratch and home cleared and its queue empty."""
    subprocess.run(["bash", str(SIM)], check=True, capture_output=True, timeout=600)
    slurm("scancel", "--full", "--user=root")
    wait_until(lambda: not slurm("squeue", "--noheader"), "the queue to empty")  # its jobs write no more
    shell("tmux kill-server")  # an orch ui an earlier rehearsal left on the login host
    subprocess.run(["rm", "-rf", str(ORCH), str(CHECKOUT)], check=True)


def mlflow_api(port: int, path: str, body: dict | None = None) -> dict:
    """MLflow's REST API through the tunnel: a GET, or a POST of `body`."""
    data = json.dumps(body).encode() if body is not None else None
    ask = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(ask, timeout=30) as answer:
        return json.loads(answer.read())


def forward(port: int, socket_path: Path) -> list[subprocess.Popen]:
    """This machine's 127.0.0.1:`port` to the login host's 127.0.0.1:5000, through a Unix socket between the two
    network namespaces: what `ssh -N -L 5000:localhost:5000 USER@login1...` gives the laptop."""
    login_side = ["nsenter", "--net=/run/netns/orch-login", "socat", f"UNIX-LISTEN:{socket_path},fork",
                  "TCP:127.0.0.1:5000"]  # fmt: skip
    laptop_side = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{socket_path}"]
    quiet = {"stderr": subprocess.DEVNULL}  # "connection refused" until the UI answers
    return [subprocess.Popen(login_side, **quiet), subprocess.Popen(laptop_side, **quiet)]


def test_the_readme_karolina_section_runs_as_written(karolina: None, tmp_path: Path, request: pytest.FixtureRequest):
    blocks, timings = readme_blocks(), {}

    def timed(name: str, result: Callable[[], subprocess.CompletedProcess[str]]) -> str:
        began = time.monotonic()
        out = ok(result())
        timings[name] = time.monotonic() - began
        return out

    # 1, 2: the code (we are on login1 already), then the environment: the Python module's venv, with this
    # machine's CPU torch instead of the CUDA index, installed online.
    timed("1 code", lambda: shell("\n".join(x for x in substituted(blocks["login"]).splitlines() if "ssh " not in x)))
    build = substituted(blocks["build"]).replace("bash envs/karolina.sh", "ORCH_TORCH_INDEX= bash envs/karolina.sh")
    timed("2 environment", lambda: shell(f"cd ~/orch\n{build}", online=True))
    new_shell = substituted(blocks["shell"]) + "\n"

    # 3: a new login shell gets the module and the environment, and no CUDA toolkit ahead of torch's libraries.
    shown = ok(shell(new_shell + 'echo "modules=$LOADEDMODULES"; command -v orch'))
    assert "modules=Python/3.11.5-GCCcore-13.2.0\n" in shown and f"{ORCH}/venv/bin/orch" in shown

    # 4, 5: the tokenizer and the shards prepared by jobs on the nodes, then the plan.
    corpus(CHECKOUT / "corpus")
    timed("4 data", lambda: shell(new_shell + substituted(blocks["data"])))
    plan = timed("5 plan", lambda: shell(new_shell + substituted(blocks["plan"])))
    assert "karolina-sim / my-recipe" in plan and "#SBATCH --partition=qgpu" in plan

    # 6: the site check, a job on the express partition of both nodes.
    doctor = timed("6 doctor", lambda: shell(new_shell + substituted(blocks["doctor"])))
    assert "2 ranks on 2 node(s)" in doctor and "Python/3.11.5-GCCcore-13.2.0" in doctor

    # 7: submitted as preemptible work on qgpu_preempt, with a limit short enough to requeue here.
    submit = substituted(blocks["submit"]).replace("--profile karolina-sim ", "--profile karolina-sim-preempt ")
    submit = submit.strip() + f" --time {LIMIT_MIN} --set signal_delay_s=30"
    run_id = submitted_run_id(shell(new_shell + submit))
    request.addfinalizer(lambda: shell(new_shell + f"orch cancel {run_id}"))
    run = Run(ORCH / "runs" / run_id)
    assert run.dir.is_dir() and not run.dir.is_symlink()  # ORCH_HOME's runs folder is the profile's: no link
    [job_id] = [job.job_id for job in run.jobs]
    began = time.monotonic()
    wait_until(lambda: spooled_step(run) > 0, "the first step", timeout=600)

    # A job of a higher-priority partition that needs both nodes: Slurm preempts the run's job (SIGTERM, GraceTime),
    # which saves at its next step and queues itself again; it starts again once the nodes are free.
    ok(shell(new_shell + "sbatch --partition=qgpu --exclusive --nodes=2 --time=1 --wrap 'sleep 5'"))
    wait_until(lambda: "preempted: requeued job" in logs(run), "the preempted job to save and requeue itself")
    preempted_step = committed_step(run.checkpoints_dir)
    assert preempted_step and restarts(job_id) >= 1, "the preempted job saved within its grace time and was requeued"
    assert set(re.findall(r"rank \d+/2 on (orch-n\d):", logs(run, "*"))) == {"orch-n1", "orch-n2"}  # two hosts
    checkpoint = run.checkpoints_dir / f"step_{preempted_step:08d}"
    assert sorted(p.name for p in checkpoint.glob("__*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard each

    # The next allocation trains to its time limit, saves and requeues itself; the one after it trains on. Its limit
    # is shortened once it trains, to what its deadline needs (docs/goodput.md#the-deadline): a Karolina job meets
    # its limit after hours, and waiting out minutes here shows nothing more.
    wait_until(lambda: spooled_step(run) > preempted_step, "training after the preemption", timeout=600)
    started = run.attempts[-1].started
    wait_until(lambda: leads(run, since=started), "the allocation's deadline", timeout=120, poll_s=0.2)
    left = math.ceil(leads(run, since=started)[-1] + run.profile().deadline_poll_s + HEADROOM_S)
    slurm("scontrol", "update", f"JobId={job_id}", f"EndTime=now+{left}seconds", check=True)
    wait_until(lambda: "requeueing the job after a checkpoint" in logs(run), "the time-limit requeue", timeout=600)
    slurm("scontrol", "update", f"JobId={job_id}", f"TimeLimit={LIMIT_MIN}", check=True)  # the next one's own
    limit_step = committed_step(run.checkpoints_dir)
    assert limit_step > preempted_step
    wait_until(lambda: spooled_step(run) > limit_step, "training after the requeue", timeout=600)
    timings["7 train, preemption, requeue"] = time.monotonic() - began

    # Stop it there and finish a known number of steps (a machine of any speed reaches this point).
    ok(shell(new_shell + f"orch cancel {run_id}"))
    wait_until(lambda: not squeue(job_id, "%T"), "the cancelled job to leave the queue")
    steps = committed_step(run.checkpoints_dir) + 5
    timed("7 resume", lambda: shell(new_shell + f"orch resume {run_id} --steps {steps} --time 10 --wait"))
    attempts = json.loads((run.dir / "attempts.json").read_text())
    assert len(attempts) >= 4  # the first start, the preemption's requeue, the time-limit requeue, the resume

    # 8: watching: status and logs, the UI in tmux on login1, reached through the forwarded port.
    status = timed("8 status", lambda: shell(new_shell + substituted(blocks["watch"], RUN_ID=run_id)))
    assert run_id in status and "completed" in status
    port = free_port()
    for end in forward(port, tmp_path / "tunnel.sock"):
        request.addfinalizer(end.kill)
    request.addfinalizer(lambda: shell("tmux kill-server"))
    wait_until(lambda: answers(port), "orch ui to answer through the tunnel", timeout=180)
    experiment = mlflow_api(port, "experiments/get-by-name?experiment_name=orch")["experiment"]["experiment_id"]
    wait_until(lambda: mlflow_steps(port, experiment, run_id) == steps, "orch ui's follower to send the metrics")
    mlflow_run = mlflow_run_of(port, experiment, run_id)
    page = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{mlflow_run}/model-metrics?{TRAINING_VIEW}"
    chart = chart_cards(browse(page, tmp_path / "browser", "--dump-dom").stdout)["loss"]
    assert f"{run_id} (loss)" in chart and 'class="js-line"' in chart  # the run's loss curve, through the tunnel

    # 9: an evaluation job and the export.
    scored = timed("9 eval, export", lambda: shell(new_shell + substituted(blocks["score"], RUN_ID=run_id)))
    assert "czech_cloze" in scored
    assert (ORCH / "export" / run_id / "config.json").is_file()

    # Every step's loss equals a run that was never interrupted (the same recipe and data, the local profile).
    reference = submitted_run_id(
        shell(new_shell + f"orch submit --profile local --recipe my-recipe.yaml --steps {steps} --wait")
    )
    assert spooled_losses(run.dir) == spooled_losses(ORCH / "runs" / reference)
    print("\nrehearsal step times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()))


def leads(run: Run, since: float) -> list[float]:
    """The leads of the deadlines the run's job chose after `since`, oldest first."""
    return [r.lead_s for r in deadline.read_records(run.dir) if r.chosen > since]


def spooled_step(run: Run) -> int:
    """The newest step the run's spool has."""
    lines = (run.dir / "metrics.jsonl").read_text().splitlines() if (run.dir / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def mlflow_run_of(port: int, experiment: str, run_id: str) -> str | None:
    tagged = {"experiment_ids": [experiment], "filter": f"tags.`orch.run_id` = '{run_id}'"}
    found = mlflow_api(port, "runs/search", tagged).get("runs", [])
    return found[0]["info"]["run_id"] if found else None


def mlflow_steps(port: int, experiment: str, run_id: str) -> int:
    mlflow_run = mlflow_run_of(port, experiment, run_id)
    if mlflow_run is None:
        return 0
    history = mlflow_api(port, f"metrics/get-history?run_id={mlflow_run}&metric_key=loss").get("metrics", [])
    return len({m["step"] for m in history})
