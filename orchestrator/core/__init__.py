"""The light core: schemas of profiles and recipes, planning and estimates, the typed run directory, settings
shared by several commands, errors. It imports nothing heavier than pydantic and PyYAML (an import contract in
pyproject.toml says so), so every other part of orch may build on it."""
