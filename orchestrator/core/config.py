"""Cluster profiles and training recipes: plain YAML data validated by pydantic schemas.

Profiles live in `cluster_profiles/`, recipes in `recipes/`; a file's name (without `.yaml`) is its name.
Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.core.errors import OrchError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = PROJECT_ROOT / "cluster_profiles"
RECIPES_DIR = PROJECT_ROOT / "recipes"


class Strict(BaseModel):
    """Unknown or mistyped keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- cluster profiles -------------------------------------------------------------------------

# Values that reach the generated job script: no whitespace, quotes, newlines, NUL or shell metacharacters.
SAFE = r"^[A-Za-z0-9_.,:/=@+%{}-]*$"
SAFE_TEXT = "letters, digits and _ . , : / = @ + % { } -"
SBATCH_ALLOWED = ("constraint", "exclusive", "mail-type", "mail-user", "reservation", "comment", "exclude", "nodelist")


class Launch(Strict):
    """How ranks are laid out: one task (process) per accelerator, or per CPU slot locally."""

    tasks_per_node: int = Field(ge=1)
    device: Literal["cpu", "cuda"]
    backend: Literal["gloo", "nccl"]


class Node(Strict):
    """The hardware of one node: used for the plan's resource request, memory check and MFU."""

    cores: int = Field(ge=1)
    memory_gb: float = Field(gt=0)
    gpus: int = Field(default=0, ge=0)
    gpu_model: str | None = None
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    peak_bf16_tflops: float | None = Field(default=None, gt=0, description="dense bf16 peak per GPU")
    cores_per_gpu: int | None = Field(default=None, ge=1)


class Slurm(Strict):
    """The partition and its limits; every string here ends up in the sbatch script."""

    partition: str = Field(pattern=SAFE)
    account: str | None = Field(default=None, pattern=SAFE)
    account_required: bool = False
    qos: str | None = Field(default=None, pattern=SAFE)
    max_walltime_min: float = Field(gt=0)
    max_nodes: int = Field(ge=1)
    cpus_per_task: int = Field(default=1, ge=1)
    extra_sbatch: dict[str, str] = Field(default_factory=dict, description=f"allowed keys: {SBATCH_ALLOWED}")

    @field_validator("extra_sbatch")
    @classmethod
    def _allowed_directives(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if key not in SBATCH_ALLOWED:
                raise ValueError(f"sbatch directive '{key}' is not allowed; allowed: {', '.join(SBATCH_ALLOWED)}")
            if not re.match(SAFE, item):
                raise ValueError(f"value {item!r} of '{key}' may only contain {SAFE_TEXT} (it reaches the job script)")
        return value


class Paths(Strict):
    """Where run directories and the job environment live; `{account_lower}` and `{user}` are filled in.
    Unset `runs` means $ORCH_HOME/runs."""

    runs: str | None = Field(default=None, pattern=SAFE)
    venv: str | None = Field(default=None, pattern=SAFE, description="the environment env_script builds/activates")


class Profile(Strict):
    """Where and how a run's job executes."""

    description: str = ""
    extends: str | None = Field(default=None, description="a profile whose fields this one overrides")
    executor: Literal["local", "slurm"]
    nodes: int = Field(default=1, ge=1)
    time_limit_min: float = Field(gt=0, description="wall-clock limit of one allocation")
    signal_delay_s: int = Field(default=30, ge=1, description="warning signal at least this long before the limit")
    launch: Launch
    node: Node
    slurm: Slurm | None = None
    paths: Paths = Paths()
    env_script: str | None = Field(default=None, pattern=SAFE, description="a script in envs/ sourced before start")
    env_vars: dict[str, str] = Field(default_factory=dict)
    python: str = Field(default="", pattern=SAFE, description="python on the compute nodes; empty: this one")
    tracking_uri: str | None = None
    expected_mfu: float = Field(default=0.4, gt=0, le=1, description="model FLOPs utilisation for estimates")

    @field_validator("env_vars")
    @classmethod
    def _safe_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name) or not re.match(SAFE, item):
                raise ValueError(
                    f"{name}={item!r}: names are identifiers, values may only contain {SAFE_TEXT} "
                    "(it reaches the job script)"
                )
        return value

    @model_validator(mode="after")
    def _slurm_section(self) -> Profile:
        if self.executor == "slurm" and self.slurm is None:
            raise ValueError("executor 'slurm' needs a 'slurm' section (partition, max_walltime_min, max_nodes)")
        if self.executor == "local" and self.env_script:
            raise ValueError("env_script is for Slurm profiles; a local job runs in this environment (use env_vars)")
        if self.env_script and not (PROJECT_ROOT / self.env_script).is_file():
            raise ValueError(f"env_script '{self.env_script}' is not a file under {PROJECT_ROOT}")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.launch.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.node.gpus


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
    source: str = Field(description="'demo', a folder made by `orch data prepare`, or a folder of documents")
    tokenizer: str = Field(
        description="'demo' (trained on the documents) or a tokenizer directory; for a prepared source, the one used"
    )
    max_seq_len: int = Field(ge=2)


class TrainSpec(Strict):
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(ge=1, description="sequences per rank per forward pass")
    precision: Literal["bf16", "fp32"]
    attention: Literal["flash2", "sdpa", "eager"]
    fsdp: Literal["shard_grad_op", "full_shard"]
    grad_clip: float = Field(gt=0)
    activation_checkpointing: bool = Field(default=False, description="recompute each block in backward")
    compile: bool = Field(default=False, description="torch.compile each transformer block")
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
    keep_last: int = Field(default=2, ge=2, description="newest checkpoints kept")
    keep_every: int | None = Field(default=None, ge=1, description="steps that are multiples are kept for good")
    async_save: bool = Field(default=True, description="write in the background; training waits only for the copy")


class EvalSpec(Strict):
    """Validation on the held-out split every `every_steps` steps and at the end."""

    every_steps: int = Field(ge=1)
    blocks: int = Field(ge=1, description="validation blocks per evaluation (rounded to ranks × micro batch)")


class Recipe(Strict):
    """What to train: independent of where it runs. `--steps` (training length) is not part of it."""

    description: str = ""
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    checkpoint: CheckpointSpec
    eval: EvalSpec | None = None


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
        elif item["type"] == "string_pattern_mismatch":
            problems.append(
                f"field '{field}': {item['input']!r} may only contain {SAFE_TEXT} (it reaches the job script)"
            )
        elif not item["loc"]:
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"field '{field}': {message} (got {item.get('input')!r})")
    return f"{path}: " + "; ".join(problems) + "."


def allowed_fields(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names accepted at a nested location of a schema."""
    model: Any = schema
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = next(t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel))
    return list(model.model_fields)


def validate(path: Path, schema: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise OrchError(describe_validation_error(path, schema, err)) from None


def profile_data(name: str, seen: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """A profile's fields with those of the profile it `extends` underneath."""
    path = resolve_file("profile", name, PROFILES_DIR)
    data = read_yaml(path)
    base = data.get("extends")
    if base is None:
        return path, data
    if not isinstance(base, str) or base in seen + (path.stem,):
        raise OrchError(f"{path}: field 'extends' must name another profile, without cycles (got {base!r}).")
    _, merged = profile_data(base, seen + (path.stem,))
    return path, deep_merge(merged, data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_assignment(text: str) -> dict[str, Any]:
    """`a.b.c=value` (value read as YAML) as a nested mapping."""
    key, sep, raw = text.partition("=")
    if any(c in text for c in "\n\r\0"):
        raise OrchError(f"--set {text!r}: a value may not contain line breaks or NUL characters.")
    if not sep or not key or not all(key.split(".")):
        raise OrchError(f"--set {text!r}: expected FIELD=VALUE with a dotted field, e.g. --set slurm.qos=normal.")
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_profile(name: str, overrides: list[dict[str, Any]] = ()) -> tuple[Path, Profile]:
    """The profile, after `extends` and the command line's overrides (later ones win)."""
    path, data = profile_data(name)
    return path, validate(path, Profile, merge_all(data, overrides))


def merge_all(data: dict[str, Any], overrides: list[dict[str, Any]]) -> dict[str, Any]:
    for override in overrides:
        data = deep_merge(data, override)
    return data


def load_recipe(name: str) -> tuple[Path, Recipe]:
    path = resolve_file("recipe", name, RECIPES_DIR)
    return path, validate(path, Recipe, read_yaml(path))
