"""Data and model tools that run on a login node or a laptop: corpus preparation, vocabulary swap, export, run
comparison. They build on the training components (jobs/) and the core, never on the CLI."""
