"""The schemas of cluster profiles and training recipes: plain YAML data (orchestrator.core.yamlio), found, layered
and validated by orchestrator.core.loading.

Profiles live in `cluster_profiles/`, recipes in `recipes/`; a file's name (without `.yaml`) is its name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.core.project import PROJECT_ROOT
from orchestrator.core.yamlio import shown

PROFILES_DIR = PROJECT_ROOT / "cluster_profiles"
RECIPES_DIR = PROJECT_ROOT / "recipes"


class Strict(BaseModel):
    """Unknown or mistyped keys are errors, never silently ignored; values are taken as they are written (no
    'yes' for true, no '5' or 5.0 for an integer) and numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, defer_build=True)


MAX_TIME_LIMIT_MIN = 365 * 1440  # a year: beyond any partition's limit, and a bound on the plan's arithmetic
MAX_NODES = 100_000  # above the largest machines; node counts drive loops in planning


# --- cluster profiles -------------------------------------------------------------------------

# Values that reach the generated job script: no whitespace, quotes, newlines, NUL or shell metacharacters.
SAFE = r"^[A-Za-z0-9_.,:/=@+%{}-]*$"
SAFE_TEXT = "letters, digits and _ . , : / = @ + % { } -"
RANGE_FIELDS = ("nodes_min", "time_min_min")  # a node range and a minimum time: Slurm may grant less than the most
SBATCH_ALLOWED = ("constraint", "exclusive", "mail-type", "mail-user", "reservation", "comment", "exclude", "nodelist")


class Launch(Strict):
    """How ranks are laid out: one task (process) per accelerator, or per CPU slot locally."""

    tasks_per_node: int = Field(ge=1)
    device: Literal["cpu", "cuda"]
    backend: Literal["gloo", "nccl"]


class Node(Strict):
    """The hardware of one node: the plan's resource request, CPU and memory checks, and MFU."""

    cores: int = Field(ge=1, description="CPU cores: the ranks' slurm.cpus_per_task must fit in them")
    gpus: int = Field(default=0, ge=0)
    gpu_model: str | None = None
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    peak_bf16_tflops: float | None = Field(default=None, gt=0, description="dense bf16 peak per GPU")


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
    allocation_node_hours: float | None = Field(
        default=None,
        gt=0,
        description="the account's node-hours for its allocation period: `orch budget` and `orch submit` weigh "
        "spending and plans against it",
    )
    extra_sbatch: dict[str, str] = Field(default_factory=dict, description=f"allowed keys: {SBATCH_ALLOWED}")
    nodes_min: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NODES,
        description="the fewest nodes the job may start on (sbatch --nodes=MIN-MAX, MAX the profile's nodes); it "
        "trains on the count it is granted (docs/goodput.md#backfill-shaped-jobs)",
    )
    time_min_min: float | None = Field(
        default=None,
        ge=1,
        le=MAX_TIME_LIMIT_MIN,
        description="the shortest time limit, in whole minutes, the job accepts to start earlier (sbatch --time-min; "
        "time_limit_min is the longest); it stops before the limit it is granted",
    )

    @field_validator("time_min_min")
    @classmethod
    def _whole_minutes(cls, value: float | None) -> float | None:
        if value is not None and value != int(value):
            raise ValueError("Slurm's --time-min is whole minutes; allowed: e.g. --time-min 30 or --time-min 6:00:00")
        return value

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


class StragglerSpec(Strict):
    """Slow hosts (docs/stragglers.md): how persistent a slowdown must be before it counts, and whether the job leaves
    such a host (save, requeue without it) where the cost test says that pays."""

    act: bool | None = Field(
        default=None,
        description="true: requeue without a persistent straggler where leaving pays; false: report only; "
        "null: act where the scheduler can exclude hosts",
    )
    window_steps: int = Field(default=8, ge=3, le=10_000, description="steps a slowdown must last to be persistent")
    threshold: float = Field(default=0.25, gt=0, le=100, description="slowdown (0.25: 25 % longer) that counts")
    queue_wait_s: float = Field(
        default=600.0, ge=0, description="expected queue wait of a requeue, until the run has measured one"
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
    deadline_poll_s: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="how often a running job asks its scheduler for its end time and the "
        "reservations on its nodes (Slurm; docs/goodput.md#the-deadline)",
    )
    launch: Launch
    node: Node
    slurm: Slurm | None = None
    paths: Paths = Field(default_factory=Paths)
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
    watchdog: WatchdogSpec = Field(default_factory=WatchdogSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    stragglers: StragglerSpec = Field(default_factory=StragglerSpec)

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

    @model_validator(mode="before")
    @classmethod
    def _ranges_need_slurm(cls, data: Any) -> Any:
        """A node range or a minimum time only where the scheduler can grant a job less than it asked for (Slurm);
        checked before the fields, so that the refusal says this rather than what else a Slurm section would need."""
        slurm = data.get("slurm") if isinstance(data, dict) else None
        asked = [f"slurm.{key}" for key in RANGE_FIELDS if isinstance(slurm, dict) and slurm.get(key) is not None]
        executor = data.get("executor") if isinstance(data, dict) else None
        if asked and executor == "local":
            raise ValueError(
                f"{' and '.join(asked)} {'ask' if len(asked) > 1 else 'asks'} for a node range or a minimum time "
                "(--nodes MIN-MAX, --time-min), but the "
                f"{executor} executor runs a job on exactly what it asks for; allowed: one node count (--nodes N) "
                "and one time limit (--time), or a Slurm profile"
            )
        return data

    @model_validator(mode="after")
    def _range_within_the_request(self) -> Profile:
        """The range's minimum at most its maximum: the profile's nodes and time_limit_min."""
        slurm = self.slurm
        if slurm and slurm.nodes_min is not None and slurm.nodes_min > self.nodes:
            raise ValueError(
                f"slurm.nodes_min is {slurm.nodes_min}, more than nodes ({self.nodes}), the most the job asks for; "
                f"allowed: 1 to {self.nodes} (--nodes MIN-MAX)"
            )
        if slurm and slurm.time_min_min is not None and slurm.time_min_min > self.time_limit_min:
            raise ValueError(
                f"slurm.time_min_min is {slurm.time_min_min:g} min, longer than time_limit_min "
                f"({self.time_limit_min:g} min), the longest the job asks for; allowed: at most {self.time_limit_min:g}"
            )
        return self

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

    @model_validator(mode="after")
    def _ranks_fit_the_node(self) -> Profile:
        """One rank per GPU (the plan's peak FLOP/s and the job's agree only then), and their CPUs within the node."""
        tasks = self.launch.tasks_per_node
        if self.launch.device == "cuda" and tasks != self.node.gpus:
            raise ValueError(
                f"launch.tasks_per_node is {tasks} and node.gpus is {self.node.gpus}: a CUDA job runs one rank per "
                "GPU; allowed: tasks_per_node equal to node.gpus"
            )
        cpus = (self.slurm.cpus_per_task if self.slurm else 1) * tasks
        if cpus > self.node.cores:
            raise ValueError(
                f"slurm.cpus_per_task × launch.tasks_per_node is {cpus}, more than node.cores ({self.node.cores}); "
                f"allowed: at most {self.node.cores} CPUs on a node"
            )
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
    """LionW (lion-pytorch): peak rate, betas and decoupled weight decay."""

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

    def due(self, step: int) -> bool:
        """Whether the cadence saves at `step` (a job also saves at its last step and when it stops)."""
        return step % self.every_steps == 0


class EvalSpec(Strict):
    """Validation on the held-out split every `every_steps` steps and at the end."""

    every_steps: int = Field(ge=1)
    blocks: int = Field(ge=1, description="validation blocks per evaluation (rounded to ranks × micro batch)")

    def due(self, step: int) -> bool:
        """Whether the cadence validates at `step` (a job also validates at its last step)."""
        return step % self.every_steps == 0


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
