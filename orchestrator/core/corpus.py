"""Facts about prepared corpora that the data tools, the training job and the CLI share."""

from __future__ import annotations

SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 tokens per shard file
VAL_FRACTION = 0.001  # documents held out by `orch data prepare`
# One evaluation pass of the seed recipe (cstinyllama-1.2b) on one Karolina node, as (ranks, micro batch, tokens per
# block): what `orch data prepare`, which knows no recipe, compares a val split with (tests/test_plan.py checks it).
SEED_EVAL_PASS = (8, 8, 2048)
FORMATS_HELP = (
    "one of these formats: .txt (one document per block of non-blank lines; blank lines separate documents), "
    ".jsonl (one document per line, its 'text' field), either also as .gz or .zst, .parquet (its 'text' column), "
    "or a folder written by datasets' save_to_disk (its 'text' column)."
)


def cannot_validate(
    val_tokens: dict[str, int], eval_blocks: int, ranks: int, micro_batch: int, max_seq_len: int
) -> str | None:
    """Why a run logs no val_loss for some of its sources (`val_tokens`: each source's val split, "" for one source),
    or None. `jobs.evaluate` runs whole passes of ranks × micro batch blocks, so a val split or an `eval.blocks`
    smaller than one pass gives nothing: the plan, the job's log and its MLflow run say so, where otherwise
    `orch compare` would wait for a val perplexity that never comes."""
    per_pass = ranks * micro_batch
    one_pass = f"one evaluation pass of {per_pass:,} blocks ({ranks} ranks × micro batch {micro_batch})"
    if eval_blocks < per_pass:
        return (
            f"cannot validate: eval.blocks is {eval_blocks:,}, fewer than {one_pass}: no val_loss or val_perplexity "
            f"is logged. Fix: eval.blocks of at least {per_pass:,} in the recipe."
        )
    short = {name: tokens for name, tokens in val_tokens.items() if tokens // max_seq_len < per_pass}
    if not short:
        return None
    held = "; ".join(
        f"{val_split_of(name)} holds {tokens:,} tokens ({tokens // max_seq_len:,} whole blocks of {max_seq_len:,})"
        for name, tokens in short.items()
    )
    logged = (
        "no val_loss or val_perplexity is logged"
        if len(short) == len(val_tokens)
        else f"no val_loss/{', val_loss/'.join(short)}, and val_loss is the other sources' mean"
    )
    return (
        f"cannot validate: {held}, fewer than {one_pass}, {per_pass * max_seq_len:,} tokens: {logged}. Fix: "
        f"prepare the data with a larger --val-fraction so that val holds at least {per_pass * max_seq_len:,} "
        "tokens (a .txt file without blank lines is one document: docs/data.md), or fewer ranks or a smaller "
        "train.micro_batch_size."
    )


def val_split_of(source: str) -> str:
    """How a message names a source's val split ("" is a run's one source)."""
    return f"source {source}'s val split" if source else "the val split"
