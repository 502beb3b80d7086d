"""Write int8 models to disk for servers (TorchScript), phones (lite interpreter) and ONNX runtimes.

Every file is written under a temporary name in the destination folder and renamed into
place, so an interrupted export never leaves a half-written file where a good one was. Each
file is then loaded back and run on the example inputs; the largest difference from the
in-process int8 model is recorded and logged.

Targets and engines:

- ``torchscript``: the model converted for the callback's backend (x86/fbgemm on servers);
- ``mobile``: a copy converted for qnnpack (ARM), saved for the lite interpreter (``.ptl``);
  ``optimize_for_mobile`` runs when this torch build has XNNPACK, and is skipped with a log
  line when it does not (the CPU wheels of torch 2.13 do not);
- ``onnx``: legacy TorchScript-based ONNX export with QuantizeLinear/DequantizeLinear pairs
  (needs ``pip install onnx``; checked with onnxruntime when that is installed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.config import Backend, ExportTarget
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.inputs import ExampleInputs, as_positional
from lightning_quant.quantization.outputs import max_abs_diff
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.checks import require_module
from lightning_quant.utils.files import atomic_write

log = logging.getLogger(__name__)

SUFFIXES = {ExportTarget.TORCHSCRIPT: ".pt", ExportTarget.MOBILE: ".ptl", ExportTarget.ONNX: ".onnx"}


@dataclass
class ExportRecord:
    """One exported file and how closely its reloaded output matches the in-process int8 model."""

    target: ExportTarget
    path: Path
    engine: str
    max_abs_diff: float


def engine_for(target: ExportTarget, backend: Backend) -> str:
    """The quantized engine a target's file is converted for."""
    return Backend.QNNPACK.value if target is ExportTarget.MOBILE else backend.value


def to_torchscript(model: nn.Module, example: ExampleInputs) -> torch.jit.ScriptModule:
    """Script ``model``; trace it on ``example`` where scripting fails (eager models with ``*args``)."""
    with known_torch_warnings_silenced():
        try:
            return torch.jit.script(model)
        except Exception as script_error:  # TorchScript rejects many Python constructs
            log.info("torch.jit.script failed (%s); tracing on the example inputs instead", type(script_error).__name__)
            if example.kwargs:
                return torch.jit.trace(model, example_kwarg_inputs=example.kwargs, check_trace=False)
            return torch.jit.trace(model, example.args, check_trace=False)


def _export_torchscript(model: nn.Module, path: Path, example: ExampleInputs) -> Any:
    scripted = to_torchscript(model, example)
    with known_torch_warnings_silenced():
        atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp))
        return example(torch.jit.load(str(path)))


def _export_mobile(model: nn.Module, path: Path, example: ExampleInputs) -> Any:
    from torch.jit.mobile import _load_for_lite_interpreter

    scripted = to_torchscript(model, example)
    if torch._C._is_xnnpack_enabled():
        from torch.utils.mobile_optimizer import optimize_for_mobile

        scripted = optimize_for_mobile(scripted)
    else:
        log.info(
            "this torch build has no XNNPACK: %s saved for the lite interpreter without optimize_for_mobile", path.name
        )
    with known_torch_warnings_silenced():
        atomic_write(path, lambda tmp: scripted._save_for_lite_interpreter(tmp))
        return example(_load_for_lite_interpreter(str(path)))


def _export_onnx(model: nn.Module, path: Path, example: ExampleInputs) -> Any:
    require_module("onnx", "onnx", 'export="onnx"')
    import onnx

    def write(tmp: str) -> None:
        with known_torch_warnings_silenced():
            torch.onnx.export(model, example.args, tmp, kwargs=example.kwargs or None, dynamo=False, opset_version=17)

    atomic_write(path, write)
    onnx.checker.check_model(str(path))
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: %s checked with onnx.checker only", path.name)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = [*example.args, *example.kwargs.values()]
    feeds = {inp.name: v.numpy() for inp, v in zip(session.get_inputs(), values)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


_WRITERS = {
    ExportTarget.TORCHSCRIPT: _export_torchscript,
    ExportTarget.MOBILE: _export_mobile,
    ExportTarget.ONNX: _export_onnx,
}


def export_int8(
    int8_for_engine: Callable[[str], nn.Module],
    targets: Iterable[ExportTarget],
    directory: os.PathLike | str,
    example: ExampleInputs,
    backend: Backend,
    basename: str = "model_int8",
) -> dict[str, ExportRecord]:
    """Export the int8 model to each target; returns ``{target: ExportRecord}``.

    Args:
        int8_for_engine: gives the int8 model converted for an engine name (called once per engine).
        targets: the export targets.
        directory: destination folder (created if missing).
        example: inputs used to check each reloaded file against the in-process model.
        backend: the backend of the run; decides the engine of TorchScript and ONNX files.
        basename: file name stem; ``model_int8`` gives ``model_int8.pt``, ``model_int8.ptl``...
    """
    records: dict[str, ExportRecord] = {}
    example = example.to("cpu")
    for target in targets:
        engine = engine_for(target, backend)
        path = Path(directory) / f"{basename}{SUFFIXES[target]}"
        model = int8_for_engine(engine)
        inputs = as_positional(model, example)
        with quantized_engine(engine), torch.inference_mode():
            expected = inputs(model)
            reloaded: Any | None = _WRITERS[target](model, path, inputs)
        diff = max_abs_diff(expected, reloaded) if reloaded is not None else float("nan")
        log.info("exported %s (%s engine) to %s; reloaded output max |diff| = %.3g", target.value, engine, path, diff)
        records[target.value] = ExportRecord(target, path, engine, diff)
    return records
