"""Prune a small MLP with FSDP2 (``fully_shard``) on any number of ranks.

    torchrun --nproc-per-node 2 examples/fsdp2_prune.py                 # CPU, gloo
    torchrun --nproc-per-node 4 examples/fsdp2_prune.py --steps 60 --checkpoint /tmp/ckpt
    python examples/fsdp2_prune.py --tiny                                # one rank, no launcher

The masks it prints are the same for 1, 2 or 4 ranks with the same seed: every rank steps its
shard with element indices of the full tensor, and what needs the whole tensor (statistics,
thresholds, group scores) is reduced across ranks in at most one collective per step, only on
the steps that read it. With ``--checkpoint`` it saves with torch.distributed.checkpoint's
helpers halfway and resumes from it, which also works on a different number of ranks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import sparsetrain
from sparsetrain import distributed, methods


def build(mesh) -> tuple[nn.Module, sparsetrain.optim.SGD, sparsetrain.Pruner]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 10))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, seed=1)
    method = methods.StochasticMagnitude(0.8, start=1, end=40, interval=5, l2=1e-4)
    return model, opt, sparsetrain.Pruner(model, opt, method, exclude=["4"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--checkpoint", default=None, help="directory: save at steps/2, then resume from it")
    parser.add_argument("--tiny", action="store_true", help="a few steps (a smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.steps = 12

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group(backend)
    else:  # started directly: one rank
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(device, (world,))
    model, opt, pruner = build(mesh)

    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # each rank its part of the batch
    x, y = x[rows].to(device), y[rows].to(device)
    for step in range(args.steps):
        if args.checkpoint and step == args.steps // 2:
            distributed.save(args.checkpoint, model, opt)
            model, opt, pruner = build(mesh)  # a fresh run (possibly on another number of ranks) ...
            distributed.load(args.checkpoint, model, opt)  # ... continues from the checkpoint
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    for target in pruner.targets:
        mask = opt.mask(target.param).full_tensor()  # gathered from every rank's shard
        if rank == 0:
            print(f"{target.name}: {1 - mask.float().mean().item():.1%} pruned, mask checksum {int(mask.sum())}")
    table = pruner.summary()  # of the full tensors: every rank calls it (one collective)
    if rank == 0:
        print(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
