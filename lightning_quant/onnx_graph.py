"""The ONNX file in the form int8 runtimes run fastest.

torch's exporter writes each int8 activation of a torch.ao model as ``QuantizeLinear -> Cast ->
DequantizeLinear`` with the model's uint8 scale and zero point. OpenVINO builds its int8 kernels from those
pairs, and two of their forms cost it time that NNCF's own int8 files do not spend (the perf CNN of
``make bench`` at batch 1, one thread: 0.217 ms as exported, 0.184 ms with both rewrites, against 0.180 ms for
NNCF's int8 of the same model). :func:`rewrite_for_serving` rewrites both, and one form of attention:

- **signed inputs become int8 with zero point 0.** A uint8 pair with zero point ``z`` on a graph input (a
  tensor with negative values: the normalised image of a CNN) becomes an int8 pair with zero point 0 and the
  same scale.
  Code ``q`` becomes ``q - z``: the same real value, for every code the model was calibrated to. It is done
  only where that holds: torch.ao's x86/fbgemm activations are calibrated to the codes 0..127 (its
  ``reduce_range``), which int8 holds for any ``z`` of 0..127; a zero point of 128 maps every uint8 code. A
  ``Clip`` in front keeps the model's lowest value (code 0); above the calibrated codes the file clips at
  ``127 + z`` where the in-process model clips at 255. OpenVINO runs a convolution on symmetric int8 input
  without the zero-point correction an asymmetric one needs. Activations inside the model stay uint8: on
  ResNet-18, whose residual adds read a signed convolution output and an unsigned ReLU output, int8 ones made
  ONNX Runtime run the blocks in float (3.2x slower) and OpenVINO no faster;
- **outputs stay float.** The pair in front of a graph output becomes a ``Clip`` to the range the pair held,
  so the last layer's result is returned as it is computed, clipped where the model clips it, instead of
  rounded to the output's uint8 grid (at most half an output step from the in-process model); the runtimes
  fold the scale and the clip into the last layer.

- **attention's softmax feeds its second matmul directly where the guard between them cannot act.** torch.onnx's
  dynamo exporter writes ``scaled_dot_product_attention`` with a boolean mask (Hugging Face's models pass one)
  as a bias of 0 or the lowest finite float, then guards the softmax weights ``w`` with
  ``Where(IsNaN(w), 0, w)``. With a finite bias, no weight is NaN unless the scores themselves are (an
  overflow, which the in-process model does not survive either), so the guard changes nothing; but it keeps
  OpenVINO from fusing the attention into one kernel (MiniLM of ``make bench``, batch 1, two threads: 1.79 ms
  with it, 1.63 ms without, against 1.69 ms for NNCF's int8). It is dropped only where the scores are one
  ``MatMul`` plus at most a bias built of finite constants; a bias that may hold ``-inf`` keeps its guard.

- **the file holds the int8 weights, their scales and the graph, little else.** A constant the exporter casts
  where it is read (a pt2e program's per-channel zero points, int64 in the program, int8 where read) is stored in
  the type it is read in; a weight's zero point of 0 everywhere is left out (what an absent one means, and the
  form NNCF writes); the nodes' metadata (the exporter's record of each node's Python stack and module path) is
  left out. all-MiniLM-L6-v2's file, its word embeddings in int8 rows, went from 23.8 MB to 22.97 MB (3.96x
  smaller than fp32), with the same values bit for bit and the same program in OpenVINO.

Each rewrite keeps the graph's tensor types consistent (a rewritten tensor's ``value_info`` says int8) and
touches only pairs whose every use it can see: a pair another node reads is left as it is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # onnx is an optional package, imported where a file is written
    import onnx

#: the uint8 codes assumed calibrated when the int8 model did not record them: all of them
ALL_CODES = (0, 255)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:  # the exporter passes initializers on so
            values[node.output[0]] = values[node.input[0]]
    return values


def _drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Remove the constants (nodes and initializers) that no node reads any more, as the runtimes would, with a
    warning each."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unused = [n for n in graph.node if n.op_type in ("Constant", "Identity") and n.output[0] not in read]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


class _Graph:
    """Producers and consumers of the graph's tensors, and its constants."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.values = _constants(graph)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}

    def scalar(self, name: str) -> np.ndarray | None:
        value = self.values.get(name)
        return value if value is not None and value.size == 1 else None


def _signed_to_int8(g: _Graph, codes: tuple[int, int]) -> list[str]:
    import onnx
    from onnx import helper

    lowest, highest = codes
    inputs = {i.name for i in g.graph.input}
    done = []
    for q in [n for n in g.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        if q.input[0] not in inputs:
            continue  # an activation inside the model: see the module's docstring
        scale, zero_point = g.scalar(q.input[1]), g.scalar(q.input[2])
        if scale is None or zero_point is None or zero_point.dtype != np.uint8:
            continue
        z = int(zero_point.reshape(()))
        if z == 0 or not (z - 128 <= lowest and highest <= z + 127):
            continue  # unsigned already, or int8 cannot hold every calibrated code
        casts, dequantizes, seen = [], [], True
        for user in g.consumers[q.output[0]]:
            if user.op_type == "Cast" and _cast_to(user) == onnx.TensorProto.UINT8:
                casts.append(user)
                dequantizes += g.consumers[user.output[0]]
                seen &= user.output[0] not in g.outputs and bool(g.consumers[user.output[0]])
            else:
                dequantizes.append(user)
        seen &= bool(dequantizes) and q.output[0] not in g.outputs
        for dq in dequantizes:
            dq_scale = g.scalar(dq.input[1]) if dq.op_type == "DequantizeLinear" and len(dq.input) == 3 else None
            dq_zero = g.scalar(dq.input[2]) if dq_scale is not None else None
            seen &= (
                dq_scale is not None
                and dq_zero is not None
                and dq_zero.dtype == np.uint8
                and int(dq_zero.reshape(())) == z
                and float(dq_scale.reshape(())) == float(scale.reshape(()))
            )
        if not seen:
            continue
        name = f"{q.output[0]}_int8_zero_point"
        g.graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.INT8, list(zero_point.shape), [0]))
        _clip_below(g, q, -z * float(scale.reshape(())))
        q.input[2] = name
        for dq in dequantizes:
            dq.input[2] = name
        retyped = {q.output[0]}
        for cast in casts:
            for attribute in cast.attribute:
                if attribute.name == "to":
                    attribute.i = onnx.TensorProto.INT8
            retyped.add(cast.output[0])
        for info in g.graph.value_info:
            if info.name in retyped:
                info.type.tensor_type.elem_type = onnx.TensorProto.INT8
        done.append(f"{q.output[0]}: uint8 zero point {z} -> int8 zero point 0")
    return done


def _float_constant(g: _Graph, name: str, value: float) -> str:
    """Add a float scalar initializer named ``name``; returns the name."""
    import onnx
    from onnx import helper

    g.graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))
    return name


def _clip_below(g: _Graph, node: onnx.NodeProto, lowest: float) -> None:
    """Clip what ``node`` reads first from below at ``lowest``, where the int8 model clips it."""
    from onnx import helper

    source = node.input[0]
    clipped = f"{source}_clipped"
    clip = helper.make_node("Clip", [source, _float_constant(g, f"{source}_clip_min", lowest)], [clipped], name=clipped)
    g.graph.node.insert(list(g.graph.node).index(node), clip)
    node.input[0] = clipped


def _float_outputs(g: _Graph) -> list[str]:
    from onnx import helper

    done = []
    for output in g.graph.output:
        dq = g.producer.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear" or g.consumers[output.name]:
            continue
        chain = [dq]
        node = g.producer.get(dq.input[0])
        if node is not None and node.op_type == "Cast":
            chain.append(node)
            node = g.producer.get(node.input[0])
        if node is None or node.op_type != "QuantizeLinear":
            continue
        chain.append(node)
        # the pair is the output's alone, and what it rounds is computed by a node (not a graph input)
        if any(len(g.consumers[n.output[0]]) != 1 for n in chain[1:]) or node.input[0] in g.outputs:
            continue
        source = g.producer.get(node.input[0])
        if source is None:
            continue
        scale, zero_point = g.scalar(node.input[1]), g.scalar(node.input[2]) if len(node.input) == 3 else None
        if scale is None or zero_point is None or zero_point.dtype not in (np.uint8, np.int8):
            continue
        z, step = int(zero_point.reshape(())), float(scale.reshape(()))
        low, high = (0, 255) if zero_point.dtype == np.uint8 else (-128, 127)
        computed = f"{output.name}_unclipped"
        for other in g.consumers[node.input[0]]:  # other readers of the result read it as before: unclipped
            if other is not node:
                for i, name in enumerate(other.input):
                    if name == node.input[0]:
                        other.input[i] = computed
        source.output[list(source.output).index(node.input[0])] = computed
        for n in chain:
            g.graph.node.remove(n)
        clip_names = [
            _float_constant(g, f"{output.name}_clip_{bound}", (code - z) * step)
            for bound, code in (("min", low), ("max", high))
        ]
        g.graph.node.append(helper.make_node("Clip", [computed, *clip_names], [output.name], name=output.name))
        removed = {n.output[0] for n in chain[1:]} | {node.input[0]}
        kept = [info for info in g.graph.value_info if info.name not in removed]
        del g.graph.value_info[:]
        g.graph.value_info.extend(kept)
        done.append(f"{output.name}: float, clipped to its int8 range but not rounded to its grid")
    return done


def _finite(g: _Graph, name: str) -> bool:
    """Whether every value of tensor ``name`` is finite for any input: a finite float constant, or a ``Where`` (or
    a reshaping of one) that picks between finite ones."""
    value = g.values.get(name)
    if value is not None:
        return value.dtype.kind == "f" and bool(np.isfinite(value).all())
    node = g.producer.get(name)
    if node is None:
        return False
    if node.op_type == "Where":
        return _finite(g, node.input[1]) and _finite(g, node.input[2])
    if node.op_type in ("Expand", "Reshape", "Unsqueeze", "Squeeze"):
        return _finite(g, node.input[0])
    return False


def _unguarded_attention(g: _Graph) -> list[str]:
    done = []
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        weights = softmax.output[0]
        users = g.consumers[weights]
        isnan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next((u for u in users if u.op_type == "Where"), None)
        if isnan is None or where is None or len(users) != 2 or weights in g.outputs:
            continue
        zero = g.values.get(where.input[1])
        guard = (
            list(where.input) == [isnan.output[0], where.input[1], weights]
            and [u.name for u in g.consumers[isnan.output[0]]] == [where.name]
            and isnan.output[0] not in g.outputs
            and zero is not None
            and zero.size == 1
            and float(zero.reshape(())) == 0.0
        )
        scores = g.producer.get(softmax.input[0])
        if scores is not None and scores.op_type == "Add":
            products = [name for name in scores.input if getattr(g.producer.get(name), "op_type", "") == "MatMul"]
            masked = len(products) == 1 and all(_finite(g, name) for name in scores.input if name != products[0])
        else:
            masked = scores is not None and scores.op_type == "MatMul"
        if not (guard and masked) or where.output[0] in g.outputs:
            continue
        for user in g.consumers[where.output[0]]:
            for i, name in enumerate(user.input):
                if name == where.output[0]:
                    user.input[i] = weights
        g.graph.node.remove(isnan)
        g.graph.node.remove(where)
        done.append(f"{softmax.name}: the NaN guard on its weights is dropped (its mask is finite)")
    return done


def _folded_casts(g: _Graph) -> list[str]:
    """Each ``Cast`` of a constant replaced by an initializer in the cast's type. torch's exporter writes a
    per-channel zero point of a pt2e program (int64 in the program) as an int64 initializer cast to int8 where
    it is read: 8 bytes a row where 1 is read (244 KB of all-MiniLM-L6-v2's ONNX file, for its word embeddings)."""
    import onnx
    from onnx import helper, numpy_helper

    done = []
    for cast in [n for n in g.graph.node if n.op_type == "Cast" and n.input[0] in g.values]:
        to = _cast_to(cast)
        if to is None or cast.output[0] in g.outputs:
            continue
        value = g.values[cast.input[0]]
        typed = value.astype(helper.tensor_dtype_to_np_dtype(to))
        if not np.array_equal(typed.astype(value.dtype), value):
            continue  # the cast changes values (a float truncated, an integer wrapped): the runtime's to do
        g.graph.initializer.append(numpy_helper.from_array(typed, cast.output[0]))
        g.graph.node.remove(cast)
        source = onnx.TensorProto.DataType.Name(helper.np_dtype_to_tensor_dtype(value.dtype))
        done.append(f"{cast.input[0]}: {source} -> {onnx.TensorProto.DataType.Name(to)} initializer")
    return done


def _symmetric_weights(g: _Graph) -> list[str]:
    """Drop the zero point of each int8 weight's ``DequantizeLinear`` where it is 0 everywhere (symmetric
    weights: every pt2e/x86 and fx weight), which is what an absent one means: one byte an output channel or
    embedding row, and the form NNCF writes its weights in."""
    done = []
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3]:
        weight, zero_point = g.values.get(dq.input[0]), g.values.get(dq.input[2])
        if weight is None or zero_point is None or weight.dtype != np.int8 or zero_point.dtype != np.int8:
            continue
        if np.any(zero_point):
            continue
        del dq.input[2]
        done.append(f"{dq.input[0]}: zero point 0 left out")
    return done


def _without_node_metadata(graph: onnx.GraphProto) -> list[str]:
    """Drop the nodes' ``metadata_props``: torch's dynamo exporter records each node's Python stack, module path
    and FX node there (600 KB of all-MiniLM-L6-v2's 23 MB ONNX file); no runtime reads them."""
    kept = 0
    for node in graph.node:
        kept += len(node.metadata_props)
        del node.metadata_props[:]
    return [f"{kept} node metadata entries dropped"] if kept else []


def rewrite_for_serving(model: onnx.ModelProto, codes: tuple[int, int] | None = None) -> list[str]:
    """Rewrite ``model``'s quantize/dequantize pairs in place (see the module's docstring); one line per rewrite.

    ``codes``: the uint8 codes (lowest, highest) the model's activations were calibrated to
    (:func:`lightning_quant.quantization.flows.activation_codes`); ``None`` assumes all of them, so only zero
    points of 128 become int8.
    """
    graph = model.graph
    done = _float_outputs(_Graph(graph))
    done += _signed_to_int8(_Graph(graph), codes or ALL_CODES)
    done += _unguarded_attention(_Graph(graph))
    done += _folded_casts(_Graph(graph))
    done += _symmetric_weights(_Graph(graph))
    if done:
        _drop_unused_constants(graph)
    return done + _without_node_metadata(graph)
