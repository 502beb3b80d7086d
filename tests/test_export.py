"""Exported int8 files: written atomically, reloaded in a fresh process, and equal to the in-process model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantizationAwareTraining
from lightning_quant.export import engine_for
from lightning_quant.quantization import flows
from lightning_quant.quantization.config import Backend, ExportTarget
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.outputs import max_abs_diff
from lightning_quant.utils.integrity import CorruptFileError
from tests.helpers import BoringClassifier, TinyNet, quiet_trainer, requires_executorch, visible_files

RELOAD = textwrap.dedent(
    """
    import sys, torch
    path, inputs_path, out_path, engine = sys.argv[1:5]
    torch.backends.quantized.engine = engine
    x = torch.load(inputs_path)
    if path.endswith(".ptl"):
        from torch.jit.mobile import _load_for_lite_interpreter
        y = _load_for_lite_interpreter(path)(x)
    elif path.endswith("_aoti.pt2"):
        import torchao.quantization.pt2e  # noqa: F401  # the package's kernels are torch's; nothing else is needed
        y = torch._inductor.aoti_load_package(path)(x)
    elif path.endswith(".pt2"):
        from lightning_quant import load_pt2
        y = load_pt2(path).eval()(x)
    elif path.endswith(".pte"):
        from executorch.runtime import Runtime
        program = Runtime.get().load_program(path)
        y = program.load_method("forward").execute([x])[0]
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


@pytest.mark.parametrize("batch", [1, 16, 5])
@pytest.mark.parametrize("target", ["torchscript", "mobile", "onnx"])
def test_export_reloads_in_fresh_process_and_agrees(exported, target, batch, tmp_path):
    callback, model = exported
    assert callback.example_inputs.batch_size == 16  # the files must not be tied to it
    record = callback.export_records[target]
    assert Path(callback.export_paths[target]) == record.path and record.path.is_file()
    x = torch.cat([b[0] for b in model.val_dataloader()])[:batch]
    engine = engine_for(ExportTarget(target), Backend.X86)
    int8 = callback.convert(model, engine)
    with quantized_engine(engine), torch.inference_mode():
        expected = int8(x)
    reloaded = _reload_in_fresh_process(record.path, x, engine, tmp_path)
    # onnxruntime may round requantization differently: allow one int8 step of the output layer
    # the lite interpreter and onnxruntime may round a requantization differently: a step or two of the output
    tolerance = {"torchscript": 0.0, "mobile": 2.0, "onnx": 2.0}[target] * float(callback.quantized_model.head.scale)
    assert max_abs_diff(expected, reloaded) <= tolerance
    assert record.max_abs_diff <= tolerance


@pytest.fixture(scope="module")
def exported_pt2e(tmp_path_factory):
    """pt2e QAT for both backends: x86 writes the .pt2 program, xnnpack the .pt2 and the .pte."""
    runs = {}
    for backend in ("x86", "xnnpack"):
        directory = tmp_path_factory.mktemp(f"export_{backend}")
        callback = QuantizationAwareTraining(flow="pt2e", backend=backend, export="default", export_dir=directory)
        model = BoringClassifier()
        quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
        runs[backend] = (callback, model)
    return runs


@requires_executorch
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize(("backend", "target"), [("x86", "pt2"), ("xnnpack", "pt2"), ("xnnpack", "executorch")])
def test_pt2e_exports_reload_in_fresh_process_and_agree(exported_pt2e, backend, target, batch, tmp_path):
    callback, model = exported_pt2e[backend]
    assert sorted(callback.export_paths) == (["pt2"] if backend == "x86" else ["executorch", "pt2"])
    record = callback.export_records[target]
    assert record.path.suffix == {"pt2": ".pt2", "executorch": ".pte"}[target] and record.path.is_file()
    x = torch.cat([b[0] for b in model.val_dataloader()])[:batch]
    with torch.inference_mode():
        expected = callback.quantized_model(x)
    reloaded = _reload_in_fresh_process(record.path, x, "x86", tmp_path)
    # the saved program runs the same decomposed ops; XNNPACK's kernels may round a requantization
    # the other way: a step or two of the output
    step = max(flows.output_steps(callback.quantized_model))
    tolerance = {"pt2": 1e-5, "executorch": 2 * step}[target]
    assert max_abs_diff(expected, reloaded) <= tolerance
    assert record.max_abs_diff <= 4 * step  # the export's own check (x86 pt2: compiled)


@requires_executorch
def test_an_executorch_runner_outlives_collection_of_what_it_was_loaded_from(exported_pt2e):
    """Its method runs on memory the program and its bytes own; once those were collected, the next
    run read freed memory and crashed the process."""
    import gc

    from lightning_quant.export import executorch_runner
    from lightning_quant.quantization import ExampleInputs

    callback, model = exported_pt2e["xnnpack"]
    x = torch.cat([b[0] for b in model.val_dataloader()])[:4]
    run = executorch_runner(callback.quantized_model, ExampleInputs((x,)))
    gc.collect()
    with torch.inference_mode():
        expected = callback.quantized_model(x)
    for _ in range(20):
        assert max_abs_diff(expected, run(ExampleInputs((x,)))) <= 2 * max(flows.output_steps(callback.quantized_model))


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


def test_pt2e_onnx_without_onnxscript_installed_raises_with_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(
        ModuleNotFoundError,
        match=r"export=\"onnx\" of a pt2e program needs the optional package 'onnxscript': "
        r"run `pip install onnxscript`",
    ):
        QuantizationAwareTraining(flow="pt2e", export=["onnx"])
    QuantizationAwareTraining(export=["onnx"])  # the fx flow's file is written without it


def test_pt2e_onnx_file_holds_the_programs_int8_reloads_in_fresh_process_and_agrees(tmp_path):
    """A pt2e program is written as ONNX by torch.onnx's dynamo exporter: its quantize/dequantize nodes become
    QuantizeLinear/DequantizeLinear pairs, with a dynamic batch axis, run by ONNX Runtime (and OpenVINO)."""
    import onnx
    from onnx import numpy_helper

    callback = QuantizationAwareTraining(flow="pt2e", backend="x86", export=("onnx",), export_dir=tmp_path / "files")
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    record = callback.export_records["onnx"]
    assert record.path.name == "model_int8.onnx"
    graph = onnx.load(record.path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch: any size
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) >= 2 and all(constants[n.input[2]].dtype.name == "uint8" for n in quantize)
    step = max(flows.output_steps(callback.quantized_model))
    x = torch.cat([b[0] for b in model.val_dataloader()])
    for batch in (1, 5):
        with torch.inference_mode():
            expected = callback.quantized_model(x[:batch])
        reloaded = _reload_in_fresh_process(record.path, x[:batch], "x86", tmp_path)
        assert max_abs_diff(expected, reloaded) <= 4 * step
    assert record.max_abs_diff <= 4 * step


def test_onnx_graph_has_a_dynamic_batch_axis(exported):
    import onnx

    callback, _ = exported
    graph = onnx.load(callback.export_paths["onnx"]).graph
    batch_dims = [value.type.tensor_type.shape.dim[0] for value in (*graph.input, *graph.output)]
    assert [d.dim_param for d in batch_dims] == ["batch", "batch"] and not any(d.dim_value for d in batch_dims)


class _TiedToBatch(torch.nn.Module):
    """Reshapes with the example's batch size baked in: a traced file then fails on other batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        rows = int(x.shape[0])  # a Python int: tracing records the example's 16 as a constant
        return self.fc(x).reshape(rows, 2)


def _int8_for(model: torch.nn.Module):
    from lightning_quant import quantize

    int8 = quantize(model, [torch.randn(16, 4) for _ in range(2)], flow="eager", progress=False)
    return lambda engine: int8


def test_export_fails_loudly_and_writes_nothing_when_a_file_is_tied_to_the_example_batch(tmp_path):
    from lightning_quant.export import ExportCheckError, export_int8
    from lightning_quant.quantization.inputs import ExampleInputs

    (tmp_path / "model_int8.pt").write_bytes(b"previous good file")
    with pytest.raises(ExportCheckError, match=r"the torchscript file fails on a batch of 1 \(the example has 16\)"):
        export_int8(
            _int8_for(_TiedToBatch()),
            [ExportTarget.TORCHSCRIPT],
            tmp_path,
            ExampleInputs((torch.randn(16, 4),)),
            Backend.X86,
        )
    assert visible_files(tmp_path) == ["model_int8.pt"]
    assert (tmp_path / "model_int8.pt").read_bytes() == b"previous good file"


def test_export_set_is_all_or_nothing_when_one_target_fails_its_check(tmp_path, monkeypatch):
    from lightning_quant import export
    from lightning_quant.quantization.inputs import ExampleInputs

    old = {tmp_path / "model_int8.pt": b"old pt", tmp_path / "model_int8.ptl": b"old ptl"}
    for path, data in old.items():
        path.write_bytes(data)
    monkeypatch.setitem(export.RELOAD_STEPS, ExportTarget.MOBILE, -1.0)  # the mobile file "disagrees"
    int8_for = _int8_for(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    with pytest.raises(export.ExportCheckError, match=r"the reloaded mobile file differs from the int8 model by 0"):
        export.export_int8(
            int8_for,
            [ExportTarget.TORCHSCRIPT, ExportTarget.MOBILE],
            tmp_path,
            ExampleInputs((torch.randn(8, 4),)),
            Backend.X86,
        )
    assert {p: p.read_bytes() for p in old} == old  # the torchscript file that passed was not written either
    assert visible_files(tmp_path) == ["model_int8.pt", "model_int8.ptl"]


def test_full_disk_during_export_raises_cleanly_and_keeps_the_previous_set(tmp_path, monkeypatch):
    import errno

    from lightning_quant.export import export_int8
    from lightning_quant.quantization.inputs import ExampleInputs
    from lightning_quant.utils import files

    (tmp_path / "model_int8.pt").write_bytes(b"old pt")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write", full)
    with pytest.raises(OSError, match="No space left on device"):
        export_int8(
            _int8_for(torch.nn.Sequential(torch.nn.Linear(4, 2))),
            [ExportTarget.TORCHSCRIPT, ExportTarget.ONNX],
            tmp_path,
            ExampleInputs((torch.randn(8, 4),)),
            Backend.X86,
        )
    # the file of an older release was taken into a set of its own first; the failed set left nothing
    assert visible_files(tmp_path) == ["model_int8.pt"]
    assert (tmp_path / "model_int8.pt").read_bytes() == b"old pt"
    assert len(list((tmp_path / ".model_int8.sets").iterdir())) == 1


def test_each_written_program_is_timed_where_it_is_served_and_a_changed_file_is_refused(exported, tmp_path):
    from lightning_quant.evaluation.metrics import file_latency_ms
    from lightning_quant.export import file_runner

    callback, _ = exported
    example = callback.example_inputs
    times = file_latency_ms(callback.export_paths, callback.quantized_model, example, "x86", (1, 16), 3, 1)
    assert set(times) == {"torchscript", "mobile", "onnx"}
    assert all(set(t) == {"1", "16"} and min(t.values()) > 0 for t in times.values())
    # the loaded file computes what the int8 model does
    run = file_runner("onnx", callback.export_paths["onnx"], "x86")
    with torch.no_grad(), quantized_engine("x86"):
        expected = callback.quantized_model(*example.args)
    assert max_abs_diff(expected, run(example)) < 0.05
    # a copy with one byte changed no longer matches the set's manifest: refused before any loader sees it
    original = Path(callback.export_paths["torchscript"])
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(CorruptFileError, match="differs from what was written"):
        tampered = original.resolve()
        saved = tampered.read_bytes()
        try:
            tampered.write_bytes(bytes(data))
            file_runner("torchscript", original, "x86")
        finally:
            tampered.write_bytes(saved)
    assert file_runner("state_dict", tmp_path / "absent.pt", "x86") is None  # weights, not a program


def test_torchscript_files_carry_no_debug_records_and_load_as_torch_wrote_them(exported):
    import io
    import zipfile

    from lightning_quant.export import COMPACT_STORED_BYTES, compact_torchscript

    callback, _ = exported
    written = Path(callback.export_paths["torchscript"]).read_bytes()
    names = zipfile.ZipFile(io.BytesIO(written)).namelist()
    assert names and not [n for n in names if n.endswith(".debug_pkl")]
    # a larger model: its weights stay stored, the rest is deflated; the archive loads and computes the same
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    compact = compact_torchscript(buffer.getvalue())
    assert len(compact) < len(buffer.getvalue())
    methods = {i.filename: (i.compress_type, i.file_size) for i in zipfile.ZipFile(io.BytesIO(compact)).infolist()}
    assert all((kind == zipfile.ZIP_STORED) == (size >= COMPACT_STORED_BYTES) for kind, size in methods.values())
    x = torch.randn(3, 256)
    assert torch.equal(torch.jit.load(io.BytesIO(compact))(x), model(x))


class _GreyToRGBNet(torch.nn.Module):
    """A grey image repeated into three channels for a conv/BN/ReLU, pooled, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x.repeat(1, 3, 1, 1)), 1))


def _aoti_fit(net, tmp_path):
    from lightning_quant import PostTrainingQuantization, Pt2eRecipe

    callback = PostTrainingQuantization(Pt2eRecipe("x86"), export=("pt2", "aoti"), export_dir=tmp_path, progress=False)
    model = BoringClassifier(net)
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    return callback, model


requires_torchao_here = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="pt2e needs torchao")


@requires_torchao_here
def test_aoti_package_holds_inductors_int8_kernels_and_agrees_in_a_fresh_process(tmp_path):
    import io
    import zipfile

    from lightning_quant.export import ExportFailedError
    from lightning_quant.utils.timing import has_int8_dot_product

    if has_int8_dot_product() is False:  # Inductor's x86 int8 kernels are written for VNNI/AMX (see test_contract)
        with pytest.raises(ExportFailedError, match="differs from the int8 model"):
            _aoti_fit(_GreyToRGBNet(), tmp_path)
        return
    callback, model = _aoti_fit(_GreyToRGBNet(), tmp_path)
    record = callback.export_records["aoti"]
    assert record.path.name == "model_int8_aoti.pt2" and record.path.is_file()
    # compiled without gradients and with freezing: Inductor's int8 convolution, not a dequantized float one
    package = zipfile.ZipFile(io.BytesIO(record.path.read_bytes()))
    wrapper = "".join(package.read(n).decode(errors="ignore") for n in package.namelist() if n.endswith(".cpp"))
    assert "qconv" in wrapper and "aoti_torch_cpu_convolution(" not in wrapper
    # no line tables: the debug sections Inductor adds for profilers were most of a small model's package
    (library,) = [package.read(n) for n in package.namelist() if n.endswith(".so")]
    assert library.startswith(b"\x7fELF") and b".debug_line" not in library and b".debug_info" not in library
    step = max(flows.output_steps(callback.quantized_model))
    for batch in (1, 5):
        x = torch.cat([b[0] for b in model.val_dataloader()])[:batch]
        with torch.inference_mode():
            expected = callback.quantized_model(x)
        assert max_abs_diff(expected, _reload_in_fresh_process(record.path, x, "x86", tmp_path)) <= 4 * step
    assert record.max_abs_diff <= 4 * step


@requires_torchao_here
def test_an_aoti_package_that_computes_something_else_is_never_written(tmp_path):
    """torch 2.13's Inductor, with a dynamic batch, compiles a one-channel int8 convolution whose int8 output is read
    by the next layer into a package that reads that output in the wrong memory order (torch.compile with
    dynamic=True fails there on a stride assertion). The reload check catches it before any file is written."""
    from lightning_quant.export import ExportFailedError

    with pytest.raises(ExportFailedError, match=r"the reloaded aoti file differs from the int8 model by"):
        _aoti_fit(TinyNet(), tmp_path)
    assert visible_files(tmp_path) == []


def test_torchscript_by_tracing_keeps_a_dict_output():
    """A forward TorchScript cannot script (``*args``) that returns a dict (a ``ModelOutput``): traced, its
    output keeps its keys."""
    from lightning_quant.export import to_torchscript
    from lightning_quant.quantization.inputs import ExampleInputs

    class DictOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, *args):
            return {"logits": self.fc(args[0]), "hidden": args[0]}

    model, x = DictOut().eval(), torch.randn(3, 4)
    scripted = to_torchscript(model, ExampleInputs((x,)))
    out = scripted(x)
    assert set(out) == {"logits", "hidden"} and torch.allclose(out["logits"], model(x)["logits"])


def test_a_target_that_fails_is_named_with_the_targets_that_would_be_kept(monkeypatch):
    from lightning_quant import export
    from lightning_quant.export import ExportFailedError, serialized
    from lightning_quant.quantization.inputs import ExampleInputs

    def failing(*args):
        raise RuntimeError("no such operator")

    monkeypatch.setitem(export._SERIALIZERS, ExportTarget.ONNX, failing)
    model = torch.nn.Linear(4, 2).eval()
    targets = (ExportTarget.TORCHSCRIPT, ExportTarget.ONNX)
    with pytest.raises(
        ExportFailedError,
        match=r"export 'onnx' failed: RuntimeError: no such operator. Drop 'onnx' from export= "
        r"\(keeping \['torchscript'\]\)",
    ):
        serialized(lambda engine: model, targets, ExampleInputs((torch.randn(3, 4),)), Backend.X86, compare=False)
