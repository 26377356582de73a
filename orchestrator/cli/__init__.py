"""The `orch` command line and what only it does: submission, scheduler adapters, following and showing runs.

Importing it never imports torch, transformers, accelerate or mlflow: `orch --help` and `orch status` answer at
once. The tools and the training job are imported inside the commands that need them."""
