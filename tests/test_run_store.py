"""Where a run directory is made: ORCH_HOME's runs folder, a profile's `paths.runs`, or both when they are one
folder (Karolina's README sets ORCH_HOME so that they are)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.core.errors import OrchError
from orchestrator.core.rundir import all_runs, create_run, get_run

INFO = {"recipe": "tiny", "profile": "local", "steps": 10, "stop_before_end_s": 0}


def make(location: Path | None, run_id: str = "tiny-1"):
    return create_run(run_id, INFO, "executor: local\n", "name: tiny\n", location)


def test_a_profile_folder_equal_to_orch_homes_runs_holds_the_run_itself_without_a_link(orch_home: Path):
    run = make(orch_home / "runs")
    assert run.dir == orch_home / "runs" / "tiny-1"
    assert run.dir.is_dir() and not run.dir.is_symlink()
    assert run.info.run_id == "tiny-1"
    assert [r.id for r in all_runs()] == ["tiny-1"]


def test_the_same_folder_reached_through_a_symlink_is_still_one_folder(orch_home: Path, tmp_path: Path):
    (orch_home / "runs").mkdir(parents=True)
    alias = tmp_path / "scratch-alias"
    alias.symlink_to(orch_home / "runs")
    run = make(alias)
    assert not run.dir.is_symlink() and (alias / "tiny-1" / "run.json").is_file()


def test_a_profile_folder_elsewhere_holds_the_run_and_orch_home_links_to_it(orch_home: Path, tmp_path: Path):
    scratch = tmp_path / "scratch" / "runs"
    run = make(scratch)
    assert run.dir.is_symlink() and run.dir.resolve() == scratch / "tiny-1"
    assert (scratch / "tiny-1" / "profile.yaml").is_file()
    assert get_run("tiny-1").info.run_id == "tiny-1"


def test_a_profile_folder_inside_orch_homes_runs_is_not_listed_as_a_run(orch_home: Path):
    location = orch_home / "runs" / "project"
    run = make(location)
    assert run.dir.resolve() == location / "tiny-1"
    assert [r.id for r in all_runs()] == ["tiny-1"]


def test_orch_home_inside_the_profile_folder_links_from_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    location = tmp_path / "scratch" / "runs"
    monkeypatch.setenv("ORCH_HOME", str(location / "me"))
    run = make(location)
    assert run.dir.resolve() == location / "tiny-1"
    assert [r.id for r in all_runs()] == ["tiny-1"]


def test_a_run_id_taken_is_refused_and_the_existing_run_is_untouched(orch_home: Path):
    first = make(orch_home / "runs")
    with pytest.raises(OrchError, match="already exists"):
        make(orch_home / "runs")
    assert first.info.run_id == "tiny-1" and (first.dir / "recipe.yaml").read_text() == "name: tiny\n"


def test_a_folder_that_cannot_be_made_is_named_and_nothing_is_left(orch_home: Path, tmp_path: Path):
    in_the_way = tmp_path / "scratch"
    in_the_way.write_text("a file where the profile expects a folder")
    with pytest.raises(OrchError, match=r"scratch/runs \(the profile's paths.runs\): Not a directory"):
        make(in_the_way / "runs")
    assert not (orch_home / "runs" / "tiny-1").exists() and not (orch_home / "runs" / "tiny-1").is_symlink()


def test_a_failure_after_the_folder_was_made_leaves_no_run_behind(
    orch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("orchestrator.core.rundir.write_atomic", full_disk)
    scratch = tmp_path / "scratch" / "project" / "runs"
    with pytest.raises(OrchError, match="No space left on device"):
        make(scratch)
    assert not (tmp_path / "scratch").exists()
    assert not (orch_home / "runs" / "tiny-1").is_symlink()
