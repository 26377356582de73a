"""Compute-node side of orch: the training job and its components."""
