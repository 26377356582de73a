from orchestrator.core.loading import load_profile, load_recipe
from orchestrator.core.plan import STARTUP_MIN, Plan, StartupPart, make_plan, startup_parts


def karolina_plan(compile_: bool) -> Plan:
    _, profile = load_profile("karolina", [{"nodes": 2}])
    _, recipe = load_recipe("cstinyllama-1.2b")
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"compile": compile_})})
    return make_plan(profile, recipe, 1000)


def seconds(parts: list[StartupPart]) -> dict[str, float]:
    return {part.name: part.seconds for part in parts}


def test_warm_compile_caches_shorten_only_the_compile():
    plan = karolina_plan(compile_=True)
    cold, warm = seconds(startup_parts(plan, warm_cache=False)), seconds(startup_parts(plan, warm_cache=True))
    assert 0 < warm["compile"] < cold["compile"]
    assert {k: v for k, v in cold.items() if k != "compile"} == {k: v for k, v in warm.items() if k != "compile"}


def test_an_eager_run_compiles_nothing_at_start():
    parts = startup_parts(karolina_plan(compile_=False), warm_cache=False)
    assert seconds(parts)["compile"] == 0
    assert next(part.source for part in parts if part.name == "compile") == "not compiled"


def test_the_planners_allowance_covers_a_cold_start():
    parts = startup_parts(karolina_plan(compile_=True), warm_cache=False)
    assert sum(part.seconds for part in parts) < STARTUP_MIN * 60
