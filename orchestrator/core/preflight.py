"""Checks before anything is written or submitted: partition limits, memory, prepared data, the initial model.

`orch submit` and `orch resume` run the same ones; each names the file, the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.config import Profile, Recipe
from orchestrator.core.corpus import cannot_validate
from orchestrator.core.errors import OrchError
from orchestrator.core.files import file_sha256, read_json
from orchestrator.core.plan import Plan, check_time_limit, make_plan
from orchestrator.core.schedulers.base import PartitionFacts
from orchestrator.core.shard_index import ShardIndex, find_index


def checked_plan(profile: Profile, profile_path: Path, recipe: Recipe, recipe_path: Path, steps: int) -> Plan:
    check_partition(profile, profile_path)
    plan = make_plan(profile, recipe, steps, recipe_path)
    check_time_limit(profile, profile_path, plan)
    check_memory(profile, profile_path, plan)
    check_data(recipe, recipe_path)
    return plan


MANY_EPOCHS = 4  # passes over the same tokens beyond which repeating them adds little (Muennighoff et al., 2023)
SMALL_VOCABULARY = 0.5  # share of model.vocab_size below which a tokenizer leaves most embedding rows unused


@dataclass(frozen=True)
class SourceUse:
    """How much of one prepared source a run reads."""

    name: str  # "" for the run's one source
    path: str
    train_tokens: int
    val_tokens: int
    read_tokens: float  # what the run reads from it: its share of every step's blocks
    epochs: float  # read_tokens over the tokens of its whole blocks (the final partial block is never read)

    def describe(self) -> str:
        return f"{self.train_tokens:,} train tokens ({self.val_tokens:,} val), {epochs_text(self.epochs)} epochs"


def epochs_text(epochs: float) -> str:
    return f"{epochs:,.0f}" if epochs >= 100 else f"{epochs:.3g}"


def tokens_text(tokens: float) -> str:
    return f"{tokens / 1e9:,.1f} B" if tokens >= 1e8 else f"{tokens:,.0f}"


def source_uses(recipe: Recipe, plan: Plan) -> list[SourceUse]:
    """Each prepared source's size and the epochs the run makes over it, a mixture's sources by their weights (the
    demo corpus is prepared at submission: none). Reads the splits' index.json; the data passed `check_data`."""
    data = recipe.data
    if data.sources is not None:
        total = sum(data.weights.values())
        shares = {name: (source.path, source.weight / total) for name, source in data.sources.items()}
    else:
        shares = {} if data.source == "demo" else {"": (data.source, 1.0)}
    uses = []
    for name, (path, share) in shares.items():
        train, val = (split_tokens(Path(path), split) for split in ("train", "val"))
        read = plan.total_tokens * share
        uses.append(SourceUse(name, path, train, val, read, read / (train // data.max_seq_len * data.max_seq_len)))
    return uses


def split_tokens(folder: Path, split: str) -> int:
    """The tokens of a prepared split, as its index.json counts them."""
    index = find_index(folder / split)
    return index.tokens if index else 0


def data_warnings(recipe: Recipe, recipe_path: Path | str, plan: Plan) -> list[str]:
    """What the run would do that is allowed but rarely wanted, each said before it spends anything: many epochs over
    a source, a val split smaller than one evaluation pass (no val_loss), a tokenizer far below model.vocab_size."""
    uses = source_uses(recipe, plan)
    found = [many_epochs(recipe_path, use) for use in uses if use.epochs > MANY_EPOCHS]
    if recipe.eval and uses:
        val, data = {use.name: use.val_tokens for use in uses}, recipe.data
        found.append(cannot_validate(val, recipe.eval.blocks, plan.world_size, plan.micro_batch, data.max_seq_len))
    found.append(small_vocabulary(recipe, recipe_path))
    return [f"Warning: {warning}" for warning in found if warning]


def many_epochs(recipe_path: Path | str, use: SourceUse) -> str:
    source = f"source {use.name} ({use.path})" if use.name else f"data.source {use.path}"
    return (
        f"{recipe_path}: the run reads {source} {epochs_text(use.epochs)} times over ({tokens_text(use.read_tokens)} "
        f"tokens from {use.train_tokens:,} train tokens). Beyond about {MANY_EPOCHS} epochs, repeated tokens add "
        "little and the model memorizes them: fewer --steps, or more data."
    )


def check_partition(profile: Profile, path: Path) -> None:
    """The partition's limits, each with what to change."""
    slurm = profile.slurm
    if slurm and slurm.account_required and not slurm.account:
        raise OrchError(
            f"{path}: partition '{slurm.partition}' needs an account (slurm.account): pass --account PROJECT-ID "
            "(e.g. --account OPEN-29-12), or set slurm.account in a profile that extends this one."
        )
    if slurm and profile.time_limit_min > slurm.max_walltime_min:
        raise OrchError(
            f"{path}: time limit {profile.time_limit_min:g} min is above partition '{slurm.partition}''s maximum "
            f"of {slurm.max_walltime_min:g} min; use --time {int(slurm.max_walltime_min)} or less. Longer runs are "
            "requeued automatically."
        )
    if slurm and profile.nodes > slurm.max_nodes:
        raise OrchError(
            f"{path}: {profile.nodes} nodes is above partition '{slurm.partition}''s limit of {slurm.max_nodes}; "
            f"use --nodes {slurm.max_nodes} or fewer, or a profile for a larger partition."
        )


def check_memory(profile: Profile, path: Path, plan: Plan) -> None:
    gpu_memory = profile.node.gpu_memory_gb
    if gpu_memory and plan.peak_memory_gb > gpu_memory:
        raise OrchError(
            f"Estimated peak memory {plan.peak_memory_gb:.1f} GB per GPU is above the {gpu_memory:g} GB of "
            f"{profile.node.gpu_model} ({path}); lower train.micro_batch_size (now {plan.micro_batch}) in the recipe "
            "or use more nodes."
        )


def check_data(recipe: Recipe, recipe_path: Path) -> None:
    """What the job will read must exist, be prepared and fit the model before anything is queued: the job itself
    never tokenizes (GPU time is not paid for CPU work)."""
    data, model = recipe.data, recipe.model
    demo = "'demo' or " if data.sources is None else ""  # a mixture's sources are all prepared folders
    sources = {"data.source": data.source} if data.sources is None else {
        f"data.sources.{name}.path": source.path for name, source in data.sources.items()
    }  # fmt: skip
    for field, value in (*sources.items(), ("data.tokenizer", data.tokenizer)):
        if not (demo and value == "demo") and not Path(value).is_dir():
            what = "folder made by `orch data prepare`" if field in sources else "tokenizer folder"
            raise OrchError(
                f"{recipe_path}: field '{field}' names {value!r}, which is not a folder. Allowed: {demo}an existing "
                f"{what}."
            )
    for field, source in sources.items():
        if not (demo and source == "demo"):
            check_prepared_data(recipe, recipe_path, field, source, prepared_index(recipe_path, field, source))
        elif data.tokenizer != "demo":  # the demo corpus is tokenized at submission with the recipe's tokenizer
            check_tokenizer_fits(recipe, recipe_path)
    if model.init_from:
        check_init_from(recipe, recipe_path)


def prepared_index(recipe_path: Path, field: str, source: str) -> ShardIndex:
    """The train split's index of a folder made by `orch data prepare`."""
    index = find_index(Path(source) / "train")
    if index is None:
        raise OrchError(
            f"{recipe_path}: field '{field}' names {source!r}, which holds no prepared token shards "
            "(train/index.json). Allowed: 'demo' (one source only), or the output folder of `orch data prepare "
            f"--tokenizer T --input {source} --output OUT` (run it on a login or CPU node, then set {field} to OUT)."
        )
    return index


def check_prepared_data(recipe: Recipe, recipe_path: Path, field: str, source: str, index: ShardIndex) -> None:
    """Shards from `orch data prepare` name their vocabulary size and tokenizer: both must match the recipe, and the
    train split must hold at least one block."""
    if index.vocab_size > recipe.model.vocab_size:
        raise OrchError(
            f"{recipe_path}: field 'model.vocab_size' is {recipe.model.vocab_size}, but {source} ({field}) was "
            f"tokenized with {index.vocab_size} token ids. Allowed: at least {index.vocab_size}."
        )
    tokenizer = Path(recipe.data.tokenizer) / "tokenizer.json"
    if not tokenizer.is_file() or file_sha256(tokenizer) != index.tokenizer_sha256:
        raise OrchError(
            f"{recipe_path}: field 'data.tokenizer' ({recipe.data.tokenizer}) is not the tokenizer {source} "
            f"({field}) was prepared with. Allowed: that tokenizer, e.g. {source}/tokenizer; the sources of a "
            "mixture must all be prepared with the same one."
        )
    if index.tokens < recipe.data.max_seq_len:
        raise OrchError(
            f"{recipe_path}: {source} ({field}) has {index.tokens} training tokens, fewer than one "
            f"block of data.max_seq_len {recipe.data.max_seq_len}. Allowed: a corpus of at least one block."
        )


def check_tokenizer_fits(recipe: Recipe, recipe_path: Path) -> None:
    """Every id the tokenizer can give must have a row in the model's embedding."""
    size = tokenizer_vocab_size(Path(recipe.data.tokenizer) / "tokenizer.json")
    if size is not None and size > recipe.model.vocab_size:
        raise OrchError(
            f"{recipe_path}: field 'model.vocab_size' is {recipe.model.vocab_size}, but the tokenizer "
            f"{recipe.data.tokenizer} (data.tokenizer) gives ids up to {size - 1}. Allowed: at least {size}, or a "
            "tokenizer of that size."
        )


def small_vocabulary(recipe: Recipe, recipe_path: Path | str) -> str | None:
    """A tokenizer far smaller than `model.vocab_size` is allowed, but the rows above its ids are never trained and
    still cost memory and time in the embedding and the output layer: a tokenizer trained on a small corpus stops
    where nothing is left to merge (17,436 tokens asked for 64,000), which nothing else would show."""
    if recipe.data.tokenizer == "demo":  # trained at submission, to the model's size where the corpus allows
        return None
    size, rows = tokenizer_vocab_size(Path(recipe.data.tokenizer) / "tokenizer.json"), recipe.model.vocab_size
    if size is None or size >= SMALL_VOCABULARY * rows:
        return None
    return (
        f"{recipe_path}: the tokenizer {recipe.data.tokenizer} (data.tokenizer) has {size:,} tokens, under "
        f"{SMALL_VOCABULARY:.0%} of model.vocab_size {rows:,}: {rows - size:,} rows of the embedding and the output "
        "layer are never used. A tokenizer trained on too little text stops where nothing is left to merge; train "
        f"it on more text (orch tokenizer train --vocab-size {rows}), or set model.vocab_size nearer {size:,}."
    )


def tokenizer_vocab_size(path: Path) -> int | None:
    """The number of ids a Hugging Face tokenizer.json can give (its model's vocabulary and added tokens), read as
    JSON: the core imports no tokenizers library. None where the file says nothing readable of it."""
    spec = read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        return None
    vocab = spec["model"].get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else []  # BPE, WordPiece: token -> id
    ids += list(range(len(vocab))) if isinstance(vocab, list) else []  # Unigram: [token, score] in id order
    ids += [t["id"] for t in spec.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    numbers = [i for i in ids if isinstance(i, int)]
    return max(numbers) + 1 if numbers else None


MODEL_FIELDS = {  # recipe field -> Hugging Face config key
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


def check_init_from(recipe: Recipe, recipe_path: Path) -> None:
    """A model directory brings its own architecture: the recipe's (which the plan and estimates use) must agree."""
    model = recipe.model
    config = read_json(Path(model.init_from) / "config.json")
    if config is None:
        raise OrchError(
            f"{recipe_path}: field 'model.init_from' names {model.init_from!r}, which has no config.json. "
            "Allowed: a local Hugging Face model directory, or leave it out to start from scratch."
        )
    differ = [
        f"model.{field} is {getattr(model, field)} but {key} is {config.get(key)}"
        for field, key in MODEL_FIELDS.items()
        if config.get(key) != getattr(model, field)
    ]
    if differ:
        raise OrchError(
            f"{recipe_path}: the model in {model.init_from} differs from the recipe: {'; '.join(differ)}. "
            "Allowed: the directory's dimensions (copy them into the recipe's model section)."
        )


def check_against_slurm(profile: Profile, path: Path, plan: Plan, partitions: dict[str, PartitionFacts]) -> list[str]:
    """The profile's partition as Slurm reports it: refuse what Slurm would refuse or leave pending for good, each
    with Slurm's figure; return notes on what the profile assumed wrongly and on preemption without time to save."""
    slurm = profile.slurm
    if slurm is None:
        return []
    facts = partitions.get(slurm.partition)
    if facts is None:
        raise OrchError(
            f"{path}: field 'slurm.partition' is '{slurm.partition}', which this cluster does not have. Allowed: "
            f"{', '.join(sorted(partitions)) or 'none listed'} (`scontrol show partition`); set it with "
            "--set slurm.partition=NAME or in a profile that extends this one."
        )
    where = f"partition '{facts.name}'"
    if facts.state == "INACTIVE":
        raise OrchError(f"{path}: {where} is INACTIVE in Slurm: it accepts no jobs. Ask the site, or pick another.")
    if facts.max_time_min is not None and profile.time_limit_min > facts.max_time_min:
        raise OrchError(
            f"{path}: time limit {profile.time_limit_min:g} min is above {where}'s MaxTime of "
            f"{facts.max_time_min:g} min as Slurm reports it (the profile assumed slurm.max_walltime_min "
            f"{slurm.max_walltime_min:g}); the job would pend for good. Allowed: --time {int(facts.max_time_min)} or "
            "less; longer runs are requeued automatically."
        )
    if profile.nodes < facts.min_nodes or (facts.max_nodes is not None and profile.nodes > facts.max_nodes):
        most = "no limit" if facts.max_nodes is None else facts.max_nodes
        raise OrchError(
            f"{path}: {profile.nodes} node(s) is outside {where}'s range as Slurm reports it (MinNodes "
            f"{facts.min_nodes}, MaxNodes {most}; the profile assumed slurm.max_nodes {slurm.max_nodes}). Allowed: "
            "--nodes within that range, or a partition that takes this many."
        )
    notes = []
    if facts.state != "UP":
        notes.append(f"Note: {where} is {facts.state} in Slurm: the job queues but starts only once it is UP again.")
    if facts.max_time_min is not None and facts.max_time_min != slurm.max_walltime_min:
        notes.append(
            f"Note: {path} assumes slurm.max_walltime_min {slurm.max_walltime_min:g}; Slurm says {where}'s MaxTime is "
            f"{facts.max_time_min:g} min. Correct the profile."
        )
    if profile.preemptible and facts.preempt_mode != "OFF" and facts.grace_time_s < plan.step_s + plan.save_s:
        every = plan.recipe.checkpoint.every_steps
        lost = f"up to {every} steps" + (f" (~{every * plan.step_s / 60:.0f} min)" if plan.step_s else "")
        notes.append(
            f"Note: {where} gives a preempted job {facts.grace_time_s} s (GraceTime) between SIGTERM and SIGKILL, "
            f"less than one step and one save ({plan.step_s + plan.save_s:.0f} s estimated): a preemption loses the "
            f"work since the last checkpoint, {lost}. Checkpoint more often (checkpoint.every_steps) to lose less."
        )
    return notes


MANY_ALLOCATIONS = 20  # more, and a run spends much of its time in the queue again (a short partition's limit)


def check_allocations(profile: Profile, path: Path, plan: Plan, confirmed: bool) -> None:
    """A run that would need more than MANY_ALLOCATIONS allocations of the profile's time limit (200,000 steps on an
    express partition) is refused unless `confirmed`: each requeue waits in the queue again."""
    if plan.allocations <= MANY_ALLOCATIONS or confirmed:
        return
    partition = f" on partition '{profile.slurm.partition}'" if profile.slurm else ""
    raise OrchError(
        f"{path}: {plan.steps} steps need an estimated {plan.allocations} allocations of {profile.time_limit_min:g} "
        f"min{partition} (about {plan.hours:.0f} h of training), and every requeue waits in the queue again. "
        f"Allowed: at most {MANY_ALLOCATIONS}; use a profile with longer allocations, fewer --steps, or pass "
        "--many-allocations to submit anyway."
    )
