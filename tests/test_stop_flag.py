"""The ranks' agreements (jobs/preemption.py, jobs/distributed.py): whatever one rank's stop flag holds, every rank
stops at the same step boundary for the same reason, and rank 0's decisions (and failures) reach every rank. All on
two gloo ranks spawned once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobs.distributed import PeerFailed, Ranks, agree, launch
from jobs.preemption import StopFlag


def warn(flag: StopFlag) -> None:
    signal.raise_signal(signal.SIGUSR2)


def preempt(flag: StopFlag) -> None:
    flag.listen_for_preemption()
    signal.raise_signal(signal.SIGTERM)


def deadline_ahead(flag: StopFlag) -> None:
    flag.deadline = time.time() + 3600


def deadline_passed(flag: StopFlag) -> None:
    flag.deadline = time.time() - 1


Act = Callable[[StopFlag], None]
# what happens to each rank's fresh stop flag, and the stop every rank should agree on
SITUATIONS: dict[str, tuple[dict[int, Act], str | None]] = {
    "nothing happened": ({}, None),
    "both deadlines still ahead": ({0: deadline_ahead, 1: deadline_ahead}, None),
    "rank 1 got the warning signal": ({1: warn}, "time"),
    "rank 0 passed its deadline": ({0: deadline_passed}, "time"),
    "rank 1 was preempted while rank 0 got the warning signal": ({0: warn, 1: preempt}, "preempted"),
}


def fail(message: str) -> None:
    raise ValueError(message)


def agree_on_everything(ranks: Ranks, output: Path) -> None:
    """Every situation on a fresh stop flag, then `agree` with a decision and with a failure; each rank writes what
    it got."""
    stops = {}
    for situation, (acts, _) in SITUATIONS.items():
        flag = StopFlag()
        if act := acts.get(ranks.rank):
            act(flag)
        stops[situation] = flag.agreed(ranks.device)
    decided_on: list[int] = []
    answer = agree(ranks.rank, lambda: decided_on.append(ranks.rank) or {"answer": 42})
    try:
        agree(ranks.rank, lambda: fail("the run directory is damaged"))
        failure = None
    except (ValueError, PeerFailed) as err:
        failure = f"{type(err).__name__}: {err}"
    got = {"stops": stops, "answer": answer, "decided_on": decided_on, "failure": failure}
    (output / f"rank{ranks.rank}.json").write_text(json.dumps(got))


@pytest.fixture(scope="module")
def got(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    output = tmp_path_factory.mktemp("agreements")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        launch(2, "cpu", "gloo", agree_on_everything, output)
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("situation", SITUATIONS)
def test_every_rank_stops_for_the_same_reason_as_soon_as_one_rank_has_one(got: list[dict[str, Any]], situation: str):
    stop = SITUATIONS[situation][1]
    assert [rank["stops"][situation] for rank in got] == [stop, stop]


def test_rank_0_decides_alone_and_every_rank_gets_its_answer(got: list[dict[str, Any]]):
    assert [rank["answer"] for rank in got] == [{"answer": 42}] * 2
    assert [rank["decided_on"] for rank in got] == [[0], []]


def test_when_rank_0_fails_to_decide_every_rank_fails_and_the_others_say_it_was_rank_0(got: list[dict[str, Any]]):
    assert got[0]["failure"] == "ValueError: the run directory is damaged"
    assert got[1]["failure"] == "PeerFailed: rank 0 failed: ValueError: the run directory is damaged"
