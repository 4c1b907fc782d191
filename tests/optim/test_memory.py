import torch
from torch import nn

from chimera.optim import Chimera21, optimizer_state_memory_bytes, optimizer_state_memory_summary


def step_once(opt, model):
    model(torch.randn(3, 10)).sum().backward()
    opt.step()


def test_torch_adam_moments_count_as_m_and_v():
    model = nn.Linear(10, 4)
    opt = torch.optim.Adam(model.parameters())
    step_once(opt, model)
    s = optimizer_state_memory_summary(opt)
    assert s["m"] == s["v"] == 44 * 4 and s["psi"] == 0
    assert s["other"] == 2 * 4  # one fp32 step tensor per parameter
    assert s["total"] == s["m"] + s["v"] + s["other"]


def test_chimera21_psi_bytes_follow_the_storage():
    for storage, psi_bytes in [("fp32", 44 * 4), ("int8", 44)]:
        model = nn.Linear(10, 4)
        opt = Chimera21(model.parameters(), psi_storage=storage)
        step_once(opt, model)
        s = optimizer_state_memory_summary(opt)
        assert s["psi"] == psi_bytes and s["m"] == s["v"] == 44 * 4


def test_empty_before_the_first_step():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    assert optimizer_state_memory_summary(opt) == {"m": 0, "v": 0, "psi": 0, "other": 0,
                                                   "total": 0}


def test_optimizer_state_memory_bytes_is_the_total():
    model = nn.Linear(10, 4)
    opt = Chimera21(model.parameters(), psi_storage="int8")
    assert optimizer_state_memory_bytes(opt) == 0
    step_once(opt, model)
    assert optimizer_state_memory_bytes(opt) == optimizer_state_memory_summary(opt)["total"] == (
        44 * 4 * 2 + 44 + 2 * 4)
