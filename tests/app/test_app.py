"""The `lightning-quant` command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_quant import load_pt2
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.utils.timing import has_int8_dot_product
from tests.helpers import requires_executorch, requires_torchao

ROOT = Path(__file__).resolve().parents[2]


def run_app(tmp_path: Path, *overrides: str) -> tuple[str, dict]:
    result = app_process(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads((tmp_path / "metrics.json").read_text())


def app_process(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "lightning_quant.app",
        f"hydra.run.dir={tmp_path}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )


@pytest.mark.parametrize(
    ("flow", "backend"),
    [
        ("fx", "x86"),
        ("eager", "x86"),
        # 110 s (Inductor compiles the program for each check and timing); pt2e/x86 QAT to a .pt2 is also run by
        # the report's, the schedule's and the user patterns' pt2e cells, and the app's path by fx and eager
        pytest.param("pt2e", "x86", marks=[requires_torchao, pytest.mark.slow]),
        # the slowest cell of the fast suite (50 s); its .pte round trip is also run by the pt2e digits example
        pytest.param("pt2e", "xnnpack", marks=[requires_executorch, pytest.mark.slow]),
    ],
)
def test_app_qat_on_digits_int8_within_one_point_of_float(flow, backend, tmp_path):
    overrides = (f"quant.recipe.flow={flow}", f"backend={backend}")
    if (flow, backend) == ("pt2e", "x86") and has_int8_dot_product() is False:
        # without VNNI/AMX the trained program, compiled as served, can compute far from the int8 model (measured
        # on an AVX2-only EPYC): then the run must end with the export check's refusal, never with a wrong file
        result = app_process(tmp_path, *overrides)
        if result.returncode != 0:
            assert "the reloaded pt2 file differs from the int8 model" in result.stderr, result.stderr[-4000:]
            assert not list(tmp_path.rglob("*.pt2"))
            return
        stdout, metrics = result.stdout, json.loads((tmp_path / "metrics.json").read_text())  # the run is not repeated
    else:
        stdout, metrics = run_app(tmp_path, *overrides)
    assert metrics["float_acc"] >= 0.95
    assert metrics["int8_acc"] >= metrics["float_acc"] - 0.01
    assert 3.0 < metrics["fp32_bytes"] / metrics["int8_bytes"] < 4.2
    assert f"quant.recipe.flow={flow}" in metrics["overrides"]
    compiled = flow == "pt2e" and backend == "x86"  # its int8 kernels come from torch.compile
    latency = (
        ["| latency batch 1 (ms), both compiled", "| compile time batch 1 (s)"] if compiled else ["| latency batch 1"]
    )
    for line in ("| accuracy (test)", "| weights (bytes)", *latency):
        assert line in stdout
    paths = metrics["export_paths"]
    digits = torch.rand(2, 1, 8, 8) * 16  # digits pixels are 0..16
    if flow != "pt2e":
        assert sorted(paths) == ["torchscript"]
        with torch.no_grad(), quantized_engine("x86"):
            out = torch.jit.load(paths["torchscript"])(digits)
    else:
        assert sorted(paths) == (["pt2"] if backend == "x86" else ["executorch", "pt2"])
        out = load_pt2(paths["pt2"]).eval()(digits)
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())
    if backend == "xnnpack":
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(paths["executorch"])  # held while its method runs
        method = program.load_method("forward")
        torch.testing.assert_close(method.execute([digits])[0], out, rtol=0, atol=0.05 * float(out.abs().max()))


def test_app_checkpoint_to_int8_without_training(tmp_path):
    first, second = tmp_path / "train", tmp_path / "ptq"
    run_app(first, "quant=ptq", "trainer.max_epochs=2", "quant.export=[]")
    checkpoint = first / "checkpoints" / "epoch_001.ckpt"  # conf/callbacks/default.yaml names them so
    stdout, metrics = run_app(second, "quant=ptq", f"ckpt_path='{checkpoint}'", "quant.calibration_batches=8")
    assert metrics["global_step"] == 0
    assert metrics["float_acc"] >= 0.9 and metrics["int8_acc"] >= metrics["float_acc"] - 0.01
    assert "| accuracy (test)" in stdout and "exports:" in stdout
    assert sorted(metrics["export_paths"]) == ["torchscript"]  # export "default" on x86
    assert not list(second.glob("**/*.ckpt"))  # nothing trained, nothing saved


def test_app_dynamic_mode_quantizes_only_the_classifier(tmp_path):
    _, metrics = run_app(tmp_path, "quant=dynamic", "trainer.max_epochs=2", "quant.export=[torchscript]")
    assert metrics["int8_acc"] >= metrics["float_acc"] - 0.01
    assert metrics["fp32_bytes"] / metrics["int8_bytes"] < 1.2  # convolutions stay float in dynamic mode


def test_app_missing_checkpoint_is_a_clear_error(tmp_path):
    command = [
        sys.executable,
        "-m",
        "lightning_quant.app",
        f"hydra.run.dir={tmp_path}",
        "quant=ptq",
        "ckpt_path=/nonexistent/model.ckpt",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert "ckpt_path='/nonexistent/model.ckpt': no such file" in result.stderr


def test_app_float_baseline_without_quantization(tmp_path):
    stdout, metrics = run_app(tmp_path, "quant=none", "trainer.max_epochs=2")
    assert "float only: test accuracy" in stdout
    assert metrics["float_acc"] >= 0.9 and "int8_acc" not in metrics and metrics["fp32_bytes"] > 0
    assert metrics["fp32_ms_b1"] > 0 and "int8_ms_b1" not in metrics


def test_app_ptq_of_a_qat_checkpoint_converts_it_with_its_learnt_ranges(tmp_path):
    first, second = tmp_path / "qat", tmp_path / "ptq"
    _, trained = run_app(first, "trainer.max_epochs=3", "quant.export=[]")
    checkpoint = first / "checkpoints" / "last.ckpt"
    stdout, metrics = run_app(second, "quant=ptq", f"ckpt_path='{checkpoint}'")
    assert metrics["global_step"] == 0  # no training step
    assert metrics["int8_acc"] == pytest.approx(trained["int8_acc"])  # the same int8 model as the QAT run's
    assert sorted(metrics["export_paths"]) == ["torchscript"]  # export "default" on x86


def test_app_float_load_of_a_qat_checkpoint_names_the_way_out(tmp_path):
    first = tmp_path / "qat"
    run_app(first, "trainer.max_epochs=3", "quant.export=[]")
    command = [
        sys.executable,
        "-m",
        "lightning_quant.app",
        f"hydra.run.dir={tmp_path / 'again'}",
        f"ckpt_path='{first / 'checkpoints' / 'last.ckpt'}'",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert "holds a QAT model (trained with {'backend': 'x86', 'flow': 'fx'" in result.stderr
    assert "use quant=ptq (or quant=dynamic) to convert it to int8 with its learnt ranges" in result.stderr
