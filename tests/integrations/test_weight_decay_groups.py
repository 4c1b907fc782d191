"""``chimera.optim.weight_decay_groups`` decays what Hugging Face's Trainer and
pytorch-optimizer decay on a ternarized BERT (weight matrices and Bit layers' latent weights;
not biases, LayerNorms or anything 1-d), so a hand-built optimizer matches theirs."""

from __future__ import annotations

from integration_helpers import tiny_bert_config
from pytorch_optimizer import get_optimizer_parameters
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from chimera import Chimera21, ternarize
from chimera.optim import weight_decay_groups


def _split(groups) -> tuple[set[int], set[int]]:
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return decayed, {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}


def test_weight_decay_groups_match_hugging_face_and_pytorch_optimizer(tmp_path):
    model = ternarize(BertForSequenceClassification(tiny_bert_config()), "chimera",
                      skip=["classifier"])
    ours = _split(weight_decay_groups(model, 0.01))
    query = model.bert.encoder.layer[0].attention.self.query
    assert id(query.weight_master) in ours[0] and id(query.bias) in ours[1]
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", weight_decay=0.01)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(Chimera21, {"lr": 1e-3}))
    assert _split(trainer.create_optimizer().param_groups) == ours
    theirs = get_optimizer_parameters(model, 0.01, wd_ban_list=("bias", "LayerNorm"))
    assert _split(theirs) == ours
