"""DDP (2 ranks, gloo) of a ternarized integer-ternary model trained by ScaledOptum: the ranks
end as identical replicas, equal to one process training on the whole batches (DDP averages
``dL/dW``, from which ScaledOptum's integer updates follow)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from ddp_worker import BATCH, batches, int_ternary_model, replica, train

from chimera.nn import IntTernaryLinear


def test_ddp_int_ternary_replicas_identical_and_equal_to_one_big_batch(tmp_path):
    mp.spawn(replica, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    single = int_ternary_model()
    assert isinstance(single[0], IntTernaryLinear) and isinstance(single[4], IntTernaryLinear)
    start = {k: v.clone() for k, v in single.state_dict().items()}
    train(single, single, batches(2), slice(0, 2 * BATCH))
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"replicas differ in {key}"
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0][key], value, msg=key)
        else:
            assert torch.equal(ranks[0][key], value), key
    moved = [k for k in start if k.endswith(".T") and not torch.equal(start[k], ranks[0][k])]
    assert moved, "the ternary weights never moved"
