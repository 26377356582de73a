"""`orch bench`: training throughput of a recipe on this machine's accelerators, for variants of its train settings.

No run is created: the ranks start here (one per GPU, else the profile's ranks on CPU) and train the recipe's data
for a few steps per variant. The steps are the training job's own `Trainer` (jobs/bench.py times it).
"""

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from orchestrator.core.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.core.config import Recipe

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
MICRO_BATCHES = (4, 8, 16)


def variant_recipe(path: Path, recipe: "Recipe", variant: str, world: int) -> "Recipe":
    """The recipe with a variant's train fields set ('recipe' leaves it as it is), checked as a submitted one is."""
    from orchestrator.core.config import AUTO, Recipe
    from orchestrator.core.loading import merge_all, parse_assignment, validate
    from orchestrator.core.plan import AUTO_FIELDS, gradient_accumulation

    overrides = []
    for item in [] if variant == "recipe" else variant.split(","):
        field = item.strip().removeprefix("train.")
        if not field.partition("=")[0] or "=" not in field:
            raise OrchError(
                f"--variants {variant!r}: expected 'recipe' or FIELD=VALUE[,FIELD=VALUE] with fields of the recipe's "
                "train section, e.g. compile=true or micro_batch_size=16,activation_checkpointing=true."
            )
        overrides.append(parse_assignment(f"train.{field}"))
    changed = validate(Path(f"{path} with --variants {variant!r}"), Recipe, merge_all(recipe.model_dump(), overrides))
    train = changed.train
    if AUTO in (getattr(train, field) for field in AUTO_FIELDS):
        raise OrchError(
            f"--variants {variant!r}: a variant sets concrete values (a number, true or false), not auto; the "
            "recipe's own auto settings are those a run on the profile would train."
        )
    gradient_accumulation(train.global_batch_size, train.micro_batch_size, world, f" (variant {variant!r})")
    return changed


def default_variants(recipe: "Recipe", world: int, gpu: bool) -> list[str]:
    """The recipe, then one change at a time: the other attention kernel (flash-attn only where it runs), compile and
    activation checkpointing toggled, and micro batches 4, 8, 16 where the global batch divides."""
    train = recipe.train
    flash = gpu and importlib.util.find_spec("flash_attn") is not None
    attention = "sdpa" if train.attention == "flash2" and not flash else train.attention
    variants = ["recipe"]
    variants += [f"attention={name}" for name in ("sdpa", "flash2") if name != attention and (flash or name == "sdpa")]
    variants += [
        f"compile={str(not train.compile).lower()}",
        f"activation_checkpointing={str(not train.activation_checkpointing).lower()}",
    ]
    variants += [
        f"micro_batch_size={size}"
        for size in MICRO_BATCHES
        if size != train.micro_batch_size and train.global_batch_size % (size * world) == 0
    ]
    return variants


def results_table(
    results: list[dict[str, Any]], recipes: "dict[str, Recipe]", gpu: bool, peak_tflops: float | None
) -> Table:
    """One row per variant; MFU needs a peak, measured memory a GPU (`estimate` is the planner's figure)."""
    from orchestrator.core.estimate import flops_per_token

    table = Table(
        Column("variant", overflow="fold"),
        "attention",
        "micro × accum",
        f"tokens/s per {'GPU' if gpu else 'rank'}",
        "MFU",
        "step s",
        "peak GB (reserved)",
        "estimate GB",
        "data wait",
        "loss",
    )
    for result in results:
        estimate = f"{result['estimate_gb']:.1f}"
        if "error" in result:
            table.add_row(result["variant"], *["-"] * 5, result["error"], estimate, "-", "-")
            continue
        recipe = recipes[result["variant"]]
        tokens_per_s = result["tokens_per_s_per_rank"]
        flops_per_s = flops_per_token(recipe.model, recipe.data.max_seq_len) * tokens_per_s
        table.add_row(
            result["variant"],
            result["attention"],
            f"{result['micro_batch']} × {result['grad_accum']}",
            f"{tokens_per_s:,.0f}",
            f"{flops_per_s / (peak_tflops * 1e12):.1%}" if peak_tflops else "-",
            f"{result['step_s']:.3f}",
            measured_memory(result),
            estimate,
            f"{result['data_wait_fraction']:.1%}",
            f"{result['loss']:.3f}",
        )
    return table


def measured_memory(result: dict[str, Any]) -> str:
    """torch.cuda.max_memory_allocated (and max_memory_reserved: what the allocator held), "-" on CPU."""
    if result["peak_memory_gb"] is None:
        return "-"
    return f"{result['peak_memory_gb']:.1f} ({result['peak_reserved_gb']:.1f})"


@app.command()
def bench(
    profile: Annotated[str, typer.Option(help="cluster profile: its CPU launch settings where no GPU is present")] = (
        "local"
    ),
    recipe: Annotated[str, typer.Option(help="training recipe: a name in recipes/ or a YAML path")] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="timed optimizer steps per variant")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="untimed steps before them (compilation, allocator)")] = 2,
    variants: Annotated[
        Optional[list[str]],
        typer.Option(
            help="'recipe' or FIELD=VALUE[,FIELD=VALUE] of the recipe's train section (repeatable); "
            "default: the recipe, then attention, compile, activation checkpointing and micro batch one at a time"
        ),
    ] = None,
    ranks: Annotated[Optional[int], typer.Option(min=1, help="ranks: default one per GPU, else the profile's")] = None,
    global_batch: Annotated[
        Optional[int], typer.Option(min=1, help="train.global_batch_size for every variant (less accumulation)")
    ] = None,
    peak_tflops: Annotated[
        Optional[float], typer.Option(help="dense bf16 peak per GPU for MFU; default: the profile's")
    ] = None,
    data_dir: Annotated[
        Optional[Path], typer.Option(help="folder to prepare the recipe's data in and reuse; default: a temporary one")
    ] = None,
) -> None:
    """Tokens/s, MFU, peak memory and data wait of a recipe's training steps here, per variant; creates no run."""
    from orchestrator.core.config import Recipe
    from orchestrator.core.loading import load_profile, load_recipe, merge_all, validate
    from orchestrator.core.plan import choose_train
    from orchestrator.core.preflight import check_data

    _, resolved_profile = load_profile(profile)
    recipe_path, base = load_recipe(recipe)
    base = choose_train(resolved_profile, base, resolved_profile.world_size, recipe_path).setting.applied(base)
    if global_batch:
        base = validate(
            recipe_path, Recipe, merge_all(base.model_dump(), [{"train": {"global_batch_size": global_batch}}])
        )
    check_data(base, recipe_path)
    from jobs.bench import available_ranks, run_benchmark
    from jobs.data import source_splits
    from orchestrator.tools.run_data import attach_data

    where = available_ranks(resolved_profile, ranks)
    gpu = where.device == "cuda"
    names = variants or default_variants(base, where.world, gpu)
    recipes = {name: variant_recipe(recipe_path, base, name, where.world) for name in names}
    peak = peak_tflops or resolved_profile.node.peak_bf16_tflops
    os.environ.update(resolved_profile.env_vars)
    console.print(
        f"{recipe_path.stem}: {where.world} {where.device} rank(s), {where.backend}, global batch "
        f"{base.train.global_batch_size} × {base.data.max_seq_len} tokens, {warmup} + {steps} steps per variant"
    )
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as scratch:
        folder = data_dir or Path(scratch) / "data"
        attach_data(base.data, base.model.vocab_size, base.train.seed, folder)
        indexes = [part.index for part in source_splits(folder, "train").values()]
        results = run_benchmark(list(recipes.items()), where, steps, warmup, folder)
    console.print(
        f"data: {sum(i.tokens for i in indexes):,} training tokens, token ids below "
        f"{max(i.vocab_size for i in indexes)} "
        f"(model vocabulary {base.model.vocab_size})"
    )
    table_console = console if console.is_terminal else Console(width=150)  # a log keeps every column whole
    table_console.print(results_table(results, recipes, gpu, peak))
