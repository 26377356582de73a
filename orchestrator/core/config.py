"""Cluster profiles and training recipes: plain YAML data validated by pydantic schemas.

Profiles live in `cluster_profiles/`, recipes in `recipes/`; a file's name (without `.yaml`) is its name.
Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import errno
import itertools
import math
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.core.errors import OrchError
from orchestrator.core.files import NotAPlainFile, read_plain

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = PROJECT_ROOT / "cluster_profiles"
RECIPES_DIR = PROJECT_ROOT / "recipes"


class Strict(BaseModel):
    """Unknown or mistyped keys are errors, never silently ignored; values are taken as they are written (no
    'yes' for true, no '5' or 5.0 for an integer) and numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


MAX_TIME_LIMIT_MIN = 365 * 1440  # a year: beyond any partition's limit, and a bound on the plan's arithmetic
MAX_NODES = 100_000  # above the largest machines; node counts drive loops in planning


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
    max_walltime_min: float = Field(gt=0, le=MAX_TIME_LIMIT_MIN)
    max_nodes: int = Field(ge=1, le=MAX_NODES)
    cpus_per_task: int = Field(default=1, ge=1, description="also passed to srun (Slurm 22.05-23.02 does not)")
    wckey: str | None = Field(default=None, pattern=SAFE, description="only where the site wants one")
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


COLLECTIVE_TIMEOUT_S = 600.0  # the process group's timeout where no profile says otherwise (`orch bench`, doctor)


class WatchdogSpec(Strict):
    """Hang detection (docs/watchdog.md): how long a rank may go without finishing a step before the job is stopped
    and requeued from its last checkpoint, and how long one collective may wait for its peers."""

    step_factor: float = Field(default=10.0, ge=1, description="a step may take this many times the recent median")
    min_step_s: float = Field(default=60.0, gt=0, description="the floor of that bound, in seconds")
    first_step_s: float = Field(
        default=1800.0,
        gt=0,
        description="the bound for a job's start through its first step (building, checkpoint load, compiling) and "
        "for each evaluation and checkpoint save, in seconds",
    )
    collective_timeout_s: float = Field(
        default=COLLECTIVE_TIMEOUT_S,
        gt=0,
        description="a collective that waits longer for its peers fails the job (the process group's timeout)",
    )


class RecoverySpec(Strict):
    """Automatic recovery after a crash (docs/watchdog.md): how many times a job requeues itself, and when a host is
    kept out of the next try."""

    retries: int = Field(default=2, ge=0, le=100, description="requeues after crashes per job; 0 turns recovery off")
    exclude_after: int = Field(
        default=2, ge=1, description="a host where this many tries failed is excluded from the next (Slurm)"
    )


class Profile(Strict):
    """Where and how a run's job executes."""

    description: str = ""
    extends: str | None = Field(default=None, description="a profile whose fields this one overrides")
    executor: Literal["local", "slurm"]
    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    time_limit_min: float = Field(gt=0, le=MAX_TIME_LIMIT_MIN, description="wall-clock limit of one allocation")
    signal_delay_s: int = Field(
        default=30, ge=1, le=MAX_TIME_LIMIT_MIN * 60, description="warning signal at least this long before the limit"
    )
    launch: Launch
    node: Node
    slurm: Slurm | None = None
    paths: Paths = Paths()
    env_script: str | None = Field(default=None, pattern=SAFE, description="a script in envs/ sourced before start")
    env_vars: dict[str, str] = Field(default_factory=dict)
    python: str = Field(default="", pattern=SAFE, description="python on the compute nodes; empty: this one")
    tracking_uri: str | None = None
    expected_mfu: float = Field(default=0.4, gt=0, le=1, description="model FLOPs utilisation for estimates")
    default_recipe: str = Field(default="tiny", description="the recipe `orch submit` trains when none is named")
    demo_data: bool = Field(default=True, description="whether a real submission may train the generated demo corpus")
    preemptible: bool = Field(
        default=False,
        description="the scheduler may preempt jobs with SIGTERM: save at the next step boundary, let it requeue",
    )
    job_tracking: Literal["direct", "spool"] = Field(
        default="direct",
        description="direct: jobs send metrics to MLflow; spool: jobs only write metrics.jsonl and `orch sync "
        "--follow` (or `orch ui`) on the login node is the store's single writer (SQLite on Lustre)",
    )
    system_metrics_interval_s: float = Field(
        default=10.0, ge=0, le=86400, description="seconds between samples of each node's CPU, memory and GPUs; 0: off"
    )
    watchdog: WatchdogSpec = WatchdogSpec()
    recovery: RecoverySpec = RecoverySpec()

    @field_validator("time_limit_min")
    @classmethod
    def _whole_minutes_for_slurm(cls, value: float, info: ValidationInfo) -> float:
        """Slurm counts whole minutes (and a 0 would mean no limit at all); the LocalExecutor takes fractions."""
        if info.data.get("executor") == "slurm" and (value < 1 or value != int(value)):
            raise ValueError(
                "Slurm time limits are whole minutes, at least 1; allowed: a whole number of minutes, "
                "e.g. --time 30 or --time 1:00:00"
            )
        return value

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
        if self.executor == "local" and self.nodes != 1:
            raise ValueError(f"nodes is {self.nodes}: the local executor runs on this one machine; allowed: 1")
        if self.executor == "local" and self.env_script:
            raise ValueError("env_script is for Slurm profiles; a local job runs in this environment (use env_vars)")
        if self.env_script and not is_file(PROJECT_ROOT / self.env_script):
            raise ValueError(f"env_script {shown(self.env_script)} is not a file under {PROJECT_ROOT}")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.launch.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.node.gpus


def is_file(path: Path) -> bool:
    """Whether `path` is a file; a name the filesystem cannot take (too long) is not one."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


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
    rms_norm_eps: float = Field(default=1e-5, gt=0, lt=1)
    init_from: str | None = Field(default=None, description="a local Hugging Face model directory")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}) "
                f"and num_kv_heads ({self.num_kv_heads}) must divide num_heads"
            )
        return self


SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"  # names metrics (mix/NAME, val_loss/NAME)


class MixSource(Strict):
    """One prepared corpus of a mixture and its share of the samples (weights are relative: 9 and 1 = 0.9 and 0.1)."""

    path: str = Field(description="a folder made by `orch data prepare`")
    weight: float = Field(ge=0, allow_inf_nan=False, description="its share of the samples, relative to the others")


class DataSpec(Strict):
    """The Concat dataset: documents joined with EOS and cut into max_seq_len blocks, from one source or a weighted
    mixture of prepared sources (jobs.data.Mixture)."""

    dataset: Literal["concat"] = "concat"
    source: str | None = Field(
        default=None, description="'demo', a folder made by `orch data prepare`, or a folder of documents"
    )
    sources: dict[Annotated[str, StringConstraints(pattern=SOURCE_NAME)], MixSource] | None = Field(
        default=None, description="instead of source: named prepared folders, mixed by weight"
    )
    tokenizer: str = Field(
        description="'demo' (trained on the documents) or a tokenizer directory; for a prepared source, the one used"
    )
    max_seq_len: int = Field(ge=2)

    @model_validator(mode="after")
    def _one_source_or_a_mixture(self) -> DataSpec:
        if (self.source is None) == (self.sources is None):
            raise ValueError(
                "give either 'source' (one corpus) or 'sources' (a weighted mixture), not both and not neither; a "
                "recipe that extends one with a source replaces it by a mixture with 'source: null'"
            )
        if self.sources is not None and not 0 < sum(s.weight for s in self.sources.values()) < math.inf:
            raise ValueError("the weights of 'sources' must sum to a positive, finite number (e.g. 0.9 and 0.1)")
        return self

    @property
    def weights(self) -> dict[str, float]:
        """The mixture's weights, by source name (empty for one source)."""
        return {name: s.weight for name, s in (self.sources or {}).items()}


AUTO = "auto"  # a train setting the planner picks for the profile (orchestrator.core.plan.choose_train)


def bool_or_auto(value: Any) -> bool | str:
    """true, false or auto; anything else is reported as a wrong boolean (so YAML 1.1's `yes` gets its hint)."""
    if isinstance(value, bool) or value == AUTO:
        return value
    raise PydanticCustomError("bool_type", "Input should be true, false or 'auto'")


def count_or_auto(value: Any) -> int | str:
    """A whole number of at least 1, or auto."""
    if value == AUTO or (type(value) is int and value >= 1):
        return value
    if type(value) is int:
        raise PydanticCustomError("greater_than_equal", "Input should be at least 1 or 'auto'")
    raise PydanticCustomError("int_type", "Input should be a whole number or 'auto'")


BoolOrAuto = Annotated[bool | Literal["auto"], PlainValidator(bool_or_auto)]
CountOrAuto = Annotated[int | Literal["auto"], PlainValidator(count_or_auto)]


class TrainSpec(Strict):
    """How to train. `micro_batch_size`, `compile` and `activation_checkpointing` may be `auto`: the plan picks the
    fastest setting that fits the GPU's memory, and the run's recipe.yaml records the values picked."""

    global_batch_size: int = Field(ge=1, description="sequences per optimizer step")
    micro_batch_size: CountOrAuto = Field(description="sequences per rank per forward pass, or auto")
    precision: Literal["bf16", "fp32"]
    attention: Literal["flash2", "sdpa", "eager"]
    fsdp: Literal["shard_grad_op", "full_shard"]
    grad_clip: float = Field(gt=0)
    activation_checkpointing: BoolOrAuto = Field(default=False, description="recompute each block in backward")
    compile: BoolOrAuto = Field(default=False, description="torch.compile each transformer block")
    seed: int = Field(default=0, ge=0, lt=2**63, description="what NumPy and PyTorch generators accept")


class OptimizerSpec(Strict):
    name: Literal["lionw"] = "lionw"
    lr: float = Field(gt=0, lt=1, description="peak learning rate")
    betas: tuple[float, float] = Field(description="each in [0, 1)")
    weight_decay: float = Field(ge=0)

    @field_validator("betas", mode="before")
    @classmethod
    def _list_is_a_pair(cls, value: Any) -> Any:
        """YAML and JSON write a pair as a list."""
        return tuple(value) if isinstance(value, list) else value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("each beta must be at least 0 and below 1")
        return value


class ScheduleSpec(Strict):
    """The learning rate as a multiple of the peak (optimizer.lr), a function of the step alone
    (`orchestrator.core.schedule`): linear warmup to the peak at `warmup_steps`, a decay that reaches `alpha` × peak
    at `total_steps`, flat afterwards. cosine and linear decay over every step after the warmup; wsd
    (warmup-stable-decay) holds the peak and decays over the last `decay_steps` only, so that a run is lengthened by
    lengthening its stable phase (docs/recipes.md)."""

    name: Literal["cosine", "linear", "wsd"] = "cosine"
    warmup_steps: int = Field(ge=0)
    total_steps: int = Field(ge=1, description="the step at which the rate reaches its floor, alpha × peak")
    alpha: float = Field(ge=0, le=1)
    decay_steps: int | None = Field(default=None, ge=1, description="wsd: the length of the final decay (cooldown)")
    decay_shape: Literal["1-sqrt", "linear", "cosine"] | None = Field(
        default=None, description="wsd: the decay's shape; 1-sqrt when not given"
    )

    @model_validator(mode="after")
    def _phases_fit(self) -> ScheduleSpec:
        warmup, total, decay = self.warmup_steps, self.total_steps, self.decay_steps
        if warmup > total:
            raise ValueError(f"warmup_steps ({warmup}) is longer than total_steps ({total})")
        if self.name != "wsd" and (decay is not None or self.decay_shape is not None):
            raise ValueError(
                f"decay_steps and decay_shape are for the wsd schedule; a {self.name} schedule decays over every "
                "step after its warmup (total_steps - warmup_steps)"
            )
        if self.name == "wsd" and decay is None:
            raise ValueError("the wsd schedule needs decay_steps, the length of its final decay")
        if self.name == "wsd" and warmup + decay > total:
            raise ValueError(
                f"warmup_steps ({warmup}) + decay_steps ({decay}) is longer than total_steps ({total}); "
                f"allowed: decay_steps up to {total - warmup}"
            )
        return self

    @property
    def decay_start(self) -> int:
        """The step at which the decay starts from the peak: the end of the warmup, or of wsd's stable phase."""
        return self.total_steps - self.decay_steps if self.name == "wsd" else self.warmup_steps


class CheckpointSpec(Strict):
    every_steps: int = Field(ge=1)
    keep_last: int = Field(default=2, ge=2, description="newest checkpoints kept")
    keep_every: int | None = Field(default=None, ge=1, description="steps that are multiples are kept for good")
    async_save: bool = Field(default=True, description="write in the background; training waits only for the copy")


class EvalSpec(Strict):
    """Validation on the held-out split every `every_steps` steps and at the end."""

    every_steps: int = Field(ge=1)
    blocks: int = Field(ge=1, description="validation blocks per evaluation (rounded to ranks × micro batch)")


class LogSpec(Strict):
    """What rank 0 writes into the job log besides validations, saves and stops (`orch logs RUN -f`, README)."""

    every_steps: int = Field(default=10, ge=1, description="steps between two progress lines")


class SpikeGuardSpec(Strict):
    """A step whose loss is above `factor` × the median of the last `window` losses (once `min_steps` are known) is
    undone: the run goes back to its last committed checkpoint and skips the data of the steps from there through
    the spike (docs/rollback.md). A spike that comes back after `max_rollbacks` rollbacks to one checkpoint stops
    the job."""

    factor: float = Field(default=3.0, gt=1)
    window: int = Field(default=50, ge=1, description="losses the median is taken over")
    min_steps: int = Field(default=20, ge=1, description="losses known before the guard acts")
    max_rollbacks: int = Field(default=3, ge=1, description="rollbacks to one checkpoint before the job stops")

    @model_validator(mode="after")
    def _window_holds_min_steps(self) -> SpikeGuardSpec:
        if self.window < self.min_steps:
            raise ValueError(
                f"window ({self.window}) is shorter than min_steps ({self.min_steps}): the window never holds "
                f"min_steps losses, so the guard would never act; allowed: window >= min_steps"
            )
        return self


class Recipe(Strict):
    """What to train: independent of where it runs. `--steps` (training length) is not part of it."""

    description: str = ""
    extends: str | None = Field(default=None, description="a recipe whose fields this one overrides")
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    checkpoint: CheckpointSpec
    eval: EvalSpec | None = None
    spike_guard: SpikeGuardSpec | None = Field(default=None, description="off unless given")
    log: LogSpec = Field(default_factory=LogSpec, description="the job log's progress lines")


# --- loading ------------------------------------------------------------------------------------

MAX_FILE_BYTES = 1 << 20  # profiles and recipes are a few hundred bytes
MAX_DEPTH = 32  # nesting of mappings and lists
SHOWN_VALUE_CHARS = 200  # a value quoted in a message
MAX_MESSAGE_CHARS = 3000  # a whole message stays one readable paragraph

TAG = "tag:yaml.org,2002:"


class Refused(yaml.MarkedYAMLError):
    """YAML that parses but is not accepted in orch's files."""


class Loader(yaml.SafeLoader):
    """YAML 1.2's core schema: only `true`/`false` are booleans, only `null`/`~`/empty is null, numbers are plain
    decimal (or 0o/0x) integers and floats. `yes`, `no`, `on`, `off`, `1:30:00`, `2024-01-01` stay strings, so a
    schema refuses them where a number or boolean belongs instead of guessing. Anchors, aliases and merge keys are
    refused (they let a few lines expand into gigabytes), as are duplicate keys, other tags and deep nesting."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # none of YAML 1.1's
    yaml_constructors: dict[Any, Any] = {}  # only the core schema's, below

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise Refused(
                None, None, "anchors and aliases (&name, *name) are not allowed; write each value out", event.start_mark
            )
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > MAX_DEPTH:
            raise Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key, _ in node.value:
                if key.tag == TAG + "merge":
                    raise Refused(None, None, "merge keys (<<) are not allowed; write each field out", key.start_mark)
                if isinstance(key, yaml.ScalarNode):
                    if (key.tag, key.value) in seen:
                        raise Refused(None, None, f"duplicate key {shown(key.value)}", key.start_mark)
                    seen.add((key.tag, key.value))
        return node

    def construct_yaml_bool(self, node: Any) -> bool:
        value = self.construct_scalar(node)
        if value.lower() not in ("true", "false"):
            raise Refused(None, None, f"{shown(value)} is not a boolean (true or false)", node.start_mark)
        return value.lower() == "true"

    def construct_yaml_int(self, node: Any) -> int:
        value = self.construct_scalar(node)
        sign, digits = (-1, value[1:]) if value[:1] == "-" else (1, value.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:
            raise Refused(None, None, f"{shown(value)} is not an integer orch can read", node.start_mark) from None

    def construct_yaml_float(self, node: Any) -> float:
        value = self.construct_scalar(node)
        if re.fullmatch(r"[-+]?\.(?:inf|Inf|INF)", value):
            return -math.inf if value.startswith("-") else math.inf
        if re.fullmatch(r"\.(?:nan|NaN|NAN)", value):
            return math.nan
        try:
            return float(value)
        except ValueError:
            raise Refused(None, None, f"{shown(value)} is not a number", node.start_mark) from None

    def construct_undefined(self, node: Any) -> Any:
        raise Refused(None, None, f"the tag {shown(node.tag)} is not allowed", node.start_mark)


for _tag, _pattern, _first in (
    ("null", r"(?:~|null|Null|NULL|)\Z", ["~", "n", "N", ""]),
    ("bool", r"(?:true|True|TRUE|false|False|FALSE)\Z", list("tTfF")),
    ("int", r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z", list("-+0123456789")),
    (
        "float",
        r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z",
        list("-+0123456789."),
    ),
    ("merge", r"<<\Z", ["<"]),  # recognised only to be refused
):
    Loader.add_implicit_resolver(TAG + _tag, re.compile(_pattern), _first)
for _tag, _construct in (
    ("null", yaml.SafeLoader.construct_yaml_null),
    ("bool", Loader.construct_yaml_bool),
    ("int", Loader.construct_yaml_int),
    ("float", Loader.construct_yaml_float),
    ("str", yaml.SafeLoader.construct_yaml_str),
    ("seq", yaml.SafeLoader.construct_yaml_seq),
    ("map", yaml.SafeLoader.construct_yaml_map),
):
    Loader.add_constructor(TAG + _tag, _construct)
Loader.add_constructor(None, Loader.construct_undefined)


class Dumper(yaml.SafeDumper):
    """Writes what `Loader` reads back as the same values: a string that either YAML 1.1 or 1.2 would take for
    something else (`yes`, `1e5`, `0o7`) is quoted."""


for _first, _resolvers in Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        Dumper.add_implicit_resolver(_tag, _regexp, [_first])


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document read with `Loader`; any problem is one OrchError paragraph that starts with `where`."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader with fewer types
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = "" if isinstance(err, Refused) else "not valid YAML: "
        problem = "; ".join(str(part) for part in (err.context, err.problem) if part)
        raise OrchError(clip(f"{where}{at}: {what}{problem}.")) from None
    except yaml.YAMLError as err:
        raise OrchError(clip(f"{where}: not valid YAML: {' '.join(str(err).split())}.")) from None


def shown(value: Any) -> str:
    """A value as quoted in a message: its repr, at most SHOWN_VALUE_CHARS long (the whole of a huge value is never
    formatted)."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_VALUE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message of at most `limit` characters, on one line."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 30] + " ... (message shortened)"


def available(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_file(kind: str, name: str, directory: Path, near: Path | None = None) -> Path:
    """A name from the catalogue, or a path to a YAML file (relative to `near` where given)."""
    candidate = near / name if near else Path(name)
    if candidate.suffix in (".yaml", ".yml") and is_file(candidate):
        return candidate.resolve()
    path = directory / f"{name}.yaml"
    if is_file(path):
        return path
    names = available(directory)
    close = difflib.get_close_matches(name[:SHOWN_VALUE_CHARS], names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise OrchError(f"Unknown {kind} {shown(name)}.{hint} Available {kind}s in {directory}: {', '.join(names)}.")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = read_plain(path, MAX_FILE_BYTES, follow_links=True)
    except NotAPlainFile as err:
        if err.errno == errno.EFBIG:
            err.strerror = f"larger than {MAX_FILE_BYTES >> 10} KiB"
        raise OrchError(f"{path}: {err.strerror}; profiles and recipes are plain YAML files of a few lines.") from None
    except OSError as err:
        raise OrchError(f"{path}: cannot be read: {err.strerror or err}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OrchError(f"{path}: not UTF-8 text.") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise OrchError(f"{path}: expected a mapping of fields at the top level, found {type(data).__name__}.")
    return data


def describe_validation_error(path: Path, schema: type[BaseModel], err: ValidationError) -> str:
    """One readable paragraph: which file, which field, what is allowed (values quoted short, the whole capped)."""
    problems = []
    for item in err.errors():
        field = clip(".".join(str(part) for part in item["loc"]) or "(top level)", SHOWN_VALUE_CHARS)
        if item["type"] == "extra_forbidden":
            allowed = allowed_fields(schema, item["loc"][:-1])
            close = difflib.get_close_matches(str(item["loc"][-1])[:SHOWN_VALUE_CHARS], allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"unknown field '{field}' ({hint}allowed here: {', '.join(allowed)})")
        elif item["type"] == "missing":
            problems.append(f"field '{field}' is required")
        elif item["type"] == "string_pattern_mismatch" and item["ctx"]["pattern"] == SOURCE_NAME:
            problems.append(
                f"field '{field}': {shown(item['input'])} is not a source name: 1 to 32 letters, digits, _ and -, "
                "starting with a letter or digit (it names metrics such as mix/NAME)"
            )
        elif item["type"] == "string_pattern_mismatch":
            problems.append(
                f"field '{field}': {shown(item['input'])} may only contain {SAFE_TEXT} (it reaches the job script)"
            )
        elif not item["loc"]:
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ") + written_as_text_hint(item)
            problems.append(f"field '{field}': {message} (got {shown(item.get('input'))})")
    return clip(f"{path}: " + "; ".join(problems) + ".")


def written_as_text_hint(item: Any) -> str:
    """What to write instead of a YAML 1.1 spelling that orch reads as text."""
    value = item.get("input")
    if not isinstance(value, str):
        return ""
    if item["type"] == "bool_type" and value.lower() in ("yes", "no", "on", "off", "y", "n"):
        return "; write true or false"
    if item["type"] in ("int_type", "float_type") and re.fullmatch(r"[0-9]+(:[0-5]?[0-9])+", value):
        return "; write the number itself (1:30:00 is text, not 5400)"
    if item["type"] in ("int_type", "float_type") and re.fullmatch(r"[-+]?[0-9][0-9.eE+-]*", value):
        return "; write the number without quotes"
    return ""


def allowed_fields(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names accepted at a nested location of a schema (a mapping's keys, as data.sources', are names)."""
    model: Any = schema
    parts = iter(loc)
    for part in parts:
        model = model.model_fields[part].annotation
        while not (isinstance(model, type) and issubclass(model, BaseModel)):
            if get_origin(model) is dict:
                next(parts)  # the key: a name the user chose
                model = get_args(model)[1]
            else:
                model = next(t for t in get_args(model) if t is not type(None))
    return list(model.model_fields)


def validate(path: Path, schema: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise OrchError(describe_validation_error(path, schema, err)) from None


def profile_data(name: str) -> tuple[Path, dict[str, Any]]:
    """A profile's fields with those of the profiles it `extends` underneath."""
    return layered_data("profile", PROFILES_DIR, name)


def layered_data(kind: str, directory: Path, name: str, chain: tuple[Path, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """A profile's or recipe's fields with those of the file it `extends` underneath (a name in `directory`, or a
    YAML path, relative to the file that names it). A cycle is found by the files' resolved paths, however each
    `extends` names them; a parent that is not there is reported with the file that names it."""
    try:
        path = resolve_file(kind, name, directory, chain[-1].parent if chain else None)
    except OrchError as err:
        if not chain:
            raise
        raise OrchError(clip(f"{chain[-1]}: field 'extends': {err}")) from None
    if path.resolve() in chain:
        files = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise OrchError(
            clip(
                f"{chain[-1]}: field 'extends' must name another {kind}, without cycles; this chain comes back "
                f"to a file already in it: {files}."
            )
        )
    data = read_yaml(path)
    base = data.get("extends")
    if base is None:
        return path, data
    if not isinstance(base, str) or not base:
        raise OrchError(f"{path}: field 'extends' must name another {kind} (got {shown(base)}).")
    _, merged = layered_data(kind, directory, base, (*chain, path.resolve()))
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
    key, raw = split_assignment(text, "--set")
    return nested(key, parse_yaml(raw, f"--set {shown(text)}") if raw else "")


def split_assignment(text: str, option: str) -> tuple[str, str]:
    """FIELD and VALUE of `FIELD=VALUE`, the field dotted."""
    key, sep, raw = text.partition("=")
    if any(c in text for c in "\n\r\0"):
        raise OrchError(f"{option} {shown(text)}: a value may not contain line breaks or NUL characters.")
    if not sep or not key or not all(key.split(".")):
        raise OrchError(
            f"{option} {shown(text)}: expected FIELD=VALUE with a dotted field, e.g. {option} recipe.optimizer.lr=2e-4."
        )
    return key, raw


def nested(key: str, value: Any) -> dict[str, Any]:
    """`value` under the dotted `key`, as the mapping `merge_all` lays over a file's fields."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# --- overrides and sweeps from the command line ----------------------------------------------------

TARGETS = {"profile": Profile, "recipe": Recipe}
MAX_SWEEP_POINTS = 64  # a sweep is a handful of runs; more is a typo or a job for a proper search


@dataclass(frozen=True)
class Override:
    """One FIELD=VALUE of `--set` or `--sweep`, addressed to the profile or the recipe."""

    target: Literal["profile", "recipe"]
    field: str  # dotted, inside the target
    value: Any
    option: str = "--set"

    def mapping(self) -> dict[str, Any]:
        return nested(self.field, self.value)

    def __str__(self) -> str:
        """`recipe.optimizer.lr=0.0002`: how run.json and MLflow list it."""
        return f"{self.target}.{self.field}={flow(self.value)}"


def flow(value: Any) -> str:
    """A value as YAML on one line."""
    return yaml.dump(value, Dumper=Dumper, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def override_target(key: str, text: str, option: str) -> tuple[Literal["profile", "recipe"], str]:
    """Which file a dotted field addresses: `recipe.` and `profile.` say so; a bare field is a profile's (the older
    form of --set), unless only the recipe or both have that field."""
    head, _, rest = key.partition(".")
    if "extends" in (head, rest.partition(".")[0] if head in TARGETS else None):
        raise OrchError(
            f"{option} {shown(text)}: 'extends' is followed when a profile or recipe file is read, before any "
            "override, so setting it would change nothing. Allowed: name another profile or recipe (--profile, "
            "--recipe, or a YAML file that extends the one you want)."
        )
    if head in TARGETS and rest:
        return head, rest
    if head in Profile.model_fields and head not in Recipe.model_fields:
        return "profile", key
    fields = sorted({*Profile.model_fields, *Recipe.model_fields} - {"extends"})
    close = difflib.get_close_matches(head[:SHOWN_VALUE_CHARS], fields, n=1)
    owner = "recipe" if close and close[0] in Recipe.model_fields else "profile"
    hint = f" Did you mean {owner}.{close[0]}{key[len(head) :] if rest else '.FIELD'}?" if close else ""
    raise OrchError(
        clip(
            f"{option} {shown(text)}: {shown(key)} does not say which field it sets.{hint} Write recipe.FIELD=VALUE "
            f"for a recipe field (e.g. {option} recipe.optimizer.lr=2e-4) or profile.FIELD=VALUE for a profile field "
            f"(e.g. {option} profile.slurm.partition=qgpu_exp); FIELD=VALUE alone names a profile field. Recipe "
            f"fields: {', '.join(Recipe.model_fields)}. Profile fields: {', '.join(Profile.model_fields)}."
        )
    )


def parse_override(text: str) -> Override:
    """`--set recipe.FIELD=VALUE`, `--set profile.FIELD=VALUE` or `--set FIELD=VALUE` (a profile field); the value
    is read as YAML."""
    key, raw = split_assignment(text, "--set")
    target, field = override_target(key, text, "--set")
    return Override(target, field, parse_yaml(raw, f"--set {shown(text)}") if raw else "")


def parse_sweep(text: str) -> list[Override]:
    """`--sweep FIELD=V1,V2,...`: one override per value. The values are read as one YAML flow list, so a value may
    itself be a list (`recipe.optimizer.betas=[0.9, 0.95],[0.9, 0.99]`)."""
    key, raw = split_assignment(text, "--sweep")
    target, field = override_target(key, text, "--sweep")
    values = parse_yaml(f"[{raw}]", f"--sweep {shown(text)}")
    if not isinstance(values, list) or not values:
        raise OrchError(
            f"--sweep {shown(text)}: no values; write FIELD=V1,V2,... e.g. --sweep recipe.optimizer.lr=1e-4,2e-4."
        )
    repeated = sorted({flow(v) for v in values if values.count(v) > 1})
    if repeated:
        raise OrchError(f"--sweep {shown(text)}: {', '.join(repeated)} given more than once; each point is one run.")
    return [Override(target, field, value, "--sweep") for value in values]


def sweep_points(fixed: list[Override], axes: list[list[Override]]) -> list[list[Override]]:
    """Every combination of the sweep's axes (their product), each after the fixed overrides; without axes, the one
    point of the fixed overrides. A swept field that is also set or swept again, or more than MAX_SWEEP_POINTS
    points, is refused."""
    swept = [f"{axis[0].target}.{axis[0].field}" for axis in axes]
    fixed_fields = {f"{o.target}.{o.field}" for o in fixed}
    twice = sorted({f for f in swept if swept.count(f) > 1 or f in fixed_fields})
    if twice:
        raise OrchError(
            f"--sweep: {', '.join(twice)} is swept and also set or swept again; give each field one value (--set) or "
            "one list of values (--sweep)."
        )
    count = math.prod(len(axis) for axis in axes)
    if count > MAX_SWEEP_POINTS:
        sizes = " × ".join(f"{len(axis)} ({axis[0].target}.{axis[0].field})" for axis in axes)
        raise OrchError(
            f"--sweep: {sizes} = {count} runs, more than the {MAX_SWEEP_POINTS} a sweep may have; sweep fewer values."
        )
    return [[*fixed, *point] for point in itertools.product(*axes)]


def given(path: Path, overrides: list[Override]) -> Path:
    """The file's name as an error about it says it, with the command line's overrides that changed it."""
    return Path(f"{path} with {', '.join(f'{o.option} {o}' for o in overrides)}") if overrides else path


def load_profile(name: str, overrides: list[dict[str, Any]] = ()) -> tuple[Path, Profile]:
    """The profile, after `extends` and the command line's overrides (later ones win)."""
    path, data = profile_data(name)
    return path, validate(path, Profile, merge_all(data, overrides))


def merge_all(data: dict[str, Any], overrides: list[dict[str, Any]]) -> dict[str, Any]:
    for override in overrides:
        data = deep_merge(data, override)
    return data


def load_recipe(name: str, overrides: list[Override] = ()) -> tuple[Path, Recipe]:
    """The recipe, after `extends` and the command line's recipe overrides (later ones win)."""
    path, data = layered_data("recipe", RECIPES_DIR, name)
    mine = [o for o in overrides if o.target == "recipe"]
    return path, validate(given(path, mine), Recipe, merge_all(data, [o.mapping() for o in mine]))
