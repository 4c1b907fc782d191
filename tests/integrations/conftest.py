"""Every integration test starts from the same torch seed, and the Hugging Face libraries run
offline (the tests build their models from configs; nothing may be downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
