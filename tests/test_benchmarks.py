"""The benchmarks run end to end at a tiny size (the full runs are `make bench-*`, outside CI)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import requires_torchao

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@requires_torchao
def test_bench_llm_writes_its_table_and_figures_at_a_tiny_size(tmp_path):
    pytest.importorskip("transformers")
    overrides = [
        "float.steps=20",
        "qat.steps=4",
        "model.num_hidden_layers=1",
        "data.eval_windows=32",
        "ptq.calibration_batches=2",
        "generation.prompts=1",
        "generation.new_tokens=4",
        "generation.rounds=1",
        f"hydra.run.dir={tmp_path}",
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llm.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert results["machine"] in (tmp_path / "table.md").read_text()
    assert "CUDA only" in rows["8da4w, AWQ"]["skipped"] and "CUDA only" in rows["8da4w, GPTQ"]["skipped"]
    measured = {name: row for name, row in rows.items() if "skipped" not in row}
    # 14 rows, of which the two int4 algorithms torchao runs on CUDA only are skipped
    assert len(rows) == 14 and len(measured) == 12, sorted(rows)
    assert all(math.isfinite(row["perplexity"]) for row in measured.values())
    assert "8da4w, QAT 4 steps, learned ranges" in measured and "8da4w, QAT + KD 4 steps" in measured
    # int8 weights only is close to lossless; every quantized row is well under the float bytes
    assert abs(rows["int8 weights only, RTN"]["perplexity"] / rows["float"]["perplexity"] - 1) < 0.01
    float_bytes = rows["float"]["bytes"]
    assert all(row["bytes"] < 0.6 * float_bytes for name, row in measured.items() if not name.startswith("float"))
    assert all(row["tokens_per_s"] > 0 for row in measured.values())


@pytest.mark.slow
@requires_torchao
def test_bench_runtimes_times_every_path_and_names_our_fastest(tmp_path):
    pytest.importorskip("onnxruntime")
    from lightning_quant.utils.timing import cpu_kind

    command = [sys.executable, str(ROOT / "benchmarks" / "runtimes.py"), "--models", "digits", "--rounds", "1"]
    command += ["--repeats", "1", "--threads", "1", "--publish", str(tmp_path / "runtimes_{cpu}.md")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # one file per kind of CPU, named by this machine's kind
    assert [p.name for p in tmp_path.glob("runtimes_*.md")] == [f"runtimes_{cpu_kind()}.md"]
    text = (tmp_path / f"runtimes_{cpu_kind()}.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    ours = [name for name in rows if name.startswith("ours:")]
    assert "ONNX Runtime int8 (quantize_static)" in rows and "torch fp32 compiled" in rows
    files = [
        "fx int8 in process",
        "TorchScript file",
        "TorchScript file, batch sizes alternating",
        "ONNX file in ONNX Runtime",
    ]
    assert set(ours) - {"ours: pt2e/x86 AOTInductor package"} == {f"ours: {p}" for p in [*files, "pt2e/x86 compiled"]}
    # the package is timed, or the export check's refusal is said (torch 2.13 miscompiles the digits CNN's)
    assert "ours: pt2e/x86 AOTInductor package" in rows or "AOTInductor package of this model was refused" in text
    # every int8 path agrees with fp32 on nearly every held-out input, and every time is a positive number
    assert all(float(rows[name][3]) > 0.9 for name in ours)
    assert all(float(cell) > 0 for name in ours for cell in rows[name][4:6])
    assert "- 1 thread(s), batch 1: our fastest, " in text and "than the fastest true fp32" in text
