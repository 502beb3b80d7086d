"""The pt2e flow: ``torch.export`` the model, then torchao's ``prepare_pt2e``/``prepare_qat_pt2e``
and ``convert_pt2e`` with a backend quantizer.

- ``backend="x86"``: torchao's ``X86InductorQuantizer`` (uint8 activations, int8 per-channel
  weights), with attention's score product and embeddings' rows in int8 too (:mod:`.x86`); the
  converted model runs int8 kernels once ``torch.compile`` lowers it;
- ``backend="xnnpack"``: ExecuTorch's ``XNNPACKQuantizer`` (int8 symmetric weights); the
  converted model lowers to XNNPACK in an ExecuTorch program (``export="executorch"``).

The model is captured with a dynamic batch axis on every tensor input (and a dynamic sequence
axis on integer inputs), from a batch of at least two, so the prepared model takes any batch
size; a model whose code fixes the batch size is refused at prepare, before any training.

The package keeps its concerns apart: :mod:`.graph` (capture and the mode-following graph module),
:mod:`.quantizers` (the backend quantizers with our observers and per-layer rules; :mod:`.x86` and
:mod:`.attention` the x86 one's parts beyond torchao's), :mod:`.repairs`
(what quantizers and conversion leave wrong, and state carried between captures), :mod:`.inspection`
(layers of a graph and their values) and :mod:`.compat` (torchao patches, feature-detected).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import traceback
import warnings
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from lightning_quant.quantization.config import Backend, Precision, QuantizationConfig
from lightning_quant.quantization.flows.pt2e.compat import import_pt2e, quicker_conv_bn_folding
from lightning_quant.quantization.flows.pt2e.graph import (
    COMPUTE,
    LOOKUPS,
    Pt2eExportError,
    Pt2eGraphModule,
    as_pt2e_module,
    capture,
    counts_batches,
    flat_inputs,
    linear_for_conv1d,
    pt2e_modules,
    quant_ops,
)
from lightning_quant.quantization.flows.pt2e.inspection import Recorder, layer_end, layer_name
from lightning_quant.quantization.flows.pt2e.quantizers import build_quantizer, quantizer_classes
from lightning_quant.quantization.flows.pt2e.repairs import (
    drop_unused_tensors,
    prepare_with_call_sites_apart,
    restore_integer_constants,
    state_names,
)
from lightning_quant.quantization.flows.spec import SPECS
from lightning_quant.quantization.flows.torch_ao_quantization import (
    convert_with_trained_qparams,
    fake_quantize_in_float32,
)
from lightning_quant.quantization.inputs import ExampleInputs, forward_signature, inference_inputs
from lightning_quant.quantization.layers import resolve_layers
from lightning_quant.quantization.options import Flow
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.integrity import check_pt2_archive, read_checked
from lightning_quant.utils.timing import has_int8_dot_product

__all__ = ["PT2E_PRECISIONS", "Pt2eExportError", "Pt2eFlow", "Pt2eGraphModule", "capture", "import_pt2e", "load_pt2"]

log = logging.getLogger(__name__)
_aten = torch.ops.aten

#: QAT for x86 on a CPU without VNNI/AMX: measured on an AVX2-only AMD EPYC, the trained program compiled as it
#: is served computed outputs many quantization steps from the int8 model, and the export check refused the file
NO_INT8_DOT_PRODUCT = (
    "this CPU has no VNNI or AMX int8 instructions: on such a CPU (an AVX2-only AMD EPYC), QAT models of "
    "Pt2eRecipe('x86') compiled as they are served were measured many quantization steps away from the int8 model, "
    "and the export check refuses such a .pt2 at the end of fit (quantized_model and checkpoints are kept). Train "
    "and export on a CPU with VNNI or AMX, or use FxRecipe('x86') (TorchScript) or Pt2eRecipe('xnnpack') (ExecuTorch)"
)

#: what pt2e layers may compute in
PT2E_PRECISIONS = (Precision.INT8, Precision.FLOAT)


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """Load a ``.pt2`` file the pt2e flow wrote, as a module that follows ``eval()``.

    Its quantize/dequantize ops are torchao's, so they are registered first (plain
    ``torch.export.load`` fails on them in a process that never imported torchao). Serve an x86
    program compiled: ``torch.compile(module)`` under ``torch._inductor.config.freezing=True``.

    The file is read once and checked before torch sees it: against its export set's manifest (SHA-256),
    its zip checksums, and for any part that would run code (pickled objects, compiled code): only data
    is loaded (:func:`~lightning_quant.utils.integrity.check_pt2_archive`).

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: the file is empty, truncated, damaged or differs from its manifest.
        UnsafeFileError: a part of the file would run code when loaded; nothing of it ran.
    """
    data = read_checked(path, ".pt2 program (torch.export.save)", zip_format=True)
    import_pt2e()  # torchao's ops, and its tensor classes registered as safe for the weights-only reader
    check_pt2_archive(data, path)
    with known_torch_warnings_silenced():
        module = torch.export.load(io.BytesIO(data)).module()
    module.meta[Pt2eGraphModule.META] = {"converted": True}
    return as_pt2e_module(module, False)


class Pt2eFlow:
    """Quantize through ``torch.export`` and torchao's pt2e (see the module docstring)."""

    stack = "torchao.quantization.pt2e"
    spec = SPECS[Flow.PT2E]

    def check(self, config: QuantizationConfig) -> None:
        """Raises ``ValueError`` on per-layer settings pt2e cannot honour."""
        for key, setting in config.layers:
            if setting.precision not in PT2E_PRECISIONS:
                raise ValueError(
                    f"layers[{key!r}] asks for {setting.precision.value!r}, which flow='pt2e' cannot run; "
                    f"its precisions are {[p.value for p in PT2E_PRECISIONS]}"
                )
            if setting.dtype is not None:
                raise ValueError(
                    f"layers[{key!r}] sets dtype={setting.dtype!r}: with flow='pt2e' the backend quantizer picks "
                    "the dtypes (x86: uint8 activations; xnnpack: int8); leave dtype out"
                )

    def prepare(self, model: nn.Module, config: QuantizationConfig, example: ExampleInputs, qat: bool) -> nn.Module:
        self.check(config)
        import_pt2e()
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

        linear_for_conv1d(model)
        quantizer = (
            config.recipe
            if config.recipe is not None
            else build_quantizer(model, config, resolve_layers(model, config), qat)
        )
        if qat and config.backend == Backend.X86 and has_int8_dot_product() is False:
            warnings.warn(NO_INT8_DOT_PRODUCT, stacklevel=2)
        model.train(qat)
        inference = inference_inputs(forward_signature(model), example)
        if not qat:  # a post-training model is captured as it is called for a prediction
            example = inference

        def prepared_graph(call: ExampleInputs) -> torch.fx.GraphModule:
            graph_module = capture(model, call)
            with known_torch_warnings_silenced(), quicker_conv_bn_folding():
                try:
                    prepare = prepare_qat_pt2e if qat else prepare_pt2e
                    graph = prepare_with_call_sites_apart(prepare, graph_module, quantizer)
                except (IndexError, KeyError, AttributeError, AssertionError, TypeError, ValueError) as err:
                    # the quantizer's own failure on a pattern of this graph (two of torchao 0.18's
                    # X86InductorQuantizer are repaired before: see capture and prepare_with_call_sites_apart):
                    # say whose, where, and the ways out
                    frame = traceback.extract_tb(err.__traceback__)[-1]
                    raise Pt2eExportError(
                        f"{type(quantizer).__name__} failed annotating the graph of {type(model).__name__} "
                        f"({type(err).__name__}: {err or 'no message'}, in {frame.name} of "
                        f"{os.path.basename(frame.filename)}): the quantizer cannot handle a pattern of this model. "
                        "For Linear-heavy models (transformers) use TorchaoRecipe('int8_dyn_int8_weight') or "
                        "DynamicRecipe(); or keep the layers around the failing pattern float (layers={name: 'float'})"
                    ) from err
            restore_integer_constants(graph)
            fake_quantize_in_float32(graph, quantizer_classes()[0])
            return graph

        prepared = prepared_graph(example)
        # the class it was captured from (source_class): a causal LM's metric shifts its labels
        prepared.meta[Pt2eGraphModule.META] = {"backend": config.backend.value, "source": type(model).__name__}
        prepared = as_pt2e_module(prepared, qat)
        if inference is not example:
            # QAT trains the graph of the training call (labels in, loss out); the int8 model is the graph
            # of the prediction call, given the trained state at conversion (see inference_view)
            prediction = as_pt2e_module(prepared_graph(inference), qat)
            names = state_names(prepared, prediction, example, inference)
            prepared.meta[Pt2eGraphModule.META]["inference"] = (prediction, names)
        if qat and config.recipe is not None and not self.fake_quantizers(prepared):
            raise ValueError(
                f"recipe={type(quantizer).__name__}(...) put observers, not fake quantization, into the graph: QAT "
                "needs a quantizer configured for QAT, e.g. quantizer.set_global("
                "get_default_x86_inductor_quantization_config(is_qat=True))"
            )
        if not (self.fake_quantizers(prepared) or self.observers(prepared)):
            import torchao

            raise Pt2eExportError(
                f"the {type(quantizer).__name__} annotated no layer of {type(model).__name__}: nothing would be "
                f"quantized and the 'int8' model would be the float one. Either every layer is kept float "
                f"(skip/layers), or this torch ({torch.__version__}) and torchao ({torchao.__version__}) do not work "
                "together: lightning-quant's pt2e flow is tested with torch 2.13-2.15 and torchao 0.18"
            )
        return prepared

    def inference_view(self, prepared: nn.Module) -> nn.Module:
        """The graph of the prediction call with ``prepared``'s trained state, where QAT trained the graph of
        a call with training-only inputs (labels); else ``prepared`` itself."""
        meta: dict[str, Any] = (
            prepared.meta.get(Pt2eGraphModule.META, {}) if isinstance(prepared, Pt2eGraphModule) else {}
        )
        if "inference" not in meta:
            return prepared
        graph, names = meta["inference"]
        view = copy.deepcopy(graph)
        state = prepared.state_dict()
        view.load_state_dict({key: state[source] for key, source in names.items()})
        view.meta[Pt2eGraphModule.META] = {k: v for k, v in meta.items() if k != "inference"}
        first = next(iter(state.values()), None)
        return view.to(first.device if isinstance(first, torch.Tensor) else "cpu").train(prepared.training)

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        assert isinstance(prepared, Pt2eGraphModule), "the pt2e flow converts what it prepared"
        prepared = self.inference_view(prepared)
        assert isinstance(prepared, Pt2eGraphModule)
        prepared.eval()
        convert_with_trained_qparams(prepared, quantizer_classes()[0])
        with known_torch_warnings_silenced(), quicker_conv_bn_folding():
            converted = convert_pt2e(prepared)
        for node in [n for n in converted.graph.nodes if n.op == "call_function" and n.target is _aten.add_.Tensor]:
            if counts_batches(node) and not node.users:  # an int8 model counts no batches
                converted.graph.erase_node(node)
        converted.recompile()
        drop_unused_tensors(converted)
        backend = prepared.meta.get(Pt2eGraphModule.META, {}).get("backend", Backend.X86.value)
        source = prepared.meta.get(Pt2eGraphModule.META, {}).get("source", type(prepared).__name__)
        converted.meta[Pt2eGraphModule.META] = {"converted": True, "backend": backend, "source": source}
        return as_pt2e_module(converted, False)

    def owns(self, model: nn.Module) -> bool:
        return any(True for _ in pt2e_modules(model))

    def source_class(self, model: nn.Module) -> str:
        state = model.meta.get(Pt2eGraphModule.META, {}) if isinstance(model, Pt2eGraphModule) else {}
        return str(state.get("source", type(model).__name__))

    def served_by(self, model: nn.Module) -> str:
        """x86 programs: Inductor lowers their quantize/dequantize pairs to int8 kernels. xnnpack ones
        (int8 activations) run in ExecuTorch; Inductor's int8 lowering takes uint8 activations only.
        Uncompiled, either runs its quantize/dequantize pairs in float, slower than fp32."""
        state = model.meta.get(Pt2eGraphModule.META, {}) if isinstance(model, Pt2eGraphModule) else {}
        if not state.get("converted"):
            return "eager"
        return "compiled" if state.get("backend", Backend.X86.value) == Backend.X86.value else "executorch"

    def fake_quantizers(self, model: nn.Module) -> list[tuple[str, Any]]:
        fake, _ = quantizer_classes()
        return [(name, m) for name, m in model.named_modules() if isinstance(m, fake)]

    def observers(self, model: nn.Module) -> list[tuple[str, Any]]:
        _, observer = quantizer_classes()
        return [(name, m) for name, m in model.named_modules() if isinstance(m, observer)]

    def optional_observers(self, model: nn.Module) -> list[str]:
        return []  # every observer of a graph sits on a path the graph runs

    def is_histogram(self, observer: nn.Module) -> bool:
        from torchao.quantization.pt2e.observer import HistogramObserver

        return isinstance(observer, HistogramObserver)

    def set_bn_frozen(self, model: nn.Module, frozen: bool) -> None:
        """Batch-norm nodes of the graph use their running statistics and stop updating them."""
        for module in pt2e_modules(model):
            module.set_bn_frozen(frozen)

    def int8_layers(self, model: nn.Module) -> dict[str, str]:
        """Every compute node (conv, linear) of a converted graph: ``int8`` when its input and weight
        come through dequantize nodes, else ``float``; and every embedding lookup: ``int8`` when its weight
        does (weight-only: it reads indices)."""
        layers: dict[str, str] = {}
        for module in pt2e_modules(model):
            if not module.meta.get(Pt2eGraphModule.META, {}).get("converted"):
                continue
            _, dequantize = quant_ops()
            for node in module.graph.nodes:
                if node.op != "call_function" or node.target not in (*COMPUTE, *LOOKUPS):
                    continue
                name = layer_name(node)
                if name is None:
                    continue
                # a layer's input and weight; a lookup's weight only (its input is indices)
                reads = 1 if node.target in LOOKUPS else 2
                inputs = [a for a in node.args[:reads] if isinstance(a, torch.fx.Node)]
                quantized = len(inputs) == reads and all(
                    a.op == "call_function" and a.target in dequantize for a in inputs
                )
                layers[name] = "int8" if quantized else layers.get(name, "float")
        return layers

    def output_steps(self, model: nn.Module, output: Any = None) -> list[float]:
        quantize, _ = quant_ops()
        steps = []
        for module in pt2e_modules(model):
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target in quantize and isinstance(node.args[1], float):
                    steps.append(float(node.args[1]))
        return steps

    def boundaries(self, model: nn.Module) -> dict[str, Any]:
        """The converted graph's quantize and dequantize nodes and the aten ops between, before
        ``torch.compile`` lowers it: Inductor folds the pairs around an int8 conv/linear and the ops
        fused into its output (an activation, a pooling or add that goes straight to quantize) into
        int8 kernels, so those are not counted as float; an op between a dequantize and a float
        consumer stays a pass in float. An embedding's int8 rows are part of its lookup (weight-only, as
        torch.ao's int8 embedding module holds them), not a boundary: what follows a lookup is float as before."""
        from lightning_quant.quantization.flows.common import graph_boundaries

        quantize, dequantize = quant_ops()

        def boundary(node: torch.fx.Node) -> bool:
            return (
                node.op == "call_function"
                and node.target in dequantize
                and not (node.users and all(u.target in LOOKUPS for u in node.users))
            )

        def lowered(node: torch.fx.Node) -> bool:
            if node.target in COMPUTE:
                return True
            return bool(node.users) and all(u.op == "call_function" and u.target in quantize for u in node.users)

        totals: dict[str, Any] = {}
        for module in pt2e_modules(model):
            if not module.meta.get(Pt2eGraphModule.META, {}).get("converted"):
                continue
            found = graph_boundaries(
                module.graph,
                lambda node: node.op == "call_function" and node.target in quantize,
                boundary,
                lambda node: str(getattr(node.target, "__name__", node.target)).split(".")[0],
                lowered,
            )
            totals["quantize"] = totals.get("quantize", 0) + found["quantize"]
            totals["dequantize"] = totals.get("dequantize", 0) + found["dequantize"]
            float_ops = totals.setdefault("float_ops", {})
            for kind, count in found["float_ops"].items():
                float_ops[kind] = float_ops.get(kind, 0) + count
        return totals

    def layer_outputs(self, model: nn.Module, inputs: ExampleInputs, names: list[str]) -> dict[str, tuple[Any, Any]]:
        """``(input, output)`` of each named layer: the value entering its compute node, and the value
        at its end (after bias, batch norm and activation, where the next quantization happens)."""
        assert isinstance(model, Pt2eGraphModule)
        wanted: dict[torch.fx.Node, tuple[str, str]] = {}
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in (*COMPUTE, *LOOKUPS):
                name = layer_name(node)
                if name in names and (name, "out") not in wanted.values():
                    lookup = node.target in LOOKUPS  # its input is the indices, its output the rows it read
                    source = node.args[1 if lookup else 0]
                    if isinstance(source, torch.fx.Node):
                        wanted.setdefault(source, (name, "in"))
                    wanted[node if lookup else layer_end(node)] = (name, "out")
        recorder = Recorder(model, wanted)
        recorder.run(*flat_inputs(model, inputs))
        result = {}
        for name in names:
            if (name, "out") in recorder.values:
                result[name] = ((recorder.values.get((name, "in")),), recorder.values[(name, "out")])
        return result
