"""Finding, layering and validating profiles and recipes: a catalogue name or a path, `extends` chains, and the
command line's `--set` and `--sweep` overrides, validated once against the schemas of orchestrator.core.config with
errors that name the file, the field and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from orchestrator.core.config import PROFILES_DIR, RECIPES_DIR, SAFE_TEXT, SOURCE_NAME, Profile, Recipe, is_file
from orchestrator.core.errors import OrchError
from orchestrator.core.schedulers import scheduler_of
from orchestrator.core.yamlio import SHOWN_VALUE_CHARS, clip, flow, parse_yaml, read_yaml, shown


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
    profile = validate(path, Profile, merge_all(data, overrides))
    if profile.stragglers.act and not scheduler_of(profile.executor).excludes_hosts:  # the schema cannot ask it
        raise OrchError(
            f"{path}: field 'stragglers.act' is true, but the {profile.executor} executor cannot keep a job off a "
            "host. Allowed: false (report only) or null (act where the scheduler can exclude hosts)."
        )
    return path, profile


def merge_all(data: dict[str, Any], overrides: list[dict[str, Any]]) -> dict[str, Any]:
    for override in overrides:
        data = deep_merge(data, override)
    return data


def load_recipe(name: str, overrides: list[Override] = ()) -> tuple[Path, Recipe]:
    """The recipe, after `extends` and the command line's recipe overrides (later ones win)."""
    path, data = layered_data("recipe", RECIPES_DIR, name)
    mine = [o for o in overrides if o.target == "recipe"]
    return path, validate(given(path, mine), Recipe, merge_all(data, [o.mapping() for o in mine]))
