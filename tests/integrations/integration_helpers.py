"""Tiny models and data built in the test (nothing is downloaded), and exact comparisons of
weights and optimizer state between two runs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig

VOCAB, SEQ = 32, 8


def tiny_bert_config(**overrides) -> BertConfig:
    """A BERT small enough to train a few steps in well under a second (no dropout: two runs
    of the same steps are identical)."""
    settings = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=SEQ, num_labels=2,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**settings, **overrides})


def token_dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` examples of ``input_ids`` (SEQ tokens) and a label that depends on the first."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row[0] % 2} for row in ids]


class TinyClassifier(nn.Module):
    """A Trainer-ready MLP: ``forward(x, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self, d_in: int = 8, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def vector_dataset(n: int = 32, d_in: int = 8, classes: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    """Same keys and bit-identical tensors (non-tensor values equal) in two nested dicts."""
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert_same_tensors(x, y, f"{what}[{key!r}]")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}[{key!r}] differs"
        else:
            assert x == y, f"{what}[{key!r}]: {x!r} != {y!r}"


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """The per-parameter state and the hyper-parameters of two optimizers are identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert_same_tensors(sa["state"], sb["state"], "optimizer state")
    strip = [{k: v for k, v in g.items() if k != "params"} for g in sa["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in sb["param_groups"]]

