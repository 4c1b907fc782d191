"""The replica of ``test_ddp.py`` (a module of its own: the spawned processes import only this)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chimera import build_optimizer, ternarize

STEPS, BATCH = 4, 8


def int_ternary_model() -> nn.Module:
    """The same tiny integer-ternary MLP in every process (per-token activation scales, so a
    rank's half batch quantizes as it would inside the whole batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    return ternarize(model, "int_ternary", skip=["2"], group_size=8, act_quant="per_token")


def batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` global batches of ``BATCH * world_size`` examples; rank r takes slice r."""
    g = torch.Generator().manual_seed(5)
    n = BATCH * world_size
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(STEPS)]


def train(model: nn.Module, wrapped: nn.Module, data, rows: slice) -> None:
    opt = build_optimizer("scaled_optum", model, lr=1e-2, default_group_size=8, threshold=2,
                          ternary_lr=4.0)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(wrapped(x[rows]), y[rows]).backward()
        opt.step()


def replica(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Train under DDP (gloo) on this rank's slices; save the model's state to ``<rank>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    model = int_ternary_model()
    ddp = DistributedDataParallel(model)
    train(model, ddp, batches(world_size), slice(rank * BATCH, (rank + 1) * BATCH))
    torch.save(model.state_dict(), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()
