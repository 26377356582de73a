"""Local task data: a JSONL file beside this module, read without the Hugging Face hub or its cache, so the task
runs offline on any node (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1)."""

import json
from pathlib import Path

import datasets


def load(data_file: str, **_: object) -> datasets.DatasetDict:
    """The test split; lm-evaluation-harness also passes the task's metadata, which the data does not need."""
    lines = (Path(__file__).parent / data_file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
