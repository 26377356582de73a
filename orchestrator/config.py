"""Cluster profiles and training recipes: plain YAML data validated by pydantic schemas.

Profiles live in `cluster_profiles/`, recipes in `recipes/`; a file's name (without `.yaml`) is its name.
Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import OrchError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_ROOT / "cluster_profiles"
RECIPES_DIR = PROJECT_ROOT / "recipes"


class Strict(BaseModel):
    """Unknown or mistyped keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- cluster profiles -------------------------------------------------------------------------


class Launch(Strict):
    """How ranks are laid out: one task (process) per accelerator, or per CPU slot locally."""

    tasks_per_node: int = Field(ge=1)
    device: Literal["cpu", "cuda"]
    backend: Literal["gloo", "nccl"]


class Profile(Strict):
    """Where and how a run's job executes."""

    description: str = ""
    executor: Literal["local", "slurm"]
    nodes: int = Field(default=1, ge=1)
    time_limit_min: float = Field(gt=0, description="wall-clock limit of one allocation")
    signal_delay_s: int = Field(default=30, ge=1, description="warning signal this long before the limit")
    launch: Launch
    env_setup: list[str] = Field(default_factory=list, description="shell lines run before the job starts")
    tracking_uri: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.launch.tasks_per_node


# --- recipes ------------------------------------------------------------------------------------


class ModelSpec(Strict):
    """A Llama decoder (the TinyLlama architecture family)."""

    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    vocab_size: int = Field(ge=2)
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    init_from: str | None = Field(default=None, description="a local Hugging Face model directory")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}) "
                f"and num_kv_heads ({self.num_kv_heads}) must divide num_heads"
            )
        return self


class DataSpec(Strict):
    """The Concat dataset: documents joined with EOS and cut into max_seq_len blocks."""

    dataset: Literal["concat"] = "concat"
    source: str = Field(description="'demo' (a generated corpus) or a folder of .txt documents")
    tokenizer: str = Field(description="'demo' (trained on the demo corpus) or a tokenizer directory")
    max_seq_len: int = Field(ge=2)


class TrainSpec(Strict):
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(ge=1, description="sequences per rank per forward pass")
    precision: Literal["bf16", "fp32"]
    attention: Literal["flash2", "sdpa", "eager"]
    fsdp: Literal["shard_grad_op", "full_shard"]
    grad_clip: float = Field(gt=0)
    seed: int = 0


class OptimizerSpec(Strict):
    name: Literal["lionw"] = "lionw"
    lr: float = Field(gt=0)
    betas: tuple[float, float]
    weight_decay: float = Field(ge=0)


class ScheduleSpec(Strict):
    """Linear warmup, then cosine decay to alpha × peak at total_steps (flat afterwards)."""

    name: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(ge=0)
    total_steps: int = Field(ge=1)
    alpha: float = Field(ge=0, le=1)


class CheckpointSpec(Strict):
    every_steps: int = Field(ge=1)


class Recipe(Strict):
    """What to train: independent of where it runs. `--steps` (training length) is not part of it."""

    description: str = ""
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    checkpoint: CheckpointSpec


# --- loading ------------------------------------------------------------------------------------


def available(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_file(kind: str, name: str, directory: Path) -> Path:
    """A name from the catalogue, or a path to a YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    path = directory / f"{name}.yaml"
    if path.is_file():
        return path
    names = available(directory)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise OrchError(f"Unknown {kind} '{name}'.{hint} Available {kind}s in {directory}: {', '.join(names)}.")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise OrchError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise OrchError(f"{path}: expected a mapping of fields at the top level, found {type(data).__name__}.")
    return data


def describe_validation_error(path: Path, schema: type[BaseModel], err: ValidationError) -> str:
    """One readable paragraph: which file, which field, what is allowed."""
    problems = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = allowed_fields(schema, item["loc"][:-1])
            close = difflib.get_close_matches(str(item["loc"][-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"unknown field '{field}' ({hint}allowed here: {', '.join(allowed)})")
        elif item["type"] == "missing":
            problems.append(f"field '{field}' is required")
        else:
            problems.append(f"field '{field}': {item['msg']} (got {item.get('input')!r})")
    return f"{path}: " + "; ".join(problems) + "."


def allowed_fields(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names accepted at a nested location of a schema."""
    model: Any = schema
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = annotation
    return list(model.model_fields)


def validate(path: Path, schema: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise OrchError(describe_validation_error(path, schema, err)) from None


def load_profile(name: str) -> tuple[Path, Profile]:
    path = resolve_file("profile", name, PROFILES_DIR)
    return path, validate(path, Profile, read_yaml(path))


def load_recipe(name: str) -> tuple[Path, Recipe]:
    path = resolve_file("recipe", name, RECIPES_DIR)
    return path, validate(path, Recipe, read_yaml(path))
