"""Login-node side of orch: CLI, profiles and recipes, planning, submission, the run registry.

Importing it never imports torch, transformers, accelerate or mlflow.
"""
