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
