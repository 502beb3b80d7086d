"""Size, accuracy and latency measure what they say."""

import io

import pytest
import torch
import torch.nn as nn

from lightning_quant.evaluation import metrics
from lightning_quant.evaluation.metrics import classification_accuracy, latency_ms, state_dict_bytes
from lightning_quant.quantization.inputs import ExampleInputs


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


class _Clock:
    """A fake ``time.perf_counter``: each forward of :class:`_Timed` advances it by the next duration."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, list(durations)

    def __call__(self):
        return self.now


class _Timed(nn.Module):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def forward(self, x):
        self.clock.now += self.clock.durations.pop(0)
        return x


def test_latency_is_the_median_of_the_timed_calls_after_warmup(monkeypatch):
    # two warm-up calls (huge, must not count), then five timed calls in seconds
    clock = _Clock([9.0, 9.0, 0.004, 0.001, 0.003, 0.100, 0.002])
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    example = ExampleInputs((torch.randn(1, 4),))
    assert latency_ms(_Timed(clock), example, 8, repeats=5, warmup=2) == pytest.approx(3.0)
    assert clock.durations == []  # exactly warmup + repeats forward passes


def test_comparison_table_writes_a_slower_int8_model_as_slower():
    from lightning_quant.evaluation.metrics import comparison_table

    metrics = {"float_acc": 0.9, "int8_acc": 0.89, "fp32_bytes": 400, "int8_bytes": 100}
    metrics |= {"fp32_ms_b1": 0.305, "int8_ms_b1": 0.638, "fp32_ms_b32": 1.80, "int8_ms_b32": 0.72}
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in comparison_table(metrics).splitlines()}
    assert rows["latency batch 1 (ms)"] == "2.09x slower" and rows["latency batch 32 (ms)"] == "2.50x faster"


def test_what_to_serve_names_the_fastest_way_and_says_slower_as_slower():
    from lightning_quant.evaluation.metrics import what_to_serve

    serve = what_to_serve(
        {"1": 0.30, "32": 2.0},
        {"1": 0.60, "32": 0.40},
        {"torchscript": {"1": 0.20, "32": 0.50}, "executorch": {"1": 0.25}},
    )
    assert serve["1"] == (
        "the torchscript file (0.200 ms), 3.00x faster than the int8 model in process, "
        "1.25x faster than the executorch file, 1.50x faster than fp32"
    )
    assert serve["32"] == (
        "the int8 model in process (0.400 ms), 1.25x faster than the torchscript file, 5.00x faster than fp32"
    )
    # an int8 model slower than fp32 at every size is still named, as slower
    assert (
        what_to_serve({"1": 0.1}, {"1": 0.3}, {})["1"] == "the int8 model in process (0.300 ms), 3.00x slower than fp32"
    )
