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


def test_unknown_run_is_a_clear_error(orch_home: Path):
    assert_refused(orch("status", "no-such-run"), "No run 'no-such-run'")
