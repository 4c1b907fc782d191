"""Pretrained weights and ternarized Hugging Face models (tiny BERTs built from configs).

A float checkpoint goes into Bit layers as their latent weights, with the scale set from them
(no random re-init, nothing missing or unexpected): by ternarizing the loaded float model, by a
strict ``load_state_dict`` into an already ternarized one, and by ``from_pretrained`` of a class
that ternarizes itself. A checkpoint of a trained ternarized model round-trips through
``save_pretrained`` / ``from_pretrained`` exactly; a tied MLM decoder stays tied throughout."""

from __future__ import annotations

import torch
from integration_helpers import SEQ, VOCAB, assert_same_tensors, tiny_bert_config
from transformers import BertForMaskedLM, BertForSequenceClassification

from chimera import ternarize
from chimera.nn import BitLinear


class TernaryBertClassifier(BertForSequenceClassification):
    def __init__(self, config) -> None:
        super().__init__(config)
        ternarize(self, "chimera", skip=["classifier"], warmup_steps=4)


class TernaryBertMLM(BertForMaskedLM):
    """The decoder's weight is tied to the input embeddings: after ternarizing, the tie lives in
    ``decoder.weight_master``, so the tied keys are renamed for Hugging Face's tying."""

    def __init__(self, config) -> None:
        super().__init__(config)
        ternarize(self, "chimera", skip=[])
        self._tied_weights_keys = {k.replace("decoder.weight", "decoder.weight_master"): v
                                   for k, v in self._tied_weights_keys.items()}
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=False)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(3))


def _assert_clean_load(info: dict) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info


def _assert_holds_float_weights(model: BertForSequenceClassification, float_model) -> None:
    layer = model.bert.encoder.layer[0].attention.self.query
    saved = float_model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, BitLinear) and torch.equal(layer.weight_master, saved.weight)
    assert torch.equal(layer.scale_ema, saved.weight.abs().mean())  # scale from the weights


def test_float_checkpoint_goes_into_bit_layers(tmp_path):
    float_model = BertForSequenceClassification(tiny_bert_config())
    float_model.save_pretrained(tmp_path)
    converted = ternarize(BertForSequenceClassification.from_pretrained(tmp_path), "chimera",
                          skip=["classifier"], warmup_steps=4)
    _assert_holds_float_weights(converted, float_model)
    ternary = TernaryBertClassifier(tiny_bert_config())
    ternary.load_state_dict(float_model.state_dict())  # strict
    _assert_holds_float_weights(ternary, float_model)
    assert_same_tensors(ternary.state_dict(), converted.state_dict(), "state")


def test_trained_ternary_checkpoint_round_trips_through_from_pretrained(tmp_path):
    model = TernaryBertClassifier(tiny_bert_config())
    model(_ids())  # a training forward: scale EMA and warm-up step move
    model.bert.pooler.dense.alpha_override = 0.3
    model.save_pretrained(tmp_path)
    loaded, info = TernaryBertClassifier.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean_load(info)
    assert_same_tensors(model.state_dict(), loaded.state_dict(), "state")
    assert loaded.bert.pooler.dense.alpha_override == 0.3
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(_ids()).logits, model.eval()(_ids()).logits)


def test_tied_mlm_decoder_stays_tied(tmp_path):
    float_mlm = BertForMaskedLM(tiny_bert_config())
    float_mlm.save_pretrained(tmp_path / "float")
    converted = ternarize(BertForMaskedLM.from_pretrained(tmp_path / "float"), "chimera", skip=[])
    for model in (converted, TernaryBertMLM(tiny_bert_config())):
        decoder = model.cls.predictions.decoder
        assert isinstance(decoder, BitLinear)
        assert decoder.weight_master is model.bert.embeddings.word_embeddings.weight
    model = TernaryBertMLM(tiny_bert_config())
    model.save_pretrained(tmp_path / "ternary")
    loaded, info = TernaryBertMLM.from_pretrained(tmp_path / "ternary", output_loading_info=True)
    _assert_clean_load(info)
    assert loaded.cls.predictions.decoder.weight_master is (
        loaded.bert.embeddings.word_embeddings.weight)
    assert_same_tensors(model.state_dict(), loaded.state_dict(), "state")
