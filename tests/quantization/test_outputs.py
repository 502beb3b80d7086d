"""Output comparisons agree with their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_quant.quantization.outputs import flat_tensors, max_abs_diff, mean_cosine, sqnr_db


def test_sqnr_and_cosine_match_their_formulas():
    a = torch.randn(100)
    b = a + 0.1 * torch.randn(100)
    expected = 10 * math.log10(float((a**2).sum()) / float(((a - b) ** 2).sum()))
    assert sqnr_db(a, b) == pytest.approx(expected)
    assert sqnr_db(a, a) == float("inf")
    rows = torch.randn(5, 8)
    assert mean_cosine(rows, rows) == pytest.approx(1.0)
    assert mean_cosine(rows, -rows) == pytest.approx(-1.0)


def test_flat_tensors_and_max_abs_diff_walk_nested_outputs():
    a = {"logits": torch.tensor([1.0, 2.0]), "rest": (torch.tensor([3.0]), [torch.tensor([4.0])])}
    b = {"logits": torch.tensor([1.0, 2.5]), "rest": (torch.tensor([3.0]), [torch.tensor([1.0])])}
    assert [float(t[0]) for t in flat_tensors(a)] == [1.0, 3.0, 4.0]
    assert max_abs_diff(a, b) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"outputs differ in structure: 3 tensors vs 1"):
        max_abs_diff(a, torch.tensor([1.0]))


def test_prediction_of_takes_logits_never_a_loss():
    from collections import OrderedDict

    from lightning_quant.quantization.outputs import prediction_of

    loss, logits, hidden = torch.tensor(1.0), torch.ones(2, 3), torch.zeros(2, 4)
    assert prediction_of(OrderedDict(loss=loss, logits=logits)) is logits
    assert prediction_of({"loss": loss, "hidden": hidden}) is hidden
    assert prediction_of((logits, hidden)) is logits
    with pytest.raises(ValueError, match=r"the model's output \(NoneType\) holds no tensor to compare"):
        prediction_of(None)


def test_token_outputs_are_scored_per_token_and_a_causal_lms_by_its_next_token_loss():
    """Rows of token logits against [batch, length] labels: per-token accuracy, or for a causal LM the loss its own
    forward computes (labels shifted by one, -100 left out), so the int8 figure reads beside a logged val_loss."""
    transformers = pytest.importorskip("transformers")
    from lightning_quant.quantization.outputs import collect_outputs, is_causal_lm, task_metric

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32, (6, 10))
    labels = ids.clone()
    labels[0, :3] = -100  # a padded or prompt part, as Hugging Face's collators mark it
    batches = [{"input_ids": ids[:3], "labels": labels[:3]}, {"input_ids": ids[3:], "labels": labels[3:]}]
    rows = collect_outputs(model, batches, batch_to_input=lambda b: {"input_ids": b["input_ids"]})
    assert rows.shape == (60, 32) and is_causal_lm(model)
    with torch.no_grad():
        own = torch.stack([model(**b).loss * (b["labels"][:, 1:] != -100).sum() for b in batches]).sum()
    name, loss = task_metric(rows, labels, causal=True)
    assert name == "loss" and loss == pytest.approx(float(own) / int((labels[:, 1:] != -100).sum()), rel=1e-5)
    name, accuracy = task_metric(rows, labels)  # token classification: each token against its own label
    expected = (rows.view(6, 10, 32).argmax(-1) == labels)[labels != -100].float().mean()
    assert name == "accuracy" and accuracy == pytest.approx(float(expected))
    assert not is_causal_lm(torch.nn.Linear(2, 2))
