"""Facts about prepared corpora that the data tools, the training job and the CLI share."""

from __future__ import annotations

SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 tokens per shard file
VAL_FRACTION = 0.001  # documents held out by `orch data prepare`
FORMATS_HELP = (
    "one of these formats: .txt (one document per block of non-blank lines; blank lines separate documents), "
    ".jsonl (one document per line, its 'text' field), either also as .gz or .zst, .parquet (its 'text' column), "
    "or a folder written by datasets' save_to_disk (its 'text' column)."
)
