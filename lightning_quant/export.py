"""Write int8 models for servers (TorchScript), phones (lite interpreter) and ONNX runtimes.

Each model is serialized in memory, loaded back from those bytes and run on the example inputs
and on a batch of another size; the largest difference from the in-process int8 model is
recorded, and one beyond a few quantization steps of the model fails the export.
Only when every target has passed are the files written, as one set
(:func:`lightning_quant.utils.files.write_file_set`): into a fresh folder with a manifest of each
file's SHA-256 (``model_int8.manifest.json``), then switched to with one rename. A failed check, a
full disk or a killed process leaves the previous set of files exactly as it was; the next export
removes what a killed one left. :func:`verify_export` checks a set against its manifest.

Targets and engines:

- ``torchscript``: the model converted for the callback's backend (x86/fbgemm on servers);
- ``mobile``: a copy converted for qnnpack (ARM), saved for the lite interpreter (``.ptl``);
  ``optimize_for_mobile`` runs when this torch build has XNNPACK, and is skipped with a log
  line when it does not (the CPU wheels of torch 2.13 do not);
- ``onnx``: legacy TorchScript-based ONNX export with QuantizeLinear/DequantizeLinear pairs, a
  dynamic batch axis on every input and output and a dynamic sequence axis on token inputs
  (needs ``pip install onnx``; checked with onnxruntime when that is installed); signed activations
  are written as int8 with zero point 0 and outputs left float, the form OpenVINO runs fastest
  (:mod:`lightning_quant.onnx_graph`);
- ``pt2`` (pt2e flow): the converted program saved with ``torch.export.save``, dynamic batch
  (and sequence) axes; the reload check runs an x86 one compiled (``torch.compile`` with freezing,
  how it is served: Inductor turns its quantize/dequantize pairs into int8 kernels) and an
  xnnpack one as saved (Inductor's int8 lowering takes uint8 activations only);
- ``executorch`` (pt2e flow, xnnpack backend): an ExecuTorch program (``.pte``) with every
  quantized op delegated to XNNPACK, taking batches of 1 to ``EXECUTORCH_MAX_BATCH`` (its memory is
  planned ahead for that bound); the reload check runs it in ExecuTorch's runtime. A torchao model
  (dynamic schemes, xnnpack backend) lowers the same way;
- ``state_dict`` and ``safetensors`` (torchao flow): the int8 model's state dict with torchao's
  tensor subclasses, written by ``torch.save`` (loaded with ``weights_only=True``) or as safetensors
  with torchao's metadata; the check loads it into the float structure and must match bit for bit;
- ``hf`` (torchao flow, a ``transformers`` model): the folder ``model_int8_hf/`` that
  ``AutoModelForCausalLM.from_pretrained`` (and vLLM's ``--quantization torchao``) loads: ``config.json`` with
  the ``quantization_config`` of what each layer holds (``TorchAoConfig`` of a torchao ``FqnToConfig``),
  ``model.safetensors`` with torchao's tensors, the generation config and the tokenizer files of the folder the
  model was loaded from; the check loads the folder with ``from_pretrained`` and must match bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.onnx_graph import rewrite_for_serving
from lightning_quant.quantization import flows
from lightning_quant.quantization.config import Backend, ExportTarget, pt2e_engine
from lightning_quant.quantization.convert import compiled_runner, quantized_engine
from lightning_quant.quantization.inputs import ExampleInputs, as_positional, export_program, forward_signature
from lightning_quant.quantization.outputs import flat_tensors, max_abs_diff
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.checks import require_module
from lightning_quant.utils.files import MANIFEST, check_writable_folder, set_folders, write_file_set
from lightning_quant.utils.integrity import CorruptFileError, read_checked
from lightning_quant.utils.tensors import largest_abs

log = logging.getLogger(__name__)

SUFFIXES = {
    ExportTarget.TORCHSCRIPT: ".pt",
    ExportTarget.MOBILE: ".ptl",
    ExportTarget.ONNX: ".onnx",
    ExportTarget.PT2: ".pt2",
    ExportTarget.EXECUTORCH: ".pte",
    ExportTarget.STATE_DICT: "_state_dict.pt",
    ExportTarget.SAFETENSORS: ".safetensors",
    ExportTarget.HF: "_hf",
    ExportTarget.AOTI: "_aoti.pt2",
}

#: the largest batch (and token sequence) an ExecuTorch file takes: its runtime plans memory for it
EXECUTORCH_MAX_BATCH = 64
EXECUTORCH_MAX_SEQUENCE = 512

#: how far a reloaded file may differ from the in-process model, in quantization steps (the
#: largest output scale of the model's int8 layers). TorchScript runs the same kernels (identical
#: in practice); the lite interpreter and ONNX runtimes may round a requantization the other way,
#: and an error can carry through a layer or two. A file that computes something else (a layer
#: frozen in training mode, a batch size baked in) is off by far more.
#: Compiled pt2 programs fuse and reorder float arithmetic around the int8 ops, ExecuTorch's
#: XNNPACK kernels requantize in their own order: both get the ONNX allowance.
#: torchao's weights files load into the same modules and kernels: bit-identical or refused.
RELOAD_STEPS = {
    ExportTarget.TORCHSCRIPT: 2.0,
    ExportTarget.MOBILE: 2.0,
    ExportTarget.ONNX: 4.0,
    ExportTarget.PT2: 4.0,
    ExportTarget.EXECUTORCH: 4.0,
    ExportTarget.STATE_DICT: 0.0,
    ExportTarget.SAFETENSORS: 0.0,
    ExportTarget.HF: 0.0,
    ExportTarget.AOTI: 4.0,
}


class ExportCheckError(RuntimeError):
    """A reloaded file computes something other than the in-process int8 model: nothing was written."""


@dataclass
class ExportRecord:
    """One exported file and how closely its reloaded output matches the in-process int8 model."""

    target: ExportTarget
    path: Path
    engine: str
    max_abs_diff: float


def engine_for(target: ExportTarget, backend: Backend) -> str:
    """The quantized engine a target's file is converted for (pt2e files use none of torch's)."""
    if target in (
        ExportTarget.PT2,
        ExportTarget.EXECUTORCH,
        ExportTarget.STATE_DICT,
        ExportTarget.SAFETENSORS,
        ExportTarget.HF,
        ExportTarget.AOTI,
    ):
        return pt2e_engine()
    if backend is Backend.XNNPACK:  # a pt2e program's ONNX file: xnnpack is not one of torch's engines
        return pt2e_engine()
    return Backend.QNNPACK.value if target is ExportTarget.MOBILE else backend.value


def to_torchscript(model: nn.Module, example: ExampleInputs) -> torch.jit.ScriptModule:
    """Script ``model``; trace it on ``example`` where scripting fails (eager models with ``*args``) or
    gives a module that cannot be saved (an FX graph's ``extra=None`` input scripts as a Tensor whose
    default is undefined)."""
    with known_torch_warnings_silenced():
        try:
            scripted = torch.jit.script(model)
            undefined = [
                a.name
                for a in scripted.forward.schema.arguments  # type: ignore[attr-defined]
                if a.has_default_value() and a.default_value is None and str(a.type) == "Tensor"
            ]
            if undefined:  # a Tensor input whose default is None: saving the module would fail
                raise TypeError(f"inputs {undefined} script as Tensor with an undefined default")
            return scripted
        except Exception as script_error:  # TorchScript rejects many Python constructs
            log.info("torch.jit.script failed (%s); tracing on the example inputs instead", type(script_error).__name__)
            # strict=False: a dict output (a Hugging Face ModelOutput) is kept, its keys those of this call
            if example.kwargs:
                return torch.jit.trace(model, example_kwarg_inputs=example.kwargs, check_trace=False, strict=False)
            return torch.jit.trace(model, example.args, check_trace=False, strict=False)


Loaded = Callable[[ExampleInputs], Any]


def _torchscript_bytes(
    model: nn.Module, example: ExampleInputs, backend: Backend
) -> tuple[bytes, Callable[[bytes], Loaded]]:
    scripted = to_torchscript(model, example)
    buffer = io.BytesIO()
    with known_torch_warnings_silenced():
        torch.jit.save(scripted, buffer)
    return compact_torchscript(buffer.getvalue()), _load_torchscript


#: records of a TorchScript archive at least this large (the weights) are kept as torch stored them
COMPACT_STORED_BYTES = 64 * 1024


def compact_torchscript(data: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` records and with its small records deflated.

    The debug records map the file's code back to the Python source lines it was scripted from. They are used only
    in the message of an error raised inside the file. The small records are the code, the constants, and each
    layer's per-channel scales, zero points and float bias. Together these were about 4% of a 1M-parameter CNN's
    int8 file (3.86x smaller than fp32; 3.96x without them). Records of ``COMPACT_STORED_BYTES`` or more, the int8
    weights, are stored as torch wrote them. ``torch.jit.load`` reads the result as it reads torch's own file; the
    export check reloads exactly these bytes.
    """
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as compact:
        for info in source.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue
            body = source.read(info)
            method = zipfile.ZIP_STORED if len(body) >= COMPACT_STORED_BYTES else zipfile.ZIP_DEFLATED
            compact.writestr(info.filename, body, compress_type=method)
    return out.getvalue()


def _load_torchscript(data: bytes) -> Loaded:
    with known_torch_warnings_silenced():
        loaded = torch.jit.load(io.BytesIO(data))
    return lambda inputs: inputs(loaded)


def _mobile_bytes(
    model: nn.Module, example: ExampleInputs, backend: Backend
) -> tuple[bytes, Callable[[bytes], Loaded]]:
    scripted = to_torchscript(model, example)
    if torch._C._is_xnnpack_enabled():
        from torch.utils.mobile_optimizer import optimize_for_mobile

        scripted = optimize_for_mobile(scripted)
    else:
        log.info("this torch build has no XNNPACK: the lite-interpreter file is saved without optimize_for_mobile")
    with known_torch_warnings_silenced():
        data = scripted._save_to_buffer_for_lite_interpreter()
    return bytes(data), _load_mobile


def _load_mobile(data: bytes) -> Loaded:
    from torch.jit.mobile import _load_for_lite_interpreter

    with known_torch_warnings_silenced():
        loaded = _load_for_lite_interpreter(io.BytesIO(data))
    return lambda inputs: inputs(loaded)


def _onnx_axes(model: nn.Module, example: ExampleInputs) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input and output names, and dynamic axes: batch everywhere, sequence on token inputs."""
    parameters = list(forward_signature(model).parameters)
    values = [*example.args, *example.kwargs.values()]
    names = [*parameters[: len(example.args)], *example.kwargs.keys()]
    names = [n if n not in ("args", "kwargs") else f"input_{i}" for i, n in enumerate(names)]
    axes: dict[str, dict[int, str]] = {}
    for name, value in zip(names, values):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            axes[name] = {0: "batch"}
            if not value.is_floating_point() and value.dim() >= 2:
                axes[name][1] = "sequence"
    with torch.inference_mode():
        outputs = flat_tensors(example(model))
    output_names = [f"output_{i}" for i in range(len(outputs))]
    for name, out in zip(output_names, outputs):
        if out.dim() > 0:
            axes[name] = {0: "batch"}
    return names, output_names, axes


def _onnx_bytes(
    model: nn.Module, example: ExampleInputs, backend: Backend
) -> tuple[bytes, Callable[[bytes], Loaded] | None]:
    require_module("onnx", "onnx", 'export="onnx"')
    import onnx

    spec = flows.spec_of_model(model)
    if spec is not None and spec.int8_file == "program":
        proto = _onnx_of_program(model, example)
    else:
        input_names, output_names, axes = _onnx_axes(model, example)
        buffer = io.BytesIO()
        with known_torch_warnings_silenced():
            torch.onnx.export(
                model,
                example.args,
                buffer,  # type: ignore[arg-type]  # the legacy exporter writes to file-like objects too
                kwargs=example.kwargs or None,
                dynamo=False,
                opset_version=17,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
            )
        proto = onnx.load_from_string(buffer.getvalue())
    for line in rewrite_for_serving(proto, flows.activation_codes(model)):
        log.debug("ONNX file: %s", line)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.info("onnxruntime is not installed: the ONNX file is checked with onnx.checker only")
        return data, None
    return data, _load_onnx


def _onnx_of_program(model: nn.Module, example: ExampleInputs) -> Any:
    """A pt2e program as ONNX: ``torch.export`` with dynamic batch (and sequence) axes, written by torch.onnx's
    dynamo exporter, whose quantize/dequantize nodes become QuantizeLinear/DequantizeLinear pairs with the
    program's scales (what OpenVINO and ONNX Runtime run as their own int8)."""
    require_module("onnxscript", "onnxscript", 'export="onnx" of a pt2e program')
    _, output_names, _ = _onnx_axes(model, example)  # outputs named as in the fx flow's file (output_0, ...)
    program = export_program(model, example)
    with known_torch_warnings_silenced(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        onnx_program = torch.onnx.export(program, dynamo=True, output_names=output_names, verbose=False, report=False)
    assert onnx_program is not None, "torch.onnx.export(dynamo=True) returns the program it wrote"
    return onnx_program.model_proto


def _load_onnx(data: bytes) -> Loaded:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(inputs: ExampleInputs) -> Any:
        values = [*inputs.args, *inputs.kwargs.values()]
        feeds = {inp.name: v.numpy() for inp, v in zip(session.get_inputs(), values)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return run


def _pt2_bytes(model: nn.Module, example: ExampleInputs, backend: Backend) -> tuple[bytes, Callable[[bytes], Loaded]]:
    """Inductor's int8 lowering takes programs whose int8 steps are quantize/dequantize nodes quantized for
    x86 (pt2e: uint8 activations), so those are checked compiled, as they are served; an xnnpack one
    (int8 activations) is checked as saved, uncompiled, and so is one whose int8 weights are tensor
    subclasses (torchao), whose kernels run uncompiled too."""
    graph_flow = flows.capable(flows.flow_of(model), flows.MapsBoundaries)
    compile_check = backend is Backend.X86 and graph_flow is not None and flows.served_by(model) == "compiled"
    program = export_program(model, example)
    buffer = io.BytesIO()
    with known_torch_warnings_silenced():
        torch.export.save(program, buffer)

    def load(data: bytes) -> Loaded:
        with known_torch_warnings_silenced():
            loaded = torch.export.load(io.BytesIO(data)).module()
        return _pt2_served(loaded, compile_check)

    return buffer.getvalue(), load


def _pt2_served(loaded: nn.Module, compiled: bool) -> Loaded:
    if compiled:
        return compiled_runner(loaded)
    return lambda inputs: inputs(loaded)


def _aoti_bytes(model: nn.Module, example: ExampleInputs, backend: Backend) -> tuple[bytes, Callable[[bytes], Loaded]]:
    """The program compiled ahead of time by Inductor into a package (``aoti_compile_and_package``): a shared
    library with Inductor's x86 int8 kernels and the frozen weights, dynamic batch (and sequence) axes.

    It is compiled without gradients and with freezing on: only then does Inductor fold the weights and replace the
    quantize/dequantize pairs around each convolution and linear layer by its int8 kernels (with gradients on it
    keeps them as float convolutions, slower than fp32). It is compiled without line tables (the ``-g1`` debug
    sections Inductor adds for profilers' stack traces), which were 1.2 MB of a 1M-parameter CNN's 2.6 MB package."""
    import tempfile

    import torch._inductor.config as inductor_config

    program = export_program(model, example)
    settings = {"freezing": True, "aot_inductor.enable_line_tables": False}
    with tempfile.TemporaryDirectory() as folder:
        with inductor_config.patch(settings), torch.no_grad(), known_torch_warnings_silenced():
            path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(folder, "model.pt2"))
        return Path(path).read_bytes(), _load_aoti


def _load_aoti(data: bytes) -> Loaded:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # the loader unpacks the library into a folder of its own
        path = Path(folder) / "model_aoti.pt2"
        path.write_bytes(data)
        with known_torch_warnings_silenced():
            loaded = torch._inductor.aoti_load_package(str(path))

    def run(inputs: ExampleInputs) -> Any:
        with torch.no_grad():
            return inputs(loaded)  # type: ignore[arg-type]  # a callable on the program's inputs

    return run


def _weights_bytes(
    target: ExportTarget,
) -> Callable[[nn.Module, ExampleInputs, Backend], tuple[bytes, Callable[[bytes], Loaded]]]:
    """torchao's weights (``state_dict``, ``safetensors``): checked by loading them into the float model's
    structure (a copy with plain zero weights), as a user loads them."""

    def serialize(
        model: nn.Module, example: ExampleInputs, backend: Backend
    ) -> tuple[bytes, Callable[[bytes], Loaded]]:
        writer = flows.capable(flows.flow_of(model), flows.WritesWeights)
        if writer is None:
            able = [spec.flow.value for spec in flows.SPECS.values() if spec.int8_file == "weights"]
            raise ValueError(
                f"export {target.value!r} writes models whose weights are their own files (flow={flows.spelled(able)})"
            )
        data = writer.weights_bytes(model, target)

        def load(data: bytes) -> Loaded:
            loaded = writer.load_weights(writer.float_skeleton(model), data, target)
            return lambda inputs: inputs(loaded)

        return data, load

    return serialize


def _executorch_bytes(
    model: nn.Module, example: ExampleInputs, backend: Backend
) -> tuple[bytes, Callable[[bytes], Loaded]]:
    require_module("executorch", "'lightning-quant[executorch]'", 'export="executorch"')
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if (example.batch_size or 0) > EXECUTORCH_MAX_BATCH:
        example = example.with_batch_size(EXECUTORCH_MAX_BATCH)
    program = export_program(model, example, EXECUTORCH_MAX_BATCH, EXECUTORCH_MAX_SEQUENCE)
    with known_torch_warnings_silenced():
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    in_spec = program.call_spec.in_spec
    return bytes(lowered.buffer), lambda data: _load_executorch(data, in_spec)


def _load_executorch(data: bytes, in_spec: Any = None) -> Loaded:
    """An ExecuTorch program run in its runtime; its inputs flattened by the exported program's ``in_spec``
    (a file read back without it takes its inputs by position)."""
    from executorch.runtime import Runtime

    # the method runs on memory its program (and the program's bytes) own: keep both alive with
    # it, or the runtime reads freed memory once they are collected (a crash, not an error)
    program = Runtime.get().load_program(data)
    method = program.load_method("forward")
    keep = (data, program)

    def run(inputs: ExampleInputs) -> Any:
        import torch.fx._pytree as fx_pytree

        assert keep
        flat = fx_pytree.tree_flatten_spec((inputs.args, inputs.kwargs), in_spec) if in_spec else inputs.args
        return list(method.execute(list(flat)))

    return run


def executorch_runner(model: nn.Module, example: ExampleInputs) -> Callable[[ExampleInputs], Any]:
    """``model`` (pt2e, xnnpack) lowered to an ExecuTorch program in memory and run in its runtime,
    as a phone runs the ``.pte`` file; batches of 1 to ``EXECUTORCH_MAX_BATCH``."""
    data, load = _executorch_bytes(model, example, Backend.XNNPACK)
    return load(data)


#: tokenizer files copied into an ``hf`` folder from the folder the model was loaded from
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def hf_quantization_config(model: nn.Module, path: str = "") -> Any:
    """The ``transformers.TorchAoConfig`` of the submodule at ``path`` of a converted torchao model: each quantized
    layer by name with the torchao config it was converted with (``FqnToConfig``), embeddings included when one
    is quantized.

    Raises:
        ValueError: the model holds no torchao weights (another flow, or not converted).
    """
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    writer = flows.capable(flows.flow_of(model), flows.WritesHuggingFace)
    configs = writer.layer_configs(model) if writer is not None else {}
    if path:
        configs = {name[len(path) + 1 :]: c for name, c in configs.items() if name.startswith(f"{path}.")}
        model = model.get_submodule(path)
    if not configs:
        able = [spec.flow.value for spec in flows.SPECS.values() if ExportTarget.HF in spec.exports]
        raise ValueError(
            f"export 'hf' writes converted models of flow={flows.spelled(able)} (torchao's tensors, which transformers "
            "loads); this model holds none"
        )
    modules = dict(model.named_modules())
    embeddings = any(isinstance(modules[name], nn.Embedding) for name in configs)
    return TorchAoConfig(quant_type=FqnToConfig(configs), include_input_output_embeddings=embeddings)


def hf_model_path(model: nn.Module) -> str:
    """Where the ``transformers.PreTrainedModel`` of ``model`` is: ``""`` (itself) or the attribute path of the one
    outermost model it holds (a LightningModule's ``self.model``).

    Raises:
        ValueError: no PreTrainedModel in ``model``, or several side by side (``module=`` picks one).
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return ""
    found = [name for name, module in model.named_modules() if isinstance(module, PreTrainedModel)]
    outermost = [name for name in found if not any(name.startswith(f"{other}.") for other in found)]
    if len(outermost) != 1:
        held = f"holds {len(outermost)} ({outermost[:4]})" if outermost else "holds none"
        raise ValueError(
            f"export 'hf' writes a Hugging Face model folder: the quantized {type(model).__name__} is no transformers "
            f"PreTrainedModel and {held}; set module= to the attribute of the model to write (module='model')"
        )
    return outermost[0]


def with_submodule(model: nn.Module, path: str, replacement: nn.Module) -> nn.Module:
    """``model`` with ``replacement`` at ``path``: shallow copies along the path, ``model`` itself untouched."""
    if not path:
        return replacement
    head, _, rest = path.partition(".")
    outer = copy.copy(model)
    outer._modules = dict(model._modules)
    outer._modules[head] = with_submodule(model.get_submodule(head), rest, replacement)
    return outer


def _hf_files(model: nn.Module, example: ExampleInputs, backend: Backend) -> tuple[dict[str, bytes], Any]:
    """The files of a Hugging Face folder of ``model`` (a ``transformers.PreTrainedModel`` holding torchao
    weights), and how to load them back as a user does (``from_pretrained`` of the folder)."""
    import tempfile

    require_module("transformers", "transformers", "export 'hf'")
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    outer, path = model, hf_model_path(model)
    pretrained: Any = outer.get_submodule(path)  # a transformers PreTrainedModel
    quantization = hf_quantization_config(outer, path)
    saved = copy.copy(pretrained)  # the same layers, its own config and quantizer: the user's model is not touched
    saved.config = copy.deepcopy(pretrained.config)
    saved.config.quantization_config = quantization
    output_embeddings = pretrained.get_output_embeddings()
    if output_embeddings is not None and output_embeddings.weight is not pretrained.get_input_embeddings().weight:
        # two tensors (a tied lm_head quantized apart from its embedding, or never tied): the folder says so
        saved.config.tie_word_embeddings = False
    saved.hf_quantizer = TorchAoHfQuantizer(quantization)
    # serialised in memory on every rank (the rehearsal before training runs on each): transformers writes on rank 0
    # only when a process group exists; which rank writes the files is the callbacks' business
    saved.should_save_on_this_rank = lambda is_main_process: True
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as folder, known_torch_warnings_silenced():
        saved.save_pretrained(folder, safe_serialization=True)
        for written in sorted(Path(folder).iterdir()):
            files[written.name] = written.read_bytes()
    source = Path(str(getattr(pretrained.config, "_name_or_path", "") or ""))
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and name not in files:
                files[name] = (source / name).read_bytes()

    def load(data: dict[str, bytes]) -> Loaded:
        with tempfile.TemporaryDirectory() as folder, known_torch_warnings_silenced():
            for name, content in data.items():
                (Path(folder) / name).write_bytes(content)
            loaded = type(pretrained).from_pretrained(folder).eval()
        return lambda inputs: inputs(with_submodule(outer, path, loaded))

    return files, load


_SERIALIZERS: dict[ExportTarget, Callable[..., tuple[Any, Any]]] = {
    ExportTarget.TORCHSCRIPT: _torchscript_bytes,
    ExportTarget.MOBILE: _mobile_bytes,
    ExportTarget.ONNX: _onnx_bytes,
    ExportTarget.PT2: _pt2_bytes,
    ExportTarget.EXECUTORCH: _executorch_bytes,
    ExportTarget.STATE_DICT: _weights_bytes(ExportTarget.STATE_DICT),
    ExportTarget.SAFETENSORS: _weights_bytes(ExportTarget.SAFETENSORS),
    ExportTarget.HF: _hf_files,
    ExportTarget.AOTI: _aoti_bytes,
}

#: targets whose file is a folder of files (``{name: bytes}``), written as ``<basename><suffix>/<name>``
FOLDER_TARGETS = (ExportTarget.HF,)


#: targets whose file takes the model's keyword inputs as keywords (the others take them by position)
KEYWORD_TARGETS = (ExportTarget.PT2, ExportTarget.HF, ExportTarget.AOTI)

#: how a program file is loaded back from its bytes (a ``.pt2`` is loaded by ``load_pt2``), and the package a
#: target's runtime needs beyond torch
_FILE_LOADERS: dict[ExportTarget, Callable[[bytes], Loaded]] = {
    ExportTarget.TORCHSCRIPT: _load_torchscript,
    ExportTarget.MOBILE: _load_mobile,
    ExportTarget.ONNX: _load_onnx,
    ExportTarget.EXECUTORCH: _load_executorch,
    ExportTarget.AOTI: _load_aoti,
}
_RUNTIMES = {ExportTarget.ONNX: "onnxruntime", ExportTarget.EXECUTORCH: "executorch"}

#: the targets whose file is a program a server runs (the others hold weights for the model's own code)
SERVED_TARGETS = (ExportTarget.PT2, *_FILE_LOADERS)


def file_runner(target: ExportTarget | str, path: os.PathLike | str, backend: Backend | str) -> Loaded | None:
    """A written file loaded the way it is served, as a callable on :class:`ExampleInputs`: TorchScript by
    ``torch.jit.load``, the lite-interpreter file by its loader, ONNX in ONNX Runtime, a ``.pt2`` by
    :func:`~lightning_quant.load_pt2` (an x86 program compiled, as served), a ``.pte`` in ExecuTorch's runtime.
    ``None`` where the file holds weights (``state_dict``, ``safetensors``, ``hf``) or its runtime is not installed.

    Each file is read once and checked against its set's manifest before its loader sees it.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: the file differs from its manifest, or is empty or damaged.
    """
    target, backend = ExportTarget(target), Backend(backend)
    if target not in SERVED_TARGETS:
        return None
    if target is ExportTarget.PT2:
        from lightning_quant.quantization.flows.pt2e import load_pt2

        loaded = load_pt2(path)
        compiled = backend is Backend.X86 and flows.served_by(loaded) == "compiled"
        return _pt2_served(loaded, compiled)
    if target in _RUNTIMES and importlib.util.find_spec(_RUNTIMES[target]) is None:
        return None
    zipped = target in (ExportTarget.TORCHSCRIPT, ExportTarget.AOTI)
    return _FILE_LOADERS[target](read_checked(path, f"{target.value} file", zip_format=zipped))


def other_batch_size(example: ExampleInputs) -> int:
    """A batch size other than the example's, to show a file is not tied to it (1 when possible)."""
    size = example.batch_size
    return 2 if size in (None, 1) else 1


def quantization_step(model: nn.Module, output: Any) -> float:
    """The coarsest output step of the model's int8 layers (their ``scale``); for a model without
    any (weight-only/dynamic), a millionth of the largest output."""
    scales = flows.output_steps(model, output)
    return max([*scales, 1e-6 * largest_abs(output), 1e-8])


def reload_difference(
    target: ExportTarget, model: nn.Module, run: Loaded, example: ExampleInputs, engine: str
) -> float:
    """The largest difference between ``run`` (a reloaded file) and ``model`` over the example and
    another batch size.

    Raises:
        ExportCheckError: the reloaded file fails on the other batch size, or differs by more than
            ``RELOAD_STEPS`` quantization steps.
    """
    worst = 0.0
    for inputs in (example, example.with_batch_size(other_batch_size(example))):
        with quantized_engine(engine), torch.inference_mode():
            try:
                expected = inputs(model)
            except Exception as err:  # the model itself takes only the example's batch size
                if inputs is example:
                    raise
                log.info(
                    "the int8 model fails on a batch of %s (%s): checked at the example's size only",
                    inputs.batch_size,
                    err,
                )
                continue
            try:
                reloaded = run(inputs)
            except Exception as err:
                raise ExportCheckError(
                    f"the {target.value} file fails on a batch of {inputs.batch_size} (the example has "
                    f"{example.batch_size}): {type(err).__name__}: {' '.join(str(err).split())[:300]}"
                ) from err
        diff = max_abs_diff(expected, reloaded)
        step = quantization_step(model, expected)
        tolerance = RELOAD_STEPS[target] * step
        if not diff <= tolerance:
            raise ExportCheckError(
                f"the reloaded {target.value} file differs from the int8 model by {diff:.4g} on a batch of "
                f"{inputs.batch_size} (tolerance {tolerance:.4g}: {RELOAD_STEPS[target]:g} quantization steps of "
                f"{step:.4g}); nothing was written"
            )
        worst = max(worst, diff)
    return worst


class ExportFailedError(RuntimeError):
    """An export target could not serialise the int8 model, or its file did not reload as the model; the
    message names the target and what to do. Nothing of the export set was written."""

    def __init__(self, target: ExportTarget, message: str) -> None:
        super().__init__(message)
        self.target = target


def serialized(
    int8_for_engine: Callable[[str], nn.Module],
    targets: Iterable[ExportTarget],
    example: ExampleInputs,
    backend: Backend,
    compare: bool = True,
) -> dict[ExportTarget, tuple[str, bytes | dict[str, bytes], float]]:
    """Each target's file as bytes, checked by reloading it: ``{target: (engine, data, reload max |diff|)}``
    (a folder target's data: ``{file name: bytes}``).
    Writes nothing: :func:`export_int8` writes what this gives, and the callbacks rehearse it before
    training on the untrained model, with ``compare=False``: each file is reloaded but not run (running a
    ``.pt2`` compiles it, which the export at the end does).

    Raises:
        ExportFailedError: a target could not serialise the model, or its file disagrees when reloaded.
    """
    example = example.to("cpu")
    out: dict[ExportTarget, tuple[str, bytes | dict[str, bytes], float]] = {}
    for target in targets:
        engine = engine_for(target, backend)
        model = int8_for_engine(engine)
        # a .pt2 program keeps the model's calling convention (keyword inputs of a Hugging Face model
        # stay keywords); TorchScript, ONNX and ExecuTorch's flat inputs take positions
        inputs = example if target in KEYWORD_TARGETS else as_positional(model, example)
        try:
            with quantized_engine(engine):
                data, load = _SERIALIZERS[target](model, inputs, backend)
            if load is not None and compare:
                diff = reload_difference(target, model, load(data), inputs, engine)
            else:
                diff = float("nan")
                if load is not None:
                    load(data)
        except (ModuleNotFoundError, ExportCheckError):
            raise
        except Exception as err:
            first = " ".join(str(err).split())[:400]
            others = [t.value for t in targets if t is not target]
            raise ExportFailedError(
                target,
                f"export {target.value!r} failed: {type(err).__name__}: {first}. Drop {target.value!r} from "
                f"export={f' (keeping {others})' if others else ''}, or make that construct of the model "
                "serialisable",
            ) from err
        out[target] = (engine, data, diff)
    return out


def export_int8(
    int8_for_engine: Callable[[str], nn.Module],
    targets: Iterable[ExportTarget],
    directory: os.PathLike | str,
    example: ExampleInputs,
    backend: Backend,
    basename: str = "model_int8",
) -> dict[str, ExportRecord]:
    """Export the int8 model to each target, all-or-nothing; returns ``{target: ExportRecord}``.

    Args:
        int8_for_engine: gives the int8 model converted for an engine name (called once per engine).
        targets: the export targets.
        directory: destination folder (created if missing).
        example: inputs used to check each reloaded file against the in-process model.
        backend: the backend of the run; decides the engine of TorchScript and ONNX files.
        basename: file name stem; ``model_int8`` gives ``model_int8.pt``, ``model_int8.ptl``...

    The set is written whole or not at all, even when the process is killed (see the module's
    docstring); ``<basename>.manifest.json`` lists each file with its SHA-256.

    Raises:
        ExportFailedError: a target could not serialise the model, or a reloaded file disagrees with the
            in-process model (nothing is written).
        OSError: the files could not be written (nothing is changed).
    """
    directory = check_writable_folder(directory, "export_dir")
    staged: dict[str, bytes] = {}
    details: dict[str, dict[str, Any]] = {}
    records: dict[str, ExportRecord] = {}
    for target, (engine, data, diff) in serialized(int8_for_engine, targets, example, backend).items():
        name = f"{basename}{SUFFIXES[target]}"
        detail = {"target": target.value, "engine": engine, "reload_max_abs_diff": diff}
        if isinstance(data, dict):  # a folder: each of its files is one of the set's
            for inner, content in data.items():
                staged[f"{name}/{inner}"] = content
                details[f"{name}/{inner}"] = detail
        else:
            staged[name] = data
            details[name] = detail
        records[target.value] = ExportRecord(target, directory / name, engine, diff)
    write_file_set(directory, basename, staged, details, family=[f"{basename}{suffix}" for suffix in SUFFIXES.values()])
    for record in records.values():
        log.info(
            "exported %s (%s engine) for %s; reloaded output max |diff| = %.3g",
            record.target.value,
            record.engine,
            record.path,
            record.max_abs_diff,
        )
    return records


def verify_export(directory: os.PathLike | str, basename: str = "model_int8") -> dict[str, Any]:
    """Check every file of the export set in ``directory`` against its manifest; returns the manifest.

    Run it before serving files with another runtime (ONNX Runtime, ExecuTorch, a TorchScript server):
    :func:`~lightning_quant.load_int8` and :func:`~lightning_quant.load_pt2` check their file themselves.

    Raises:
        FileNotFoundError: ``directory`` holds no export set of ``basename``, or a file of it is missing.
        CorruptFileError: a file differs from the size and SHA-256 its manifest records.
    """
    import json

    directory = Path(directory)
    _, current = set_folders(directory, basename)
    manifest_path = current / MANIFEST
    if not manifest_path.is_file():
        manifest_path = directory / f"{basename}.{MANIFEST}"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no export set named {basename!r} (no manifest)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        names = list(manifest["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(manifest_path, f"is not a readable manifest: {err}") from None
    for name in names:
        read_checked(directory / name, f"file of the export set {basename!r}")
    return manifest
