"""Every example runs on a small slice of its real data and gives sensible numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import requires_executorch, requires_torchao, visible_files

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ptq_digits_example(tmp_path):
    metrics = load("ptq_digits").main(["--epochs", "3", "--export-dir", str(tmp_path)])
    assert metrics["float_acc"] >= 0.9
    assert metrics["int8_acc"] >= metrics["float_acc"] - 0.01
    assert (tmp_path / "model_int8.pt").is_file()


@requires_executorch
@pytest.mark.slow  # 28 s; a .pte in ExecuTorch's runtime is also run by tests/test_export.py and the phones quickstart
def test_qat_digits_pt2e_example_runs_its_pte_in_executorch(tmp_path):
    metrics = load("qat_digits_pt2e").main(["--epochs", "4", "--limit", "800", "--export-dir", str(tmp_path)])
    assert metrics["float_acc"] >= 0.85
    assert metrics["int8_acc"] >= metrics["float_acc"] - 0.03
    # the files agree with the in-process int8 model
    assert abs(metrics["pt2_acc"] - metrics["int8_acc"]) <= 0.01
    assert abs(metrics["executorch_acc"] - metrics["int8_acc"]) <= 0.01
    assert visible_files(tmp_path) == ["model_int8.manifest.json", "model_int8.pt2", "model_int8.pte"]


@pytest.mark.slow  # 25 s; the same script's path on digits is test_ptq_digits_example
def test_ptq_mnist5k_example(tmp_path):
    metrics = load("ptq_mnist5k").main(["--epochs", "4", "--limit", "2000", "--export-dir", str(tmp_path)])
    assert metrics["float_acc"] >= 0.9
    assert metrics["int8_acc"] >= metrics["float_acc"] - 0.03
    assert visible_files(tmp_path) == ["model_int8.manifest.json", "model_int8.pt", "model_int8.ptl"]


def test_dynamic_lstm_reviews_example(tmp_path):
    metrics = load("dynamic_lstm_reviews").main(
        ["--epochs", "2", "--limit", "3000", "--vocab-size", "3000", "--export-dir", str(tmp_path)]
    )
    assert metrics["float_acc"] >= 0.55
    assert abs(metrics["int8_acc"] - metrics["float_acc"]) <= 0.02
    assert metrics["fp32_bytes"] / metrics["int8_bytes"] > 3.0


@pytest.mark.slow  # 31 s; the dynamic flow and the search: tests/quantization/flows/test_dynamic.py, test_search.py
def test_dynamic_minilm_example():
    results = load("dynamic_minilm").main(
        ["--sentences", "32", "--batch-size", "16", "--repeats", "1", "--search-batches", "1"]
    )
    per_tensor, per_channel, ffn_float, searched = (
        results[k]["mean_cosine"]
        for k in (
            "per-tensor",
            "per-channel",
            "per-channel, FFN outputs float",
            "per-channel, searched islands (cosine drop <= 0.01)",
        )
    )
    assert 0.85 < per_tensor < per_channel < ffn_float
    assert ffn_float > 0.975 and searched > per_channel and searched > 0.98
    assert results["per-tensor"]["size_ratio"] > 1.4


@requires_torchao
@pytest.mark.slow  # 53 s; torchao on MiniLM: the Hugging Face quickstart (tests/test_docs.py); full run: bench-torchao
def test_minilm_torchao_example_quantizes_five_ways():
    results = load("minilm_torchao").main(["--quick", "--snippets", "400", "--no-latency"])
    assert len(results) == 7
    float_bytes = results["float"]["bytes"]
    # Linear layers and the word embeddings hold nearly all of MiniLM's bytes
    assert float_bytes / results["PTQ int8 weight-only"]["bytes"] > 3.0
    assert float_bytes / results["QAT int8-dyn/int4-weight + KD"]["bytes"] > 3.0
    assert abs(results["PTQ int8 weight-only"]["accuracy"] - results["float"]["accuracy"]) <= 0.05
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())
