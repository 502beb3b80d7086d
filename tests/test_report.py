import io

import pytest
import torch
import torch.nn as nn

from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.report import classification_accuracy, format_table, latency_ms, state_dict_bytes


def test_state_dict_bytes_matches_torch_save():
    model = nn.Linear(100, 10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert state_dict_bytes(model) == len(buffer.getvalue())
    assert state_dict_bytes(model) > 4 * 1010


def test_classification_accuracy_counts_correct_predictions():
    model = nn.Identity()
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    batches = [(logits[:2], torch.tensor([0, 1])), (logits[2:], torch.tensor([1, 1]))]
    assert classification_accuracy(model, batches) == 0.75
    with pytest.raises(ValueError, match="no batches to measure accuracy on"):
        classification_accuracy(model, [])


def test_latency_is_positive_and_grows_with_batch():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    example = ExampleInputs((torch.randn(1, 256),))
    small = latency_ms(model, example, 1, repeats=20, warmup=3)
    large = latency_ms(model, example, 512, repeats=20, warmup=3)
    assert 0 < small < large


def test_format_table():
    table = format_table(("a", "b"), [(1, 0.123456), ("x", "y")])
    assert table.splitlines() == ["| a | b      |", "|---|--------|", "| 1 | 0.1235 |", "| x | y      |"]
