"""The arithmetic that turns a profile, a recipe and a step count into a run: checked before submission."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.config import AUTO, Profile, Recipe, TrainSpec
from orchestrator.core.errors import OrchError
from orchestrator.core.estimate import (
    Memory,
    flops_per_token,
    measured,
    memory,
    parameter_count,
    peak_memory_gb,
    throughput_factor,
)
from orchestrator.core.schedulers import scheduler_of

STARTUP_MIN = 10  # per allocation, the planner's allowance for limits and budgets: `startup_parts` cold, with room
SAVE_BANDWIDTH_GB_S = 1.0  # per rank, a conservative write rate to the parallel filesystem
SIGNAL_SLACK_S = 60  # headroom in the signal's lead time beyond one step and one save
MEMORY_MARGIN = 0.9  # `auto` keeps the estimate within this share of the GPU's memory (allocator caching, error)
CPU_MICRO_BATCH = 4  # `auto` without a GPU to size it: the largest micro batch up to this that divides
AUTO_FIELDS = ("micro_batch_size", "compile", "activation_checkpointing")


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int, hint: str = "") -> int:
    """Micro-batches each rank runs per optimizer step so that the global batch is exact."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise OrchError(
            f"Global batch {global_batch} is not a multiple of micro batch {micro_batch} × world size "
            f"{world_size} = {per_pass} (gradient accumulation would be {global_batch / per_pass:.3g}). "
            f"Change train.micro_batch_size in the recipe or the number of ranks so that "
            f"{global_batch} / (micro batch × ranks) is a whole number.{hint}"
        )
    return global_batch // per_pass


@dataclass(frozen=True)
class Batching:
    """How a step's global batch is split: `micro_batch` samples per rank and pass, `world_size` ranks, `accumulation`
    passes. Decided once (by the plan, or `batching` for a bench) and handed to the job's data order and train step."""

    micro_batch: int
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation

    @classmethod
    def of(cls, global_batch: int, micro_batch: int, world_size: int, hint: str = "") -> Batching:
        return cls(micro_batch, world_size, gradient_accumulation(global_batch, micro_batch, world_size, hint))


def batching(train: TrainSpec, world_size: int) -> Batching:
    """The split of a recipe whose micro batch is decided (not `auto`) over `world_size` ranks."""
    return Batching.of(train.global_batch_size, train.micro_batch_size, world_size)


def smallest_micro_batch(train: TrainSpec) -> int:
    """The recipe's micro batch, or 1 where `auto` may pick any."""
    return 1 if train.micro_batch_size == AUTO else train.micro_batch_size


def node_limit(profile: Profile) -> int:
    return profile.slurm.max_nodes if profile.slurm else 1


def working_node_counts(profile: Profile, recipe: Recipe) -> list[int]:
    """Node counts up to the partition's limit for which the global batch divides evenly."""
    per_node = smallest_micro_batch(recipe.train) * profile.launch.tasks_per_node
    return [n for n in range(1, node_limit(profile) + 1) if recipe.train.global_batch_size % (per_node * n) == 0]


def dividing_micro_batches(global_batch: int, world_size: int) -> list[int]:
    """The micro batches m with global_batch = m × world_size × a whole accumulation: the divisors of
    global_batch / world_size, found up to its square root (a batch of 10^8 is refused at once, not after a count)."""
    if global_batch % world_size:
        return []
    per_rank = global_batch // world_size
    small = [m for m in range(1, math.isqrt(per_rank) + 1) if per_rank % m == 0]
    return sorted({*small, *(per_rank // m for m in small)})


def batch_hint(profile: Profile, recipe: Recipe) -> str:
    """The micro batches and node counts that would divide the global batch, for a refusal."""
    micro = dividing_micro_batches(recipe.train.global_batch_size, profile.world_size)
    nodes = ", ".join(map(str, working_node_counts(profile, recipe))) or "none"
    given = recipe.train.micro_batch_size
    with_micro = "any micro batch" if given == AUTO else f"micro batch {given}"
    return (
        f" Micro batches that divide at {profile.nodes} node(s): {', '.join(map(str, micro)) or 'none'}."
        f" Node counts that work with {with_micro}: {nodes}."
    )


@dataclass(frozen=True)
class Setting:
    """The train settings that `auto` decides."""

    micro_batch: int
    compile: bool
    activation_checkpointing: bool

    def __str__(self) -> str:
        checkpointing = " with activation checkpointing" if self.activation_checkpointing else ""
        return f"micro batch {self.micro_batch} {'compiled' if self.compile else 'eager'}{checkpointing}"

    def rank(self) -> tuple[bool, bool, float]:
        """Activation checkpointing only when nothing fits without it; compile whenever it fits (it is faster and
        keeps fewer activations); then the expected throughput, which grows with the micro batch."""
        factor = throughput_factor(self.compile, self.activation_checkpointing, self.micro_batch)
        return not self.activation_checkpointing, self.compile, factor

    def applied(self, recipe: Recipe) -> Recipe:
        """The recipe with these settings in place of its own (or its `auto`)."""
        return with_train(
            recipe,
            micro_batch_size=self.micro_batch,
            compile=self.compile,
            activation_checkpointing=self.activation_checkpointing,
        )


def with_train(recipe: Recipe, **values: object) -> Recipe:
    """The recipe with some train fields changed (values of the schema's types: not validated again)."""
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=values)})


@dataclass(frozen=True)
class TrainChoice:
    setting: Setting
    reason: str  # one line: why these settings


def options(value: bool | str) -> list[bool]:
    return [True, False] if value == AUTO else [value]


def candidates(train: TrainSpec, world_size: int) -> list[Setting]:
    """Every setting the recipe allows whose micro batch divides the global batch, fastest first."""
    micro = dividing_micro_batches(train.global_batch_size, world_size)
    if train.micro_batch_size != AUTO:
        micro = [m for m in micro if m == train.micro_batch_size]
    settings = [
        Setting(m, compiled, checkpointing)
        for m in micro
        for compiled in options(train.compile)
        for checkpointing in options(train.activation_checkpointing)
    ]
    return sorted(settings, key=Setting.rank, reverse=True)


def estimates(recipe: Recipe, world_size: int) -> list[tuple[Setting, float]]:
    """Each candidate setting with its estimated peak memory per GPU (GB), fastest first."""
    return [(s, peak_memory_gb(s.applied(recipe), world_size)) for s in candidates(recipe.train, world_size)]


def first_fitting(recipe: Recipe, world_size: int, budget_gb: float) -> tuple[Setting, float] | None:
    return next(((s, gb) for s, gb in estimates(recipe, world_size) if gb <= budget_gb), None)


def choose_train(
    profile: Profile, recipe: Recipe, world_size: int, recipe_path: Path | str = "the recipe", hint: str = ""
) -> TrainChoice:
    """The recipe's `auto` train settings decided for `world_size` ranks of this profile. On a GPU with known memory:
    the fastest setting whose estimate fits MEMORY_MARGIN of it; without one: no compile, no activation
    checkpointing, the largest dividing micro batch up to CPU_MICRO_BATCH. Explicit values stay as they are. A global
    batch that no allowed micro batch divides is refused (with `hint`)."""
    train = recipe.train
    given = Setting(train.micro_batch_size, train.compile, train.activation_checkpointing)
    if AUTO not in (given.micro_batch, given.compile, given.activation_checkpointing):
        return TrainChoice(given, "as the recipe sets them")
    gradient_accumulation(train.global_batch_size, smallest_micro_batch(train), world_size, hint)
    memory_gb = profile.node.gpu_memory_gb
    if not (profile.node.gpus and memory_gb):
        micro = train.micro_batch_size
        if micro == AUTO:
            micro = max(m for m in dividing_micro_batches(train.global_batch_size, world_size) if m <= CPU_MICRO_BATCH)
        plain = Setting(micro, train.compile is True, train.activation_checkpointing is True)
        return TrainChoice(plain, "auto without a GPU to size it: plain settings")
    budget = MEMORY_MARGIN * memory_gb
    ranked = estimates(recipe, world_size)
    fitting = next((i for i, (_, gb) in enumerate(ranked) if gb <= budget), None)
    if fitting is None:
        raise OrchError(nothing_fits(profile, recipe, world_size, recipe_path, ranked, budget))
    faster = f"the next faster, {ranked[fitting - 1][0]}, needs {ranked[fitting - 1][1]:.1f} GB" if fitting else ""
    within = f"{budget:.1f} GB ({MEMORY_MARGIN:.0%} of {memory_gb:g} GB)"
    reason = f"auto: the fastest setting that fits {within}; {faster or 'none faster is allowed'}"
    return TrainChoice(ranked[fitting][0], reason)


def nothing_fits(
    profile: Profile,
    recipe: Recipe,
    world_size: int,
    recipe_path: Path | str,
    tried: list[tuple[Setting, float]],
    budget: float,
) -> str:
    """One paragraph: what was tried, the smallest estimate, and the changes that would fit."""
    train = recipe.train
    smallest, smallest_gb = min(tried, key=lambda item: item[1])
    micro = sorted({s.micro_batch for s, _ in tried}, reverse=True)
    fits = alternatives(profile, recipe, budget)
    return (
        f"{recipe_path}: no train setting that the recipe allows fits {budget:.1f} GB per GPU ({MEMORY_MARGIN:.0%} "
        f"of the {profile.node.gpu_memory_gb:g} GB of {profile.node.gpu_model}) at {profile.nodes} node(s), "
        f"{world_size} ranks. Tried micro batch {', '.join(map(str, micro))} (train.micro_batch_size: "
        f"{train.micro_batch_size}), compile {'/'.join(map(str, options(train.compile))).lower()}, activation "
        f"checkpointing {'/'.join(map(str, options(train.activation_checkpointing))).lower()}; the smallest "
        f"estimate, {smallest_gb:.1f} GB, is for {smallest}. "
        + (f"Options that fit: {'; '.join(fits)}." if fits else "No single change fits: the model needs larger GPUs.")
    )


def alternatives(profile: Profile, recipe: Recipe, budget: float) -> list[str]:
    """Single changes that make some setting fit: a train field set to auto, fsdp full_shard, the fewest more nodes."""
    train = recipe.train
    updates = [(f"train.{field}: auto", {field: AUTO}) for field in AUTO_FIELDS if getattr(train, field) != AUTO]
    if train.fsdp == "shard_grad_op":
        updates.append(("train.fsdp: full_shard", {"fsdp": "full_shard"}))
    found = [
        f"{label} ({fit[0]}, {fit[1]:.1f} GB)"
        for label, update in updates
        if (fit := first_fitting(with_train(recipe, **update), profile.world_size, budget))
    ]
    per_node = profile.launch.tasks_per_node
    more = (
        (n, fit)
        for n in working_node_counts(profile, recipe)
        if n > profile.nodes and (fit := first_fitting(recipe, n * per_node, budget))
    )
    nodes, fit = next(more, (None, None))
    return found + ([f"--nodes {nodes} ({fit[0]}, {fit[1]:.1f} GB)"] if fit else [])


def expected_mfu(profile: Profile, setting: Setting) -> tuple[float, str]:
    """The MFU measured on the profile's GPU model for this setting, else the profile's own figure."""
    row = measured(profile.node.gpu_model, setting.compile, setting.activation_checkpointing, setting.micro_batch)
    if row:
        return row.mfu, f"measured on one {row.gpu}"
    return profile.expected_mfu, f"the profile's expected_mfu; not measured on {profile.node.gpu_model}"


@dataclass(frozen=True)
class Plan:
    steps: int
    nodes: int
    world_size: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    parameters: int
    flops_per_token: float
    peak_flops: float  # dense bf16 FLOP/s of all the run's GPUs (one rank each); 0 without a profile peak
    memory: Memory  # per GPU, of the train settings decided
    recipe: Recipe  # with the train settings decided (no `auto`): what the job trains
    choice: str  # why these train settings
    mfu: float
    mfu_source: str
    tokens_per_s: float | None  # estimated from the profile's peak and `mfu`; None without a peak
    signal_delay_s: int
    stop_before_end_s: int  # the job stops itself this long before its time limit if no signal came first
    usable_min_per_allocation: float

    @property
    def batching(self) -> Batching:
        return Batching(self.micro_batch, self.world_size, self.grad_accum)

    @property
    def peak_memory_gb(self) -> float:
        return self.memory.peak

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def hours(self) -> float | None:
        return self.total_tokens / self.tokens_per_s / 3600 if self.tokens_per_s else None

    @property
    def step_s(self) -> float:
        """Estimated seconds per optimizer step (0 without an estimate of tokens/s)."""
        return step_seconds(self.tokens_per_step, self.tokens_per_s)

    @property
    def save_s(self) -> float:
        """Estimated seconds to write a checkpoint."""
        return save_seconds(self.parameters, self.world_size)

    @property
    def allocations(self) -> int:
        """Jobs of one time limit each that the run needs (each requeue is one more)."""
        return max(1, math.ceil(self.hours * 60 / self.usable_min_per_allocation)) if self.hours else 1


def step_seconds(tokens_per_step: int, tokens_per_s: float | None) -> float:
    return tokens_per_step / tokens_per_s if tokens_per_s else 0.0


def save_seconds(parameters: int, world_size: int) -> float:
    """Weights and Lion momentum in fp32, each rank writing its shard."""
    return 8 * parameters / world_size / (SAVE_BANDWIDTH_GB_S * 1e9)


# An allocation's start-up on Karolina, part by part (docs/goodput.md, "Start-up"). Measured: bench.startup on
# the 2-core machine of docs/performance.md; what it cannot measure is assumed, and says so.
ENVIRONMENT_S = 60.0  # assumed: module load and imports from the venv on Lustre /scratch (10.6 s measured, local disk)
PROCESS_GROUP_S = 20.0  # assumed: NCCL over 2 nodes (gloo on 2 local ranks measured 1.5 s)
BUILD_S_PER_PARAMETER = 12.24 / 56.37e6  # measured: the 56M model's build, the median of 4 starts (6.2 to 27.6 s)
HASH_GB_S = 12.0  # measured: XXH3-128, checkpoints' digest, on one core of this CPU (docs/performance.md)
COMPILE_COLD_S = 120.0  # assumed for one compiled Llama block, forward and backward, on an A100 (not measured)
COMPILE_WARM_SHARE = 57.0 / 179.2  # measured: the 56M model's compile with an earlier start's caches against without


@dataclass(frozen=True)
class StartupPart:
    name: str
    seconds: float
    source: str


def startup_parts(plan: Plan, warm_cache: bool) -> list[StartupPart]:
    """From an allocation's start to its first step, resuming from a checkpoint; `warm_cache`: torch.compile's caches
    hold an earlier start's kernels (every start of a run after its first: the job keeps them in the run's `cache/`).
    Rank 0 verifies every byte of the checkpoint against its manifest before any rank loads its share."""
    checkpoint_gb = 8 * plan.parameters / 1e9
    compiled = plan.recipe.train.compile is True
    compile_s = COMPILE_COLD_S * (COMPILE_WARM_SHARE if warm_cache else 1.0) if compiled else 0.0
    return [
        StartupPart("environment", ENVIRONMENT_S, "assumed: module load, imports from /scratch"),
        StartupPart("process group", PROCESS_GROUP_S, "assumed: NCCL"),
        StartupPart("model build", BUILD_S_PER_PARAMETER * plan.parameters, "bench.startup's 56M model, per parameter"),
        StartupPart(
            "checkpoint verify",
            checkpoint_gb / SAVE_BANDWIDTH_GB_S + checkpoint_gb / HASH_GB_S,
            f"rank 0 reads {checkpoint_gb:.2f} GB at {SAVE_BANDWIDTH_GB_S:g} GB/s and hashes it at {HASH_GB_S} GB/s",
        ),
        StartupPart(
            "checkpoint load",
            checkpoint_gb / plan.world_size / SAVE_BANDWIDTH_GB_S,
            f"each rank's 1/{plan.world_size} at {SAVE_BANDWIDTH_GB_S:g} GB/s",
        ),
        StartupPart(
            "compile",
            compile_s,
            (f"warm caches: {COMPILE_WARM_SHARE:.0%} (bench.startup) of " if warm_cache else "assumed: ")
            + f"{COMPILE_COLD_S:.0f} s cold"
            if compiled
            else "not compiled",
        ),
    ]


def make_plan(profile: Profile, recipe: Recipe, steps: int, recipe_path: Path | str = "the recipe") -> Plan:
    if steps < 1:
        raise OrchError(f"--steps must be a positive number of optimizer steps, got {steps}.")
    train, world, hint = recipe.train, profile.world_size, batch_hint(profile, recipe)
    choice = choose_train(profile, recipe, world, recipe_path, hint)
    grad_accum = gradient_accumulation(train.global_batch_size, choice.setting.micro_batch, world, hint)
    resolved = choice.setting.applied(recipe)
    flops = flops_per_token(recipe.model, recipe.data.max_seq_len)
    node = profile.node
    mfu, mfu_source = expected_mfu(profile, choice.setting)
    peak_flops = profile.gpus * (node.peak_bf16_tflops or 0) * 1e12
    tokens_per_s = peak_flops * mfu / flops or None  # None without GPUs or their peak
    tokens_per_step = train.global_batch_size * recipe.data.max_seq_len
    parameters = sum(parameter_count(recipe.model).values())
    # The warning signal must leave time to finish the step in flight and save (weights + Lion momentum, fp32).
    step_s = step_seconds(tokens_per_step, tokens_per_s)
    scheduler = scheduler_of(profile.executor)
    signal_delay = profile.signal_delay_s
    fewest = fewest_nodes(profile)  # a node range: the lead must cover a step and a save of its smallest shape
    lead_s = step_s * profile.nodes / fewest + save_seconds(parameters, fewest * profile.launch.tasks_per_node)
    if scheduler.sizes_signal_delay:
        signal_delay = max(signal_delay, math.ceil(2 * lead_s) + SIGNAL_SLACK_S)
    usable = shortest_limit_min(profile) - STARTUP_MIN - signal_delay / 60
    return Plan(
        steps=steps,
        nodes=profile.nodes,
        world_size=world,
        micro_batch=choice.setting.micro_batch,
        grad_accum=grad_accum,
        tokens_per_step=tokens_per_step,
        parameters=parameters,
        flops_per_token=flops,
        peak_flops=peak_flops,
        memory=memory(resolved, world),
        recipe=resolved,
        choice=choice.reason,
        mfu=mfu,
        mfu_source=mfu_source,
        tokens_per_s=tokens_per_s,
        signal_delay_s=signal_delay,
        stop_before_end_s=signal_delay + scheduler.signal_check_s,
        usable_min_per_allocation=max(usable, 1.0),
    )


def check_time_limit(profile: Profile, path: Path | str, plan: Plan) -> None:
    """An allocation must outlast the time the job stops before its limit (the warning signal's lead time) by more
    than one step and one save, or no step could ever finish and be saved in it."""
    limit_s = profile.time_limit_min * 60
    needed_s = plan.stop_before_end_s + plan.step_s + plan.save_s
    if limit_s <= needed_s:
        raise OrchError(
            f"{path}: field 'time_limit_min' is {profile.time_limit_min:g} min ({limit_s:g} s), not longer than the "
            f"warning signal's lead time ({plan.stop_before_end_s} s before the limit) plus one step "
            f"({plan.step_s:.0f} s) and one save ({plan.save_s:.0f} s): no step could finish and be saved in it. "
            f"Allowed: more than {needed_s:.0f} s, e.g. --time {math.floor(needed_s / 60) + 1}."
        )


# --- node ranges and minimum times (sbatch --nodes=MIN-MAX --time-min; docs/goodput.md#backfill-shaped-jobs) ---------


def fewest_nodes(profile: Profile) -> int:
    """The fewest nodes a job of the profile may start on: its `slurm.nodes_min`, else its nodes."""
    given = profile.slurm.nodes_min if profile.slurm else None
    return min(given, profile.nodes) if given else profile.nodes


def shortest_limit_min(profile: Profile) -> float:
    """The shortest time limit a job of the profile may be granted: its `slurm.time_min_min`, else its limit."""
    given = profile.slurm.time_min_min if profile.slurm else None
    return min(given, profile.time_limit_min) if given else profile.time_limit_min


def granted(profile: Profile, world_size: int) -> Profile:
    """The profile of the shape a job was granted (`world_size` ranks: any count of its node range), for which the
    job makes its plan: ranks, gradient accumulation and per-job figures follow the allocation, not the request."""
    nodes = world_size // profile.launch.tasks_per_node
    return profile if nodes == profile.nodes else profile.model_copy(update={"nodes": nodes})


def shape_plans(profile: Profile, plan: Plan) -> dict[int, Plan]:
    """The plan of each node count of the profile's range, with the train settings `plan` decided (what the run's
    recipe.yaml keeps, whichever count a job is granted)."""
    return {
        nodes: make_plan(granted(profile, nodes * profile.launch.tasks_per_node), plan.recipe, plan.steps)
        for nodes in range(fewest_nodes(profile), profile.nodes + 1)
    }


def check_range(profile: Profile, path: Path | str, plan: Plan) -> None:
    """A node range whose every count trains the same global batch with a whole gradient accumulation, within the GPU's
    memory, and a minimum time in which a step and a save fit before the job stops (as `check_time_limit`)."""
    fewest, tasks, batch = fewest_nodes(profile), profile.launch.tasks_per_node, plan.recipe.train.global_batch_size
    uneven = [n for n in range(fewest, profile.nodes + 1) if batch % (plan.micro_batch * tasks * n)]
    if uneven:
        dividing = [n for n in range(profile.nodes, 0, -1) if batch % (plan.micro_batch * tasks * n) == 0]
        lowest = next(n for i, n in enumerate(dividing) if i + 1 == len(dividing) or dividing[i + 1] != n - 1)
        raise OrchError(
            f"{path}: field 'slurm.nodes_min' (--nodes {fewest}-{profile.nodes}) lets the job start on "
            f"{', '.join(map(str, uneven))} node(s), where global batch {batch} is not a multiple of micro batch "
            f"{plan.micro_batch} × {tasks} ranks per node × the nodes: every count in the range must give a whole "
            f"gradient accumulation (counts that do: {', '.join(map(str, sorted(dividing)))}). Allowed: a range of "
            "such counts only, e.g. --nodes "
            + (f"{lowest}-{profile.nodes}." if lowest < profile.nodes else f"{lowest}, no range.")
        )
    shapes = shape_plans(profile, plan) if fewest < profile.nodes else {profile.nodes: plan}
    memory_gb = profile.node.gpu_memory_gb
    too_big = {n: p.peak_memory_gb for n, p in shapes.items() if memory_gb and p.peak_memory_gb > memory_gb}
    if too_big:
        nodes, peak = next(iter(too_big.items()))
        raise OrchError(
            f"{path}: field 'slurm.nodes_min' (--nodes {fewest}-{profile.nodes}) lets the job start on {nodes} "
            f"node(s), where micro batch {plan.micro_batch} needs an estimated {peak:.1f} GB per GPU, above the "
            f"{memory_gb:g} GB of {profile.node.gpu_model}. Allowed: a range from {max(too_big) + 1} nodes up, e.g. "
            f"--nodes {max(too_big) + 1}-{profile.nodes}."
        )
    slowest = shapes[fewest]
    limit_s, needed_s = shortest_limit_min(profile) * 60, slowest.stop_before_end_s + slowest.step_s + slowest.save_s
    if limit_s <= needed_s:
        raise OrchError(
            f"{path}: field 'slurm.time_min_min' (--time-min) is {limit_s / 60:g} min ({limit_s:g} s), not longer "
            f"than the time the job stops before its limit ({slowest.stop_before_end_s} s) plus one step "
            f"({slowest.step_s:.0f} s at {fewest} node(s)) and one save ({slowest.save_s:.0f} s): a job granted it "
            f"could not finish and save a step. Allowed: more than {needed_s:.0f} s, e.g. --time-min "
            f"{math.floor(needed_s / 60) + 1}."
        )
