"""The public API: ``import chimera`` and every library package's ``__all__``, all listed in
docs/api.md."""

import importlib
from pathlib import Path

import pytest

import chimera

LIBRARY = ["chimera.optim", "chimera.quant", "chimera.nn", "chimera.deploy", "chimera.models",
           "chimera.rules", "chimera.data", "chimera.run"]
API_DOC = (Path(__file__).parents[1] / "docs" / "api.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["chimera", *LIBRARY])
def test_every_public_name_exists_and_is_documented(name):
    module = importlib.import_module(name)
    assert module.__all__, f"{name} exports nothing"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    undocumented = [n for n in module.__all__ if f"`{n}`" not in API_DOC]
    assert not undocumented, f"docs/api.md lacks {undocumented} of {name}"


def test_the_names_users_reach_for_first():
    from torch import nn

    from chimera import STAC, BitLinear, Chimera21, ScaledOptum, quantize_, ternarize
    from chimera.quant import ternary_stats

    assert callable(ternary_stats)
    model = quantize_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)),
                      chimera.TernaryConfig(skip=()))
    assert all(isinstance(m, BitLinear) for m in model)
    for cls, name in ((Chimera21, "chimera21"), (STAC, "stac"), (ScaledOptum, "scaled_optum")):
        assert isinstance(chimera.build_optimizer(name, ternarize(model, "fp32")), cls)
