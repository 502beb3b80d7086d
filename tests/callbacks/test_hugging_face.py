"""Hugging Face models (keyword inputs, ``ModelOutput``) trained with QAT and quantized after training
through the pt2e flow, exported and reloaded; FX cannot trace their ``**kwargs`` forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, seed_everything
from torch.utils.data import DataLoader

from lightning_quant import FxTracingError, PostTrainingQuantization, QuantizationAwareTraining, load_pt2
from lightning_quant.quantization.flows import int8_layers, output_steps
from lightning_quant.quantization.outputs import mean_cosine
from tests.helpers import quiet_trainer, requires_torchao

transformers = pytest.importorskip("transformers")
pytestmark = requires_torchao

VOCAB = 64


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        return transformers.BertForSequenceClassification(config)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return transformers.DistilBertForSequenceClassification(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2ForSequenceClassification(config)


def _batches(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (8, 12), generator=g)
        labels = (ids[:, 0] > VOCAB // 2).long()  # learnable from the first token
        batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    return batches


class HFClassifier(LightningModule):
    """A sequence classifier called with keyword inputs; batches are ``(inputs dict, labels)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.model = _model(kind)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = 0  # GPT-2 pools the last non-pad token

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.cross_entropy(self.model(**inputs).logits, labels)

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val_loss", F.cross_entropy(self.model(**inputs).logits, labels))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(_batches(4, 0), batch_size=None)

    def val_dataloader(self):
        return DataLoader(_batches(2, 1), batch_size=None)


KINDS = ["bert", "distilbert", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_hugging_face_qat_through_pt2e_exports_and_reloads(kind, tmp_path):
    seed_everything(0)
    model = HFClassifier(kind)
    callback = QuantizationAwareTraining(flow="pt2e", backend="xnnpack", export="pt2", export_dir=tmp_path)
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    int8 = callback.quantized_model
    # attention, FFN and head: BERT's and DistilBERT's Linear layers; GPT-2's transformers Conv1D
    # (addmm, which pt2e quantizers do not annotate) swapped for the Linear it computes
    layers = int8_layers(int8)
    assert sum(p == "int8" for p in layers.values()) >= 8
    if kind == "gpt2":
        assert layers["transformer.h.0.attn.c_attn"] == layers["transformer.h.1.mlp.c_proj"] == "int8"
    inputs, _ = _batches(1, 5)[0]
    out = int8(**inputs)
    assert isinstance(out, transformers.utils.ModelOutput) and out.logits.shape == (8, 2)  # as trained
    with torch.no_grad():
        fake = model.model.eval()(**inputs).logits
    assert mean_cosine(fake, out.logits) > 0.98
    # the .pt2 file reloads, takes the same keyword inputs and computes the same logits within the
    # export check's bound (4 quantization steps of the model's output)
    reloaded = load_pt2(callback.export_paths["pt2"])
    step = max(output_steps(int8))
    torch.testing.assert_close(reloaded(**inputs).logits, out.logits, rtol=0, atol=4 * step)


@pytest.mark.parametrize("kind", KINDS)
def test_hugging_face_ptq_through_pt2e_is_close_to_float(kind, tmp_path):
    model = HFClassifier(kind)
    callback = PostTrainingQuantization(flow="pt2e", calibration_batches=4, export=None, progress=False)
    quiet_trainer(callbacks=[callback]).validate(model, verbose=False)
    inputs, _ = _batches(1, 5)[0]
    with torch.no_grad():
        float_logits = model.model.eval()(**inputs).logits
    assert mean_cosine(float_logits, callback.quantized_model(**inputs).logits) > 0.99


def test_hugging_face_fx_failure_points_to_pt2e():
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)])
    with pytest.raises(FxTracingError, match=r'use flow="pt2e" \(torch.export captures what FX cannot'):
        trainer.fit(HFClassifier("bert"))
