"""Exported int8 files: written atomically, reloaded in a fresh process, and equal to the in-process model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantizationAwareTraining
from lightning_quant.export import engine_for
from lightning_quant.quantization.config import Backend, ExportTarget
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.outputs import max_abs_diff
from tests.helpers import BoringClassifier, quiet_trainer

RELOAD = textwrap.dedent(
    """
    import sys, torch
    path, inputs_path, out_path, engine = sys.argv[1:5]
    torch.backends.quantized.engine = engine
    x = torch.load(inputs_path)
    if path.endswith(".ptl"):
        from torch.jit.mobile import _load_for_lite_interpreter
        y = _load_for_lite_interpreter(path)(x)
    elif path.endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        y = torch.jit.load(path)(x)
    torch.save(y, out_path)
    """
)


def _reload_in_fresh_process(path: Path, x: torch.Tensor, engine: str, tmp_path: Path) -> torch.Tensor:
    inputs, out = tmp_path / "x.pt", tmp_path / f"{path.name}.out.pt"
    torch.save(x, inputs)
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path), str(inputs), str(out), engine],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export")
    callback = QuantizationAwareTraining(export=("torchscript", "mobile", "onnx"), export_dir=directory)
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    return callback, model


@pytest.mark.parametrize("target", ["torchscript", "mobile", "onnx"])
def test_export_reloads_in_fresh_process_and_agrees(exported, target, tmp_path):
    callback, model = exported
    record = callback.export_records[target]
    assert Path(callback.export_paths[target]) == record.path and record.path.is_file()
    x = next(iter(model.val_dataloader()))[0]
    engine = engine_for(ExportTarget(target), Backend.X86)
    int8 = callback.convert(model, engine)
    with quantized_engine(engine), torch.inference_mode():
        expected = int8(x)
    reloaded = _reload_in_fresh_process(record.path, x, engine, tmp_path)
    # onnxruntime may round requantization differently: allow one int8 step of the output layer
    tolerance = float(callback.quantized_model.head.scale) + 1e-6 if target == "onnx" else 0.0
    assert max_abs_diff(expected, reloaded) <= tolerance
    assert record.max_abs_diff <= tolerance


def test_export_mobile_uses_qnnpack_engine(exported):
    callback, _ = exported
    assert callback.export_records["mobile"].engine == "qnnpack"
    assert callback.export_records["torchscript"].engine == "x86"
    assert callback.export_records["mobile"].path.suffix == ".ptl"


def test_max_abs_diff_raises_on_different_structures():
    with pytest.raises(ValueError, match=r"outputs differ in structure: 1 tensors vs 2"):
        max_abs_diff(torch.zeros(2), (torch.zeros(2), torch.zeros(2)))


def test_export_onnx_without_onnx_installed_raises_with_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(
        ModuleNotFoundError, match=r"export=\"onnx\" needs the optional package 'onnx': run `pip install onnx`"
    ):
        QuantizationAwareTraining(export=["onnx"])
