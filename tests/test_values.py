"""Values mean what they say: time limits, YAML scalars, finite numbers in range, `extends` chains, short errors."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from orchestrator.cli.app import main, parse_minutes
from orchestrator.core.config import PROFILES_DIR, RECIPES_DIR, Profile, Recipe
from orchestrator.core.errors import OrchError
from orchestrator.core.loading import load_profile, load_recipe, merge_all, parse_assignment, profile_data, validate
from orchestrator.core.plan import check_time_limit, make_plan
from orchestrator.core.yamlio import Dumper, dump_yaml, parse_yaml, read_yaml
from tests.conftest import ROOT

TINY = (ROOT / "recipes/tiny.yaml").read_text()
LOCAL = (ROOT / "cluster_profiles/local.yaml").read_text()


def refused(call, *fragments: str) -> str:
    with pytest.raises(OrchError) as err:
        call()
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def written(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- time limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("30", 30),
        ("1:30", 1.5),
        ("59:59", 59 + 59 / 60),
        ("1:30:00", 90),
        ("100:00:00", 6000),
        ("2-00", 2880),
        ("1-12:30", 2190),
        ("1-23:59:59", 2880 - 1 / 60),
    ],
)
def test_slurm_time_formats_give_minutes(text, minutes):
    assert math.isclose(parse_minutes(text), minutes)


def test_time_under_a_minute_is_refused_instead_of_meaning_no_limit():
    refused(lambda: parse_minutes("0:30"), "is 30 s", "at least one minute", "write 30 or 0:30:00")
    refused(lambda: parse_minutes("0"), "at least one minute")
    refused(lambda: parse_minutes("0-0:0:59"), "at least one minute")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("90:00", "minutes must be below 60 in MM:SS"),
        ("1:00:60", "seconds must be below 60 in HH:MM:SS"),
        ("1:60:00", "minutes must be below 60 in HH:MM:SS"),
        ("1-24", "hours must be below 24 in D-HH"),
        ("1-24:00:00", "hours must be below 24 in D-HH:MM:SS"),
        ("1-1:60", "minutes must be below 60 in D-HH:MM"),
    ],
)
def test_time_parts_out_of_range_are_refused(text, problem):
    refused(lambda: parse_minutes(text), problem)


@pytest.mark.parametrize("text", ["", " 30", "30m", "-5", "1:2:3:4", "1-2-3", "1.5", "٣٠", "1:", ":30", "1e3"])
def test_malformed_time_is_refused_with_the_formats(text):
    refused(lambda: parse_minutes(text), "expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")


def test_time_beyond_a_year_is_refused():
    refused(lambda: parse_minutes("400-00"), "more than a year")
    refused(lambda: load_profile("local", [{"time_limit_min": 10**9}]), "field 'time_limit_min'")


def test_slurm_profile_time_limit_is_whole_minutes_of_at_least_one():
    for value in (0.5, 1.5):
        refused(
            lambda value=value: load_profile("karolina", [{"time_limit_min": value}]),
            "cluster_profiles/karolina.yaml",
            "field 'time_limit_min'",
            "whole minutes",
        )
    assert load_profile("karolina", [{"time_limit_min": parse_minutes("1:00:00")}])[1].time_limit_min == 60


def test_local_profile_keeps_fractional_minutes():
    assert load_profile("local", [parse_assignment("time_limit_min=0.75")])[1].time_limit_min == 0.75
    refused(lambda: load_profile("local", [parse_assignment("time_limit_min=0")]), "field 'time_limit_min'")


def test_time_limit_not_longer_than_signal_lead_plus_step_and_save_is_refused():
    path, profile = load_profile("karolina", [{"slurm": {"account": "X"}}, {"time_limit_min": 5}])
    _, recipe = load_recipe("cstinyllama-1.2b")
    plan = make_plan(profile, recipe, 1000)
    message = refused(
        lambda: check_time_limit(profile, path, plan),
        str(path),
        "field 'time_limit_min' is 5 min (300 s)",
        f"lead time ({plan.stop_before_end_s} s before the limit)",
        "one step",
        "one save",
    )
    assert plan.stop_before_end_s + plan.step_s + plan.save_s >= 300
    suggested = int(message.rsplit("--time ", 1)[1].rstrip("."))
    _, longer = load_profile("karolina", [{"slurm": {"account": "X"}}, {"time_limit_min": suggested}])
    check_time_limit(longer, path, make_plan(longer, recipe, 1000))


def test_short_limits_the_tests_use_still_pass_the_time_limit_check():
    _, recipe = load_recipe("tiny")
    for name, overrides in (
        ("local", [{"time_limit_min": 0.75}, {"signal_delay_s": 15}]),
        ("local-slurm", [{"time_limit_min": 2}]),
    ):
        path, profile = load_profile(name, overrides)
        check_time_limit(profile, path, make_plan(profile, recipe, 800))
    path, profile = load_profile("local-slurm", [{"time_limit_min": 1}])
    refused(lambda: check_time_limit(profile, path, make_plan(profile, recipe, 800)), "not longer than")


# --- YAML as written ------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "n", "Yes", "OFF"])
def test_yaml_1_1_booleans_stay_text(word):
    assert parse_yaml(f"a: {word}", "f") == {"a": word}
    refused(lambda: load_profile("local", [parse_assignment(f"nodes={word}")]), "field 'nodes'", repr(word))


def test_yaml_1_1_boolean_for_a_boolean_field_is_refused_with_what_to_write(tmp_path: Path):
    recipe = written(tmp_path, "r.yaml", TINY.replace("  seed: 0\n", "  seed: 0\n  compile: yes\n"))
    refused(
        lambda: validate(recipe, Recipe, read_yaml(recipe)),
        str(recipe),
        "field 'train.compile'",
        "write true or false",
        "'yes'",
    )


def test_sexagesimal_stays_text_and_is_refused_for_a_number_field(tmp_path: Path):
    assert parse_yaml("a: 1:30:00", "f") == {"a": "1:30:00"}
    profile = written(tmp_path, "p.yaml", LOCAL.replace("time_limit_min: 120", "time_limit_min: 1:30:00"))
    refused(lambda: load_profile(str(profile)), str(profile), "field 'time_limit_min'", "'1:30:00'")
    refused(lambda: load_profile("local", [parse_assignment("node.cores=1:30")]), "field 'node.cores'", "'1:30'")


def test_yaml_1_2_scalars():
    text = "a: 1e-4\nb: 010\nc: 0x1f\nd: 0o17\ne: true\nf: ~\ng: 2024-01-01\nh: 1_000\ni: +5\nj: .5"
    assert parse_yaml(text, "f") == {
        "a": 1e-4,
        "b": 10,
        "c": 31,
        "d": 15,
        "e": True,
        "f": None,
        "g": "2024-01-01",
        "h": "1_000",
        "i": 5,
        "j": 0.5,
    }


def test_integers_are_not_taken_from_text_floats_or_booleans():
    for value in ("'4'", "4.0", "true"):
        refused(lambda value=value: load_profile("local", [parse_assignment(f"nodes={value}")]), "field 'nodes'")


BILLION_LAUGHS = 'description: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"x{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)
)


def test_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path: Path):
    profile = written(tmp_path, "bomb.yaml", LOCAL + BILLION_LAUGHS)
    started = time.monotonic()
    message = refused(lambda: load_profile(str(profile)), str(profile), "anchors and aliases", "write each value out")
    assert time.monotonic() - started < 1 and len(message) < 500


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: &x 1\nb: 2", "anchors and aliases"),
        ("base: {nodes: 1}\nother:\n  <<: {nodes: 2}", "merge keys (<<) are not allowed"),
        ("nodes: 1\nnodes: 2", "duplicate key 'nodes'"),
        ("a: !!binary aGk=", "the tag 'tag:yaml.org,2002:binary' is not allowed"),
        ("a: !!timestamp 2024-01-01", "is not allowed"),
        ("a: !!python/object:os.system x", "is not allowed"),
        ("a: " + "[" * 100 + "]" * 100, "nested deeper than 32 levels"),
        ("a: !!int 1:30", "'1:30' is not an integer"),
        ("a: [unclosed", "not valid YAML"),
    ],
)
def test_yaml_constructs_outside_plain_data_are_refused_naming_the_file(tmp_path: Path, text, problem):
    path = written(tmp_path, "p.yaml", text)
    message = refused(lambda: read_yaml(path), f"{path} (line ", problem)
    assert "\n" not in message


def test_set_values_go_through_the_same_loader():
    refused(lambda: parse_assignment("description=&a x"), "--set 'description=&a x'", "anchors and aliases")
    assert parse_assignment("slurm.qos=on") == {"slurm": {"qos": "on"}}
    assert parse_assignment("optimizer.lr=1e-4") == {"optimizer": {"lr": 1e-4}}


def test_files_that_are_not_small_utf8_text_are_refused(tmp_path: Path):
    refused(lambda: read_yaml(written(tmp_path, "big.yaml", "a: " + "x" * (2 << 20))), "larger than")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"a: \xff\xfe")
    refused(lambda: read_yaml(binary), "not UTF-8")


@pytest.mark.parametrize("text", ["yes", "1e5", "0o7", "1.0e5", "1:30:00", "~", "null", ".inf", "010", "true", "<<"])
def test_dumped_strings_read_back_as_the_same_strings(text):
    assert parse_yaml(dump_yaml({"a": text}), "f") == {"a": text}
    assert parse_yaml(dump_yaml({"a": [0.9, 1e-05, 3]}), "f") == {"a": [0.9, 1e-05, 3]}


# --- finite numbers in range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("lr: 1.0e-3", "lr: .inf", "optimizer.lr"),
        ("lr: 1.0e-3", "lr: .nan", "optimizer.lr"),
        ("lr: 1.0e-3", "lr: 1.5", "optimizer.lr"),
        ("lr: 1.0e-3", "lr: 0", "optimizer.lr"),
        ("betas: [0.9, 0.95]", "betas: [0.9, 1.0]", "optimizer.betas"),
        ("betas: [0.9, 0.95]", "betas: [-0.1, 0.95]", "optimizer.betas"),
        ("betas: [0.9, 0.95]", "betas: [0.9, .nan]", "optimizer.betas"),
        ("weight_decay: 0.0", "weight_decay: -0.1", "optimizer.weight_decay"),
        ("weight_decay: 0.0", "weight_decay: .inf", "optimizer.weight_decay"),
        ("grad_clip: 1.0", "grad_clip: 0", "train.grad_clip"),
        ("grad_clip: 1.0", "grad_clip: .inf", "train.grad_clip"),
        ("alpha: 0.1", "alpha: 1.5", "schedule.alpha"),
        ("seed: 0", "seed: -1", "train.seed"),
        ("vocab_size: 512", "vocab_size: 512\n  rms_norm_eps: 1.0", "model.rms_norm_eps"),
        ("vocab_size: 512", "vocab_size: 512\n  rope_theta: .inf", "model.rope_theta"),
    ],
)
def test_recipe_numbers_must_be_finite_and_in_range(tmp_path: Path, old, new, field):
    assert old in TINY
    recipe = written(tmp_path, "r.yaml", TINY.replace(old, new))
    refused(lambda: validate(recipe, Recipe, read_yaml(recipe)), str(recipe), f"field '{field}")


@pytest.mark.parametrize(
    "assignment",
    ["expected_mfu=.nan", "node.gpu_memory_gb=.inf", "node.peak_bf16_tflops=-.inf", "time_limit_min=.inf", "nodes=0"],
)
def test_profile_numbers_must_be_finite_and_in_range(assignment):
    refused(lambda: load_profile("local", [parse_assignment(assignment)]), "field '")


def test_shipped_profiles_and_recipes_still_validate():
    for name in sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")):
        load_profile(name)
    for name in sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")):
        load_recipe(name)


# --- extends --------------------------------------------------------------------------------------


def test_extends_cycle_through_an_absolute_path_lists_the_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("orchestrator.core.loading.PROFILES_DIR", tmp_path)
    written(tmp_path, "a.yaml", f"extends: {tmp_path / 'b.yaml'}\n")
    written(tmp_path, "b.yaml", "extends: a\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    refused(lambda: load_profile("a"), "without cycles", f"{a} -> {b} -> {a}")


def test_a_profile_extending_itself_by_path_is_a_cycle(tmp_path: Path):
    path = tmp_path / "self.yaml"
    path.write_text(f"extends: {path}\n")
    refused(lambda: load_profile(str(path)), "without cycles", f"{path} -> {path}")


def test_extends_must_be_a_name(tmp_path: Path):
    path = written(tmp_path, "p.yaml", "extends: [local]\n")
    refused(lambda: load_profile(str(path)), "field 'extends' must name another profile")


# --- messages stay one paragraph ------------------------------------------------------------------


def test_long_values_are_quoted_short():
    message = refused(
        lambda: load_profile("karolina", [parse_assignment("slurm.qos=" + "$(x)" * 10_000)]),
        "field 'slurm.qos'",
        "may only contain",
        "...",
    )
    assert len(message) < 600


def test_many_problems_make_a_capped_message(tmp_path: Path):
    path = written(tmp_path, "p.yaml", "".join(f"unknown_field_{i}: {i}\n" for i in range(2000)))
    message = refused(lambda: load_profile(str(path)), "unknown field", "message shortened")
    assert len(message) <= 3000 and "\n" not in message


def test_unknown_profile_name_is_quoted_short():
    message = refused(lambda: load_profile("x" * 100_000), "Unknown profile")
    assert len(message) < 1000


def test_the_command_line_prints_errors_capped_and_literal(monkeypatch, capsys):
    def fail():
        raise OrchError("[bold]not markup[/] " + "y" * 100_000)

    monkeypatch.setattr("orchestrator.cli.app.app", fail)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "[bold]not markup[/]" in err and len(err) < 4200


# --- properties -----------------------------------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TIME_TEXT = st.one_of(
    st.text(alphabet="0123456789:-", max_size=14),
    st.text(max_size=12),
    st.builds(
        lambda d, parts: (f"{d}-" if d is not None else "") + ":".join(map(str, parts)),
        st.none() | st.integers(0, 400),
        st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
    ),
)


@PROPERTY
@given(TIME_TEXT)
def test_any_time_text_gives_minutes_of_at_least_one_or_an_orch_error(text):
    try:
        minutes = parse_minutes(text)
    except OrchError as err:
        assert "--time" in str(err) and len(str(err)) < 1000
    else:
        assert isinstance(minutes, float) and 1 <= minutes <= 365 * 1440


def leaf_fields(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of a schema's fields, nested models included (and the nested models' own names)."""
    names = []
    for name, field in schema.model_fields.items():
        names.append(prefix + name)
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names += leaf_fields(candidate, f"{prefix}{name}.")
    return names


SCALAR_TEXT = st.one_of(
    st.integers(0, 300).map(str),
    st.floats(0, 1).map(repr),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["yes", "no", "on", "off", "true", "null", "~", "1:30:00", "0x1f", "0o17", ".inf", "-.inf", ".nan", "1e-4"]
        + ["[1, 2]", "[0.9, 0.95]", "{a: 1}", "&a 1", "*a", "!!binary aGk=", "'quoted'", "[", "cuda", "nccl", "slurm"]
    ),
    st.text(max_size=30).filter(lambda t: not any(c in t for c in "\n\r\0")),
)


def revalidates(schema: type[BaseModel], value: BaseModel) -> None:
    assert schema.model_validate(value.model_dump()) == value
    assert schema.model_validate(parse_yaml(dump_yaml(value.model_dump(mode="json")), "dump")) == value


@PROPERTY
@given(st.sampled_from(["local", "karolina", "karolina-exp", "local-slurm"]), st.data())
def test_any_set_assignment_to_a_profile_is_accepted_and_revalidates_or_an_orch_error(name, data):
    field = data.draw(st.sampled_from(leaf_fields(Profile)))
    value = data.draw(SCALAR_TEXT)
    try:
        _, profile = load_profile(name, [parse_assignment(f"{field}={value}")])
    except OrchError as err:
        assert len(str(err)) <= 4000
        return
    revalidates(Profile, profile)


@PROPERTY
@given(st.sampled_from(["tiny", "cstinyllama-1.2b"]), st.data())
def test_any_set_assignment_to_a_recipe_is_accepted_and_revalidates_or_an_orch_error(name, data):
    field = data.draw(st.sampled_from(leaf_fields(Recipe)))
    value = data.draw(SCALAR_TEXT)
    path = RECIPES_DIR / f"{name}.yaml"
    try:
        recipe = validate(path, Recipe, merge_all(read_yaml(path), [parse_assignment(f"{field}={value}")]))
    except OrchError as err:
        assert len(str(err)) <= 4000
        return
    revalidates(Recipe, recipe)


YAML_SCALARS = st.one_of(
    st.integers(0, 300),
    st.floats(0, 1),
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["yes", "off", "1:30:00", "cuda", "nccl", "gloo", "slurm", "local", "qgpu", "karolina"]),
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
PROFILE_VALUES = st.one_of(YAML_SCALARS, YAML_SCALARS, YAML_VALUES)
PROFILE_KEYS = st.sampled_from(leaf_fields(Profile) + ["unknown", "<<"]).map(lambda dotted: dotted.split("."))


def with_changes(base: dict[str, Any], changes: list[tuple[list[str], Any]]) -> dict[str, Any]:
    data = dict(base)
    for keys, value in changes:
        for key in reversed(keys[1:]):
            value = {key: value}
        data = merge_all(data, [{keys[0]: value}])
    return data


def flow(value: Any) -> str:
    """A value as YAML on one line."""
    return yaml.dump(value, Dumper=Dumper, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


BASES = [{k: v for k, v in profile_data(name)[1].items() if k != "extends"} for name in ("local", "local-slurm")]
PROFILE_DOCUMENTS = st.one_of(
    st.builds(
        lambda base, changes: dump_yaml(with_changes(base, changes)),
        st.sampled_from(BASES),
        st.lists(st.tuples(PROFILE_KEYS, PROFILE_VALUES), max_size=2),
    ),
    st.lists(st.tuples(PROFILE_KEYS, PROFILE_VALUES), max_size=3).map(
        lambda changes: LOCAL + "".join(f"{keys[-1]}: {flow(value)}\n" for keys, value in changes)
    ),
    st.text(max_size=200),
)


@PROPERTY
@given(PROFILE_DOCUMENTS)
def test_any_profile_document_is_accepted_and_revalidates_or_an_orch_error(document):
    _, recipe = load_recipe("tiny")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "profile.yaml"
        path.write_text(document, encoding="utf-8")
        try:
            _, profile = load_profile(str(path))
            check_time_limit(profile, path, make_plan(profile, recipe, 100))
        except OrchError as err:
            assert len(str(err)) <= 4000
            return
    revalidates(Profile, profile)
