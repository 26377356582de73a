"""Weighted data mixtures (`data.sources`): the order drawn from several prepared sources, and a 2-source run on the
local profile that is killed, resumed bitwise, and given new weights at a step boundary."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest

from jobs.data import MIX_PERIOD, GlobalOrder, JoinedBlocks, Mixture, load_blocks, quotas
from jobs.shards import TokenBlocks
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_recipe
from orchestrator.core.plan import Batching
from orchestrator.core.runfiles import MixChange, mix_phases
from orchestrator.tools.run_data import demo_corpus
from tests.conftest import kill_job_tree, orch, run_dir_of, spooled_losses, status_json, submitted_run_id, wait_for_step

STEP_TOLERANCE = 4  # samples: a step's count of a source lies within this of weight × global batch
PREFIX_TOLERANCE = 32  # samples: so does the count over any number of steps from a phase's start


def shares(order: GlobalOrder, steps: range) -> np.ndarray:
    """Samples of each source per step, shape (steps, sources)."""
    batch = order.split.global_batch
    return np.array([[round(v * batch) for v in order.source_shares(step).values()] for step in steps])


@pytest.mark.parametrize("weights", [(0.9, 0.1), (3.0, 1.0), (0.6, 0.3, 0.1), (0.99, 0.01), (1.0, 0.0)])
@pytest.mark.parametrize("batch", [16, 512])
def test_each_step_and_every_run_of_steps_holds_the_weights_within_a_few_samples(weights, batch):
    names = tuple("abc"[: len(weights)])
    order = GlobalOrder(
        300, Batching.of(batch, 1, 1), 0, mixture=Mixture(names, (100,) * len(weights), ((0, weights),))
    )
    counts = shares(order, range(2000))
    target = np.asarray(weights) / sum(weights)
    assert (counts.sum(axis=1) == batch).all()
    assert np.abs(counts - target * batch).max() <= STEP_TOLERANCE
    steps_done = np.arange(1, len(counts) + 1)[:, None]
    assert np.abs(counts.cumsum(axis=0) - steps_done * batch * target).max() <= PREFIX_TOLERANCE
    period = np.bincount(order.mixture.draw(np.arange(MIX_PERIOD), [0])[0], minlength=len(weights))
    assert tuple(period) == quotas(weights)  # a period holds each source's quota exactly


def test_each_source_runs_through_its_own_epochs_and_a_step_sees_the_same_blocks_at_any_world_size():
    mixture = Mixture(("big", "small"), (40, 7), ((0, (0.7, 0.3)),))

    def step_blocks(world: int, step: int) -> list[int]:
        order = GlobalOrder(47, Batching.of(16, 2, world), 3, mixture=mixture)
        accumulation = 16 // (2 * world)
        return [int(b) for m in range(accumulation) for r in range(world) for b in order.block_indices(step, m, r)]

    assert all(sorted(step_blocks(1, s)) == sorted(step_blocks(2, s)) == sorted(step_blocks(4, s)) for s in range(12))
    in_order = [block for step in range(12) for block in step_blocks(1, step)]  # one rank: global sample order
    for first, size in ((0, 40), (40, 7)):
        mine = [block - first for block in in_order if first <= block < first + size]
        assert len(mine) >= 2 * size and sorted(mine[:size]) == sorted(mine[size : 2 * size]) == list(range(size))
        assert mine[:size] != mine[size : 2 * size]  # each epoch of a source in its own order


def test_new_weights_from_a_step_keep_every_sample_before_it_and_continue_each_source_where_it_was():
    steady = Mixture(("cs", "en"), (50, 30), ((0, (0.9, 0.1)),))
    changed = Mixture(("cs", "en"), (50, 30), ((0, (0.9, 0.1)), (6, (0.5, 0.5))))
    before, after = (GlobalOrder(80, Batching.of(16, 16, 1), 0, mixture=m) for m in (steady, changed))
    assert all(np.array_equal(before.block_indices(s, 0, 0), after.block_indices(s, 0, 0)) for s in range(6))
    assert abs(shares(after, range(6, 106)).mean(axis=0) / 16 - 0.5).max() < 0.01
    source, number = changed.draw(np.arange(20 * 16), after.phase_starts())
    for i in range(2):
        assert sorted(number[source == i]) == list(range((source == i).sum()))  # no sample drawn twice, none missed
    skipping = GlobalOrder(80, Batching.of(16, 16, 1), 0, skipped=((2, 4),), mixture=changed)
    assert skipping.phase_starts() == [0, 8 * 16]  # training step 6 reads data step 8: the change moves with it


def test_weight_changes_replace_the_phases_from_their_step_on():
    recipe = {"cs": 0.9, "en": 0.1}
    first, again = (MixChange(from_step=s, weights={"cs": 0.5, "en": w}, time=0.0) for s, w in ((100, 0.5), (60, 1.5)))
    assert mix_phases(recipe, [first]) == [(0, recipe), (100, first.weights)]
    assert mix_phases(recipe, [first, again]) == [(0, recipe), (60, again.weights)]  # taken back to step 60


REPLACED = "source: null\n  "  # the parent's one source gives way to the mixture


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (REPLACED + "sources: {cs: {path: p, weight: 0}, en: {path: q, weight: 0}}", "must sum to a positive, finite"),
        (REPLACED + "sources: {cs: {path: p, weight: 1e308}, en: {path: q, weight: 1e308}}", "positive, finite"),
        (REPLACED + "sources: {cs: {path: p, weight: -1}}", "field 'data.sources.cs.weight'"),
        (REPLACED + "sources: {cs: {path: p, weight: 1, share: 2}}", "field 'data.sources.cs.share'"),
        (REPLACED + "sources: {'c s': {path: p, weight: 1}}", "'c s' is not a source name"),
        ("sources: {cs: {path: p, weight: 1}}", "either 'source' .* or 'sources'"),
    ],
)
def test_a_mixture_that_cannot_be_drawn_is_refused_naming_the_file_and_field(tmp_path: Path, data: str, says: str):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"extends: tiny\ndata:\n  {data}\n")
    with pytest.raises(OrchError, match=says) as refused:
        load_recipe(str(recipe))
    assert str(recipe) in str(refused.value) and "\n" not in str(refused.value)


# --- a 2-source run, killed, resumed, then reweighted ------------------------------------------------------------

STEPS, KILL_AFTER, MORE = 20, 13, 8  # the tiny recipe commits every 10 steps and validates every 10
WEIGHTS, NEW_WEIGHTS = {"cs": 0.75, "en": 0.25}, {"cs": 0.25, "en": 0.75}


def english_corpus(documents: int) -> list[str]:
    """A replay source unlike the Czech-like demo corpus."""
    rng = np.random.default_rng(7)
    words = "the a small old new red blue house river city book letter reads writes finds sees near under".split()
    return [" ".join(rng.choice(words, size=rng.integers(8, 30))) + "." for _ in range(documents)]


@pytest.fixture
def mixture_recipe(tmp_path: Path, orch_home: Path) -> Path:
    """A recipe extending `tiny` with two sources prepared with one tokenizer by the real CLI."""
    corpora = {"cs": demo_corpus(seed=3, documents=1500), "en": english_corpus(800)}
    for name, docs in corpora.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = tmp_path / "tokenizer"
    inputs = [arg for name in corpora for arg in ("--input", str(tmp_path / name))]
    done = orch("tokenizer", "train", *inputs, "--vocab-size", "512", "--output", str(tokenizer))
    assert done.returncode == 0, done.stderr
    for name in corpora:
        output = str(tmp_path / f"{name}-prepared")
        done = orch(
            "data", "prepare", "--tokenizer", str(tokenizer), "--input", str(tmp_path / name), "--output", output,
            "--val-fraction", "0.1",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    recipe = tmp_path / "mixture.yaml"
    sources = "\n".join(f"    {n}: {{path: {tmp_path / f'{n}-prepared'}, weight: {w}}}" for n, w in WEIGHTS.items())
    recipe.write_text(f"extends: tiny\ndata:\n  source: null\n  tokenizer: {tokenizer}\n  sources:\n{sources}\n")
    return recipe


def step_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every metric spooled at each step (a step may have several lines: its training metrics, the job's goodput)."""
    metrics: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        metrics.setdefault(entry["step"], {}).update(entry["metrics"])
    return metrics


@pytest.mark.slow
def test_a_two_source_mixture_killed_and_resumed_trains_bitwise_and_takes_new_weights_at_a_step(
    orch_home: Path, mixture_recipe: Path
):
    submit = ("submit", "--recipe", str(mixture_recipe), "--steps", str(STEPS))
    plan = orch(*submit, "--dry-run")
    assert plan.returncode == 0 and "mixture: cs 0.75" in plan.stdout and "en 0.25" in plan.stdout, plan.stdout
    with ThreadPoolExecutor(1) as pool:
        undisturbed = pool.submit(orch, *submit, "--wait")  # the reference trains beside it
        run_id = submitted_run_id(orch(*submit))
        run_dir = run_dir_of(orch_home, run_id)
        wait_for_step(run_dir, KILL_AFTER)
        kill_job_tree(status_json(run_id)["job_ids"][-1])
        reference = submitted_run_id(undisturbed.result())
    assert orch("resume", run_id, "--wait").returncode == 0
    reference_dir = run_dir_of(orch_home, reference)
    assert spooled_losses(run_dir) == spooled_losses(reference_dir) and len(spooled_losses(run_dir)) == STEPS

    refused = orch("resume", run_id, "--steps", str(STEPS + MORE), "--weights", "cs=0.25,fr=0.75")
    assert refused.returncode == 2 and "'fr=0.75' is not NAME=WEIGHT" in refused.stderr and "cs, en" in refused.stderr
    assert not (run_dir / "mixture.json").exists()
    resumed = orch("resume", run_id, "--steps", str(STEPS + MORE), "--weights", "cs=0.25,en=0.75", "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    [change] = json.loads((run_dir / "mixture.json").read_text())
    assert (change["from_step"], change["weights"]) == (STEPS, NEW_WEIGHTS)

    metrics = step_metrics(run_dir)
    for steps, weights in ((range(1, STEPS + 1), WEIGHTS), (range(STEPS + 1, STEPS + MORE + 1), NEW_WEIGHTS)):
        for name, weight in weights.items():
            realised = [metrics[step][f"mix/{name}"] for step in steps]
            assert max(abs(share - weight) for share in realised) * 16 <= STEP_TOLERANCE, (name, realised)
            assert abs(np.mean(realised) - weight) <= 0.05, (name, realised)  # 2 samples of 16 per step at most
    assert {"val_loss/cs", "val_loss/en"} <= metrics[STEPS].keys()
    client = mlflow.MlflowClient(f"sqlite:///{orch_home / 'mlflow.db'}")
    history = client.get_metric_history(status_json(run_id)["mlflow_run_id"], "mix/en")
    assert {m.step: m.value for m in history}[STEPS + MORE] == metrics[STEPS + MORE]["mix/en"]

    blocks = load_blocks(run_dir / "data")
    parts = {name: TokenBlocks(mixture_recipe.parent / f"{name}-prepared" / "train", 64) for name in WEIGHTS}
    assert isinstance(blocks, JoinedBlocks) and len(blocks) == sum(map(len, parts.values()))
    assert np.array_equal(blocks[np.array([len(parts["cs"])])], parts["en"][np.array([0])])  # en follows cs
