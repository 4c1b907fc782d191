"""A replica of the DDP test in ``test_int_ternary_seams.py`` (a module of its own, so that the
spawned processes import only this)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chimera.nn.int_ternary import IntTernaryLinear
from chimera.optim.scaled_optum import ScaledOptum


def train_replica(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Five ScaledOptum steps of a tiny int-ternary model under DDP on this rank's own data;
    saves the first layer's state and its initial T to ``out_dir/<rank>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(0)  # same initial model on every rank
    model = nn.Sequential(IntTernaryLinear(8, 16, group_size=4), nn.ReLU(), nn.Linear(16, 3))
    t0 = model[0].T.clone()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # nothing hides divergence
    opt = ScaledOptum.for_model(ddp, lr=0.01, default_group_size=4, threshold=2,
                                ternary_lr=4.0)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(5):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save({"state": model[0].state_dict(), "t0": t0}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()
