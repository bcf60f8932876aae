"""DistributedDataParallel check, run in spawned processes by tests/test_deploy.py (not a test file).

Each of ``WORLD`` CPU processes (gloo backend, TCP rendezvous on 127.0.0.1) trains, for ``STEPS`` SGD
steps, the reference model and its converted copy, each wrapped in DDP, on its shard of a deterministic
batch; then tries one train-mode forward of both after ``nn.SyncBatchNorm.convert_sync_batchnorm``. The
state dicts and the outcome of the SyncBatchNorm forward are saved per rank for the parent to compare.
Two data scenarios: "split" (each rank its own half of the batch: BatchNorm statistics per process, as
the reference has them in DDP) and "same" (both ranks see the same half, so that one process training on
the whole batch - the half twice - is the same computation: BatchNorm's batch statistics are the same).
The spawned processes inherit the environment: under ``TRITON_INTERPRET=1`` the fp32 models run the
Triton kernels in the interpreter, fp64 models run the PyTorch path.
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gam_cases import randomise
from gam_triton import convert
from gam_triton.reference import YoloGAM

WORLD = 2
STEPS = 3
SHARD = 2  # samples per rank
DTYPES = (torch.float32, torch.float64)
SCENARIOS = ("split", "same")


def make_net(dtype: torch.dtype) -> nn.Module:
    """Stem conv, a YOLO-form GAM (grouped, shuffled), SiLU, head conv: a tiny detector-shaped model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), YoloGAM(16, 16, group=True), nn.SiLU(),
                        nn.Conv2d(16, 4, 1))
    return randomise(net, 4).to(dtype).train()


def batch(step: int, scenario: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a step (inputs, targets): WORLD shards of SHARD samples, in rank order."""
    g = torch.Generator().manual_seed(100 + step)
    n = SHARD if scenario == "same" else SHARD * WORLD
    x = torch.randn(n, 3, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(n, 4, 5, 4, generator=g, dtype=torch.float64)
    if scenario == "same":
        x, t = x.repeat(WORLD, 1, 1, 1), t.repeat(WORLD, 1, 1, 1)
    return x.to(dtype), t.to(dtype)


def train(net: nn.Module, scenario: str, dtype: torch.dtype, rank: int | None) -> nn.Module:
    """STEPS of SGD on the mean squared error; ``rank`` None: one process on the whole batch."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x, t = batch(step, scenario, dtype)
        if rank is not None:
            x, t = x.chunk(WORLD)[rank], t.chunk(WORLD)[rank]
        loss = nn.functional.mse_loss(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def _sync_bn_outcome(net: nn.Module, dtype: torch.dtype) -> str:
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).train()
    try:
        sync(batch(0, "split", dtype)[0][:SHARD])
    except Exception as e:  # noqa: BLE001 - the outcome itself is what is compared
        return f"{type(e).__name__}: {e}"
    return "ran"


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscribed thread pools
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        states, sync_bn = {}, {}
        for dtype in DTYPES:
            ref = make_net(dtype)
            ours = convert(copy.deepcopy(ref))
            for scenario in SCENARIOS:
                for name, net in (("ref", ref), ("ours", ours)):
                    net = copy.deepcopy(net)
                    train(DistributedDataParallel(net), scenario, dtype, rank)
                    states[(name, scenario, str(dtype))] = {k: v.detach().clone() for k, v in
                                                            net.state_dict().items()}
            for name, net in (("ref", ref), ("ours", ours)):
                sync_bn[(name, str(dtype))] = _sync_bn_outcome(net, dtype)
        torch.save({"states": states, "sync_bn": sync_bn}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
