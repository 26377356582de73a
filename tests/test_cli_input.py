"""Bad input: one clear paragraph naming the file, the field and what is allowed; nothing submitted."""

from pathlib import Path

import pytest

from tests.conftest import ROOT, orch


def assert_refused(result, *fragments: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def no_run_is_created(orch_home: Path):
    yield
    assert not (orch_home / "runs").exists() or not any((orch_home / "runs").iterdir())


@pytest.mark.usefixtures("no_run_is_created")
class TestRefusedBeforeSubmission:
    def test_unknown_profile_lists_the_available_ones(self):
        assert_refused(
            orch("submit", "--profile", "lokal", "--steps", "5"),
            "Unknown profile 'lokal'",
            "Did you mean 'local'",
            "local",
        )

    def test_unknown_recipe_lists_the_available_ones(self):
        assert_refused(orch("submit", "--recipe", "huge", "--steps", "5"), "Unknown recipe 'huge'", "cstinyllama-1.2b")

    def test_mistyped_field_names_file_field_and_allowed_fields(self, tmp_path: Path):
        recipe = tmp_path / "typo.yaml"
        recipe.write_text((ROOT / "recipes/tiny.yaml").read_text().replace("micro_batch_size", "micro_bach_size"))
        assert_refused(
            orch("submit", "--recipe", str(recipe), "--steps", "5"),
            str(recipe),
            "unknown field 'train.micro_bach_size'",
            "micro_batch_size",
            "field 'train.micro_batch_size' is required",
        )

    def test_wrong_value_type_names_the_field_and_the_value(self, tmp_path: Path):
        recipe = tmp_path / "bad.yaml"
        recipe.write_text((ROOT / "recipes/tiny.yaml").read_text().replace("precision: bf16", "precision: fp8"))
        assert_refused(orch("submit", "--recipe", str(recipe)), "field 'train.precision'", "'bf16' or 'fp32'", "fp8")

    def test_non_integral_gradient_accumulation_shows_the_numbers(self, tmp_path: Path):
        recipe = tmp_path / "accum.yaml"
        recipe.write_text(
            (ROOT / "recipes/tiny.yaml").read_text().replace("micro_batch_size: 4", "micro_batch_size: 3")
        )
        assert_refused(orch("submit", "--recipe", str(recipe)), "Global batch 16", "micro batch 3 × world size 2 = 6")

    def test_zero_steps_is_refused(self):
        assert_refused(orch("submit", "--steps", "0"), "--steps must be a positive number")

    def test_missing_data_folder_is_refused(self, tmp_path: Path):
        recipe = tmp_path / "data.yaml"
        recipe.write_text((ROOT / "recipes/tiny.yaml").read_text().replace("source: demo", "source: /nonexistent"))
        assert_refused(orch("submit", "--recipe", str(recipe)), "field 'data.source'", "/nonexistent")

    def test_an_environment_script_that_fails_here_stops_the_submission_with_its_message(self, tmp_path: Path):
        """What Lmod says of a module that does not exist, from the script every job would source first."""
        script = tmp_path / "site-env.sh"
        script.write_text(
            'echo "Lmod has detected the following error: The following module(s) are unknown: CUDA/12.4.0" >&2\n'
            "return 1\n"
        )
        profile = tmp_path / "site.yaml"
        profile.write_text(f"extends: local-slurm\nenv_script: {script}\n")
        assert_refused(
            orch("submit", "--profile", str(profile), "--steps", "5"),
            f"{profile}: the environment script {script} fails here",
            "module(s) are unknown: CUDA/12.4.0",
        )


def test_unknown_run_is_a_clear_error(orch_home: Path):
    assert_refused(orch("status", "no-such-run"), "No run 'no-such-run'")


def recipe_on_prepared_data(tmp_path: Path, vocab_size: int, tokenizer_text: str) -> Path:
    """The tiny recipe pointed at the parts of an `orch data prepare` output that submission reads: the index
    (made with the tokenizer whose text is "the one used") and a tokenizer."""
    import hashlib
    import json

    source, tokenizer = tmp_path / "tokens", tmp_path / "tokenizer"
    (source / "train").mkdir(parents=True)
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text(tokenizer_text)
    index = {
        "vocab_size": vocab_size,
        "tokens": 10**6,
        "tokenizer": {"sha256": hashlib.sha256(b"the one used").hexdigest()},
    }
    (source / "train" / "index.json").write_text(json.dumps(index))
    recipe = (ROOT / "recipes/tiny.yaml").read_text().replace("source: demo", f"source: {source}")
    (tmp_path / "r.yaml").write_text(recipe.replace("tokenizer: demo", f"tokenizer: {tokenizer}"))
    return tmp_path / "r.yaml"


@pytest.mark.usefixtures("no_run_is_created")
class TestDataAndModelChecks:
    def test_prepared_data_with_a_larger_vocabulary_than_the_model(self, tmp_path: Path):
        assert_refused(
            orch("submit", "--recipe", str(recipe_on_prepared_data(tmp_path, 70000, "the one used"))),
            "field 'model.vocab_size' is 512",
            "tokenized with 70000",
            "at least 70000",
        )

    def test_the_demo_corpus_with_a_tokenizer_larger_than_the_model(self, tmp_path: Path):
        """Refused before anything is queued, not in the job after a retry: ids 512 and up have no embedding row."""
        import json

        tokenizer = tmp_path / "big-tokenizer"
        tokenizer.mkdir()
        vocab = {f"t{i}": i for i in range(600)}
        spec = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": [{"id": 600, "content": "<s>"}]}
        (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
        recipe = tmp_path / "r.yaml"
        text = (ROOT / "recipes/tiny.yaml").read_text()
        recipe.write_text(text.replace("tokenizer: demo", f"tokenizer: {tokenizer}"))
        assert_refused(
            orch("submit", "--recipe", str(recipe), "--steps", "5"),
            "field 'model.vocab_size' is 512",
            "gives ids up to 600",
            "at least 601",
        )

    def test_prepared_data_with_another_tokenizer(self, tmp_path: Path):
        assert_refused(
            orch("submit", "--recipe", str(recipe_on_prepared_data(tmp_path, 500, "a different tokenizer"))),
            "field 'data.tokenizer'",
            "is not the tokenizer",
            "was prepared with",
        )

    def test_init_from_a_model_with_other_dimensions(self, tmp_path: Path):
        import json

        model_dir = tmp_path / "model"
        model_dir.mkdir()
        config = {
            "hidden_size": 128,
            "intermediate_size": 176,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
        }
        (model_dir / "config.json").write_text(json.dumps(config))
        recipe = (
            (ROOT / "recipes/tiny.yaml")
            .read_text()
            .replace("  vocab_size: 512\n", f"  vocab_size: 512\n  init_from: {model_dir}\n")
        )
        (tmp_path / "r.yaml").write_text(recipe)
        assert_refused(
            orch("submit", "--recipe", str(tmp_path / "r.yaml")),
            "differs from the recipe",
            "model.hidden_size is 64 but hidden_size is 128",
        )


@pytest.mark.usefixtures("no_run_is_created")
class TestValuesMeanWhatTheySay:
    def test_time_under_a_minute_is_refused_not_sent_as_no_limit(self):
        assert_refused(orch("submit", "--time", "0:30", "--dry-run"), "--time '0:30' is 30 s", "at least one minute")

    def test_alias_bomb_profile_is_one_short_paragraph(self, tmp_path: Path):
        laughs = 'description: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
            f"x{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)
        )
        profile = tmp_path / "bomb.yaml"
        profile.write_text((ROOT / "cluster_profiles/local.yaml").read_text() + laughs)
        result = orch("submit", "--profile", str(profile), "--dry-run")
        assert_refused(result, str(profile), "anchors and aliases")
        assert len(result.stderr) < 1000


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--set", "recipe.extends=cstinyllama-1.2b"), "'extends' is followed when a profile or recipe file is read"),
        (("--set", "extends=karolina"), "'extends' is followed when a profile or recipe file is read"),
        (("--nodes", "2"), "nodes is 2: the local executor runs on this one machine"),
        (("--set", "recipe.spike_guard={window: 5, min_steps: 20}"), "window (5) is shorter than min_steps (20)"),
    ],
)
def test_settings_that_would_silently_change_nothing_are_refused(orch_home: Path, args: tuple[str, ...], says: str):
    assert_refused(orch("submit", "--steps", "5", "--dry-run", *args), says)
    assert not (orch_home / "runs").exists()
