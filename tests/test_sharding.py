"""FSDP2 on 2 real gloo processes: each rank holds only its shard of every parameter."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Shard

from jobs.model import build_model, shard
from orchestrator.core.loading import load_recipe
from tests.conftest import free_port


def shard_and_report(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _, recipe = load_recipe("tiny")
    torch.manual_seed(0)
    model = build_model(recipe.model, "sdpa")
    full = sum(p.numel() for p in model.parameters())
    shard(model, "shard_grad_op", "bf16")
    params = list(model.parameters())
    results[rank] = {
        "full": full,
        "local": sum(p.to_local().numel() for p in params),
        "all_dtensor_shard0": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params),
        "global": sum(p.numel() for p in params),
    }
    dist.destroy_process_group()


def test_parameters_are_sharded_across_two_gloo_ranks():
    results = mp.Manager().dict()
    mp.spawn(shard_and_report, args=(2, free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["all_dtensor_shard0"]
        assert r["global"] == r["full"]
        assert r["local"] < 0.6 * r["full"]
    assert results[0]["local"] + results[1]["local"] == results[0]["full"]
