"""Files a team shares: what orch writes takes the mode the umask gives a new file (0o666 & ~umask) or folder
(0o777 & ~umask), so that in a project folder of the project group with the setgid bit (2775) and umask 002 a
teammate reads another's run and prepared corpus, scores the run and trains on the corpus (docs/run-directory.md)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.recovery import claim
from orchestrator.core.files import temporary_folder, write_atomic
from orchestrator.core.rundir import Run
from orchestrator.core.runfiles import Recovery
from orchestrator.tools.run_data import demo_corpus
from tests.conftest import ROOT, submitted_run_id

STEPS = 5  # each user's run: its last step is its one checkpoint


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "expected"), [(0o002, 0o664), (0o022, 0o644)])
def test_write_atomic_gives_the_mode_the_umask_gives(tmp_path: Path, mask: int, expected: int):
    with umask(mask):
        write_atomic(tmp_path / "run.json", "{}")
    assert mode(tmp_path / "run.json") == expected
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_the_run_lock_a_recovery_decision_and_an_eval_export_folder_follow_the_umask(tmp_path: Path):
    decision = Recovery(
        job_id="7", attempt=1, rank=0, host="n1", step=3, error="E: x", retried=False, reason="r", time=0.0
    )
    with umask(0o002):
        with Run(tmp_path).lock():
            pass
        assert claim(tmp_path / "errors" / "7.attempt1.recovery.json", decision)
        with temporary_folder(tmp_path, ".step_3.model-") as folder:
            assert mode(folder) == 0o775
    assert not folder.exists()
    assert mode(tmp_path / ".orch.lock") == mode(tmp_path / "errors" / "7.attempt1.recovery.json") == 0o664
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        ".orch.lock",
        "errors",
        "errors/7.attempt1.recovery.json",
    ]


def blocked_for_others(paths: list[Path]) -> list[Path]:
    """Folders on the way to `paths` (and `paths` that are folders) that users other than their owner cannot pass."""
    found: list[Path] = []
    for path in paths:
        for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
            if not folder.stat().st_mode & stat.S_IXOTH and folder not in found:
                found.append(folder)
    return found


@dataclass(frozen=True)
class Team:
    """A project group and two of its members, each in a private primary group of their own (the project group is a
    supplementary one, so the project folder's setgid bit is what gives new files the project group)."""

    group: str
    gid: int
    users: tuple[str, str]
    base: Path  # the test's own folder in /tmp, root's, 0755; the users' home folders are in it
    project: Path  # the project's shared folder: root:group, 2775

    @property
    def orch_home(self) -> Path:
        return self.project / "orch"

    def orch(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The real `orch` command line run by `user` in a clean environment with umask 002, as in their login shell."""
        env = {
            "HOME": str(self.base / user),
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "COLUMNS": "200",
            "ORCH_HOME": str(self.orch_home),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        shell = 'umask 002 && exec "$@"'
        command = [sys.executable, "-m", "orchestrator", *args]
        return subprocess.run(
            ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], "sh", "-c", shell, "sh"]
            + command,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    """Creates the group, its two users and the project folder; removes them all at the end. Folders on the way to
    this Python (the interpreter a virtual environment links to may be under /root, 0700) and to the checkout that
    others cannot pass get o+x for the test's time."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a group and two users (groupadd, useradd); CI runs it as root")
    name = f"orch{secrets.token_hex(3)}"
    users = (f"{name}a", f"{name}b")
    python = [Path(sys.executable).resolve(), Path(sys.base_prefix), Path(sys.prefix)]
    with ExitStack() as cleanup:
        for folder in blocked_for_others([*python, ROOT]):
            cleanup.callback(folder.chmod, mode(folder))
            folder.chmod(mode(folder) | stat.S_IXOTH)
        base = Path(tempfile.mkdtemp(prefix="orch-shared-"))
        cleanup.callback(shutil.rmtree, base)
        base.chmod(0o755)
        subprocess.run(["groupadd", name], check=True)
        cleanup.callback(subprocess.run, ["groupdel", name], check=True)
        for user in users:
            command = ["useradd", "--no-log-init", "-U", "-G", name, "-M", "-d", str(base / user), "-s", "/bin/sh"]
            subprocess.run([*command, user], check=True)
            cleanup.callback(subprocess.run, ["userdel", user], check=True)
            (base / user).mkdir(mode=0o700)
            shutil.chown(base / user, user, user)
        project = base / "project"
        project.mkdir()
        shutil.chown(project, group=name)
        project.chmod(0o2775)
        yield Team(name, project.stat().st_gid, users, base, project)


@dataclass(frozen=True)
class First:
    """What the first user made: a tokenizer, a corpus prepared with it and a run trained on that corpus."""

    tokenizer: Path
    prepared: Path
    run_id: str


def tiny_run(tokenizer: Path, prepared: Path) -> list[str]:
    """`orch submit` arguments of a tiny local run on a prepared corpus, followed to its end."""
    data = ["--set", f"recipe.data.source={prepared}", "--set", f"recipe.data.tokenizer={tokenizer}"]
    return ["submit", "--profile", "local", "--recipe", "tiny", "--steps", str(STEPS), *data, "--wait"]


@pytest.fixture(scope="module")
def first(team: Team) -> First:
    corpus = team.base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in demo_corpus(seed=3, documents=300)))
    corpus.chmod(0o644)
    user, tokenizer, prepared = team.users[0], team.project / "tokenizer", team.project / "prepared"
    args = ["--input", str(corpus), "--vocab-size", "512", "--output", str(tokenizer)]
    result = team.orch(user, "tokenizer", "train", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    args = ["--tokenizer", str(tokenizer), "--input", str(corpus), "--output", str(prepared), "--val-fraction", "0.1"]
    result = team.orch(user, "data", "prepare", *args, "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    return First(tokenizer, prepared, submitted_run_id(team.orch(user, *tiny_run(tokenizer, prepared))))


@dataclass(frozen=True)
class Second:
    """The second user's commands on the first user's run and corpus."""

    status: subprocess.CompletedProcess[str]
    eval: subprocess.CompletedProcess[str]
    submit: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def second(team: Team, first: First) -> Second:
    user = team.users[1]
    status = team.orch(user, "status", first.run_id, "--json")
    scored = team.orch(user, "eval", first.run_id, "--tasks", "czech_cloze", "--limit", "2")
    trained = team.orch(user, *tiny_run(first.tokenizer, first.prepared))
    return Second(status, scored, trained)


@pytest.mark.slow
def test_a_teammate_reads_scores_and_trains_on_anothers_run_and_corpus(team: Team, first: First, second: Second):
    assert second.status.returncode == 0, second.status.stderr
    summary = json.loads(second.status.stdout)
    assert (summary["state"], summary["step"], summary["last_checkpoint_step"]) == ("completed", STEPS, STEPS)

    assert second.eval.returncode == 0, second.eval.stdout + second.eval.stderr
    evals = team.orch_home / "runs" / first.run_id / "evals"
    assert json.loads((evals / f"step_{STEPS}.json").read_text())["tasks"]["czech_cloze"]["samples"] == 2
    assert (evals / "sent" / f"step_{STEPS}.json").is_file()  # in the first user's MLflow run, in the shared store

    run_dir = team.orch_home / "runs" / submitted_run_id(second.submit)
    assert run_dir.stat().st_uid != evals.parent.stat().st_uid
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "completed"
    assert json.loads((run_dir / "mlflow.json").read_text())["sent_through"] == STEPS


def unreadable_by_group(roots: list[Path], gid: int) -> list[str]:
    """Files a member of group `gid` who does not own them cannot read, and folders they cannot list and enter."""
    found = []
    for root in roots:
        for folder, folders, files in os.walk(root):
            for path in [Path(folder)] + [Path(folder) / name for name in folders + files]:
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    continue
                bits = (st.st_mode >> 3 if st.st_gid == gid else st.st_mode) & 0o7
                needed = 0o5 if stat.S_ISDIR(st.st_mode) else 0o4
                if bits & needed != needed:
                    found.append(f"{path}: {stat.filemode(st.st_mode)}, group {st.st_gid}")
    return found


@pytest.mark.slow
def test_every_file_orch_wrote_is_the_project_groups_to_read(team: Team, first: First, second: Second):
    assert unreadable_by_group([team.project], team.gid) == []
    run_dir = team.orch_home / "runs" / first.run_id
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    written = [
        *(run_dir / name for name in ("run.json", "recipe.yaml", "profile.yaml", "metrics.jsonl", "jobs.json")),
        *(run_dir / name for name in ("progress.json", ".orch.lock", f"evals/step_{STEPS}.json")),
        run_dir / "checkpoints" / "latest.json",
        checkpoint / "COMMITTED.json",
        *checkpoint.glob("*.distcp"),
        first.prepared / "manifest.json",
        first.prepared / "train" / "index.json",
        *(first.prepared / "train").glob("shard_*.bin"),
        first.tokenizer / "tokenizer.json",
        team.orch_home / "mlflow.db",
    ]
    assert {str(p.relative_to(team.project)): oct(mode(p)) for p in written} == {
        str(p.relative_to(team.project)): "0o664" for p in written
    }
    assert {p.stat().st_gid for p in written} == {team.gid}
    assert mode(run_dir) == mode(checkpoint) == 0o2775
