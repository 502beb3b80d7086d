"""The ONNX file's serving rewrites: int8 signed activations that decode to the same values, float outputs."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from lightning_quant import QuantizationAwareTraining
from lightning_quant.onnx_graph import rewrite_for_serving
from lightning_quant.quantization import ExampleInputs, QuantizationConfig, convert_copy, flows, get_flow
from lightning_quant.quantization.convert import quantized_engine
from tests.helpers import BoringClassifier, quiet_trainer

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

SCALE = 0.05


def _pair_graph(zero_point: int, tail: str = "Abs", dq_scale: float = SCALE, inner: bool = False) -> onnx.ModelProto:
    """x -> QuantizeLinear(uint8) -> Cast -> DequantizeLinear -> ``tail`` -> y, as torch's exporter writes a pair
    (``inner``: the pair quantizes ``Neg(x)``, an activation inside the model, not the graph's input)."""
    nodes = [helper.make_node("Neg", ["x"], ["xn"])] if inner else []
    nodes += [
        helper.make_node("Constant", [], ["s"], value=helper.make_tensor("s", TensorProto.FLOAT, [], [SCALE])),
        helper.make_node("Constant", [], ["z"], value=helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])),
        helper.make_node("Identity", ["s"], ["s2"]),
        helper.make_node("QuantizeLinear", ["xn" if inner else "x", "s", "z"], ["q"]),
        helper.make_node("Cast", ["q"], ["c"], to=TensorProto.UINT8),
    ]
    if dq_scale != SCALE:
        nodes.append(
            helper.make_node(
                "Constant", [], ["s2b"], value=helper.make_tensor("s2b", TensorProto.FLOAT, [], [dq_scale])
            )
        )
    nodes += [
        helper.make_node("DequantizeLinear", ["c", "s2" if dq_scale == SCALE else "s2b", "z"], ["d"]),
        helper.make_node(tail, ["d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        value_info=[helper.make_tensor_value_info("q", TensorProto.UINT8, [None, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _codes_input(zero_point: int, codes: list[int]) -> np.ndarray:
    """Inputs that quantize to ``codes`` (uint8, zero point ``zero_point``)."""
    values = (np.array(codes, dtype=np.float32) - zero_point) * SCALE
    return values.reshape(-1, 4)


def _zero_point_of_quantize(model: onnx.ModelProto) -> tuple[int, int]:
    """(ONNX data type, value) of the first QuantizeLinear's zero point, an initializer or a Constant node."""
    from onnx import numpy_helper

    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    tensors = {i.name: i for i in model.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    tensor = tensors[q.input[2]]
    return tensor.data_type, int(numpy_helper.to_array(tensor))


def test_signed_pair_becomes_int8_zero_point_0_decoding_every_calibrated_code_exactly():
    model = _pair_graph(61)
    x = _codes_input(61, list(range(128)))  # every code a 0..127 calibration gives
    before = _run(model, x)
    rewritten = copy.deepcopy(model)
    assert rewrite_for_serving(rewritten, codes=(0, 127)) == ["q: uint8 zero point 61 -> int8 zero point 0"]
    assert _zero_point_of_quantize(rewritten) == (TensorProto.INT8, 0)
    np.testing.assert_array_equal(_run(rewritten, x), before)
    assert next(v for v in rewritten.graph.value_info if v.name == "q").type.tensor_type.elem_type == TensorProto.INT8
    # above the calibrated codes the file clips at 127 + z (the in-process model at 255): 188 here; below code 0
    # it clips where the model does
    beyond = _codes_input(61, [200, 255, 188, -40])
    np.testing.assert_allclose(_run(rewritten, beyond)[0], np.array([127, 127, 127, 61]) * SCALE, rtol=1e-6)
    np.testing.assert_allclose(_run(model, beyond)[0][3], 61 * SCALE, rtol=1e-6)


def test_zero_point_128_maps_every_uint8_code_and_others_need_the_calibrated_range():
    x = _codes_input(128, list(range(256)))
    model = _pair_graph(128)
    before = _run(model, x)
    assert rewrite_for_serving(model) == ["q: uint8 zero point 128 -> int8 zero point 0"]
    np.testing.assert_array_equal(_run(model, x), before)
    # codes not recorded (or a full 0..255 calibration): int8 cannot hold them all with zero point 61
    for codes in (None, (0, 255)):
        kept = _pair_graph(61)
        assert rewrite_for_serving(kept, codes=codes) == []
        assert _zero_point_of_quantize(kept) == (TensorProto.UINT8, 61)


def test_unsigned_pairs_inner_pairs_and_pairs_decoded_with_another_scale_are_kept():
    unsigned = _pair_graph(0)
    assert rewrite_for_serving(unsigned, codes=(0, 127)) == []
    other_scale = _pair_graph(61, dq_scale=0.1)
    assert rewrite_for_serving(other_scale, codes=(0, 127)) == []
    assert _zero_point_of_quantize(other_scale) == (TensorProto.UINT8, 61)
    # inside the model activations stay uint8 (ONNX Runtime runs a residual add of int8 and uint8 in float)
    inner = _pair_graph(61, inner=True)
    assert rewrite_for_serving(inner, codes=(0, 127)) == []
    assert _zero_point_of_quantize(inner) == (TensorProto.UINT8, 61)


def _rounded_output_graph(extra_reader: bool) -> onnx.ModelProto:
    """x @ w -> QuantizeLinear -> Cast -> DequantizeLinear -> y (and, if ``extra_reader``, the pair read again)."""
    w = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("QuantizeLinear", ["m", "s", "z"], ["q"]),
        helper.make_node("Cast", ["q"], ["c"], to=TensorProto.UINT8),
        helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])]
    if extra_reader:
        nodes.append(helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, 4]))
    graph = helper.make_graph(
        nodes,
        "out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        outputs,
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, [4, 4], w.ravel()),
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("z", TensorProto.UINT8, [], [0]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_pair_before_an_output_is_removed_so_the_output_is_the_unrounded_result():
    model = _rounded_output_graph(extra_reader=False)
    x = np.random.default_rng(0).uniform(0, 1, (3, 4)).astype(np.float32)
    rounded = _run(model, x)
    assert rewrite_for_serving(model) == ["y: float, clipped to its int8 range but not rounded to its grid"]
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Clip"]
    # uint8 with zero point 0 and scale 0.1 holds 0..25.5: the clip keeps that range
    exact = np.clip(x @ np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), 0, 25.5)
    out = _run(model, x)
    np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-6)
    assert (out < 0).sum() == 0 and (exact == 0).any()  # the clip is what it says: some results were negative
    assert 0 < np.abs(out - rounded).max() <= 0.05 + 1e-6  # within half a step of 0.1 of the rounded one
    assert {i.name for i in model.graph.initializer} == {"w", "y_clip_min", "y_clip_max"}
    shared = _rounded_output_graph(extra_reader=True)
    assert rewrite_for_serving(shared) == []
    assert len(shared.graph.node) == 5


def test_another_reader_of_the_rounded_result_still_reads_it_unclipped():
    model = _rounded_output_graph(extra_reader=False)
    model.graph.node.append(helper.make_node("Neg", ["m"], ["y3"]))  # reads the MatMul's result, not the pair
    model.graph.output.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, [None, 4]))
    x = np.random.default_rng(1).uniform(0, 1, (3, 4)).astype(np.float32)
    expected = -(x @ np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4))
    assert rewrite_for_serving(model) == ["y: float, clipped to its int8 range but not rounded to its grid"]
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y3 = session.run(None, {"x": x})
    np.testing.assert_allclose(y3, expected, rtol=1e-6, atol=1e-6)  # both signs: not clipped at the pair's 0
    assert (expected > 0).any() and (y >= 0).all()


def test_fx_x86_records_its_calibrated_codes_and_qnnpack_the_full_range():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    example = ExampleInputs((torch.randn(2, 3, 6, 6),))
    for backend, codes in (("x86", (0, 127)), ("qnnpack", (0, 255))):
        config = QuantizationConfig(backend=backend, flow="fx")
        prepared = get_flow("fx").prepare(copy.deepcopy(model), config, example, qat=False)
        prepared(*example.args)
        converted = convert_copy(prepared, "fx", config.engine)
        assert flows.activation_codes(converted) == codes
        assert flows.activation_codes(copy.deepcopy(converted)) is None  # a copy is not known: all codes assumed


def test_exported_onnx_file_has_int8_input_float_output_and_agrees_with_the_int8_model(tmp_path):
    callback = QuantizationAwareTraining(export=("onnx",), export_dir=tmp_path)
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    proto = onnx.load(callback.export_paths["onnx"])
    first = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    clip = next(n for n in proto.graph.node if first.input[0] in n.output)
    assert clip.op_type == "Clip" and clip.input[0] == proto.graph.input[0].name
    zero_points = {i.name: i for i in proto.graph.initializer}
    assert zero_points[first.input[2]].data_type == TensorProto.INT8
    last = next(n for n in proto.graph.node if proto.graph.output[0].name in n.output)
    assert last.op_type == "Clip"
    assert next(n for n in proto.graph.node if last.input[0] in n.output).op_type == "Gemm"
    x = torch.cat([b[0] for b in model.val_dataloader()])
    session = onnxruntime.InferenceSession(str(callback.export_paths["onnx"]), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    int8 = callback.convert(model, "x86")
    with quantized_engine("x86"), torch.inference_mode():
        expected = int8(x)
    # the file returns the head's result clipped where the int8 model clips it but not rounded: within half an
    # output step of the model, plus the steps ONNX Runtime may round a requantization the other way
    assert (got - expected).abs().max() <= 2.0 * float(callback.quantized_model.head.scale)


class _Attention(torch.nn.Module):
    """One attention call with a boolean mask (as Hugging Face's models pass it): True where a query sees a key."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :, :])


def _attention_file() -> tuple[onnx.ModelProto, tuple[np.ndarray, np.ndarray], np.ndarray]:
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[0, :, 3:] = False  # padding keys
    mask[1, 4] = False  # a query that sees no key: torch gives it zeros
    with torch.no_grad():
        expected = model(x, mask).numpy()
    proto = torch.onnx.export(torch.export.export(model, (x, mask)), dynamo=True, verbose=False, report=False)
    return proto.model_proto, (x.numpy(), mask.numpy()), expected


def _run_inputs(proto: onnx.ModelProto, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    onnx.checker.check_model(proto)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip([i.name for i in session.get_inputs()], inputs)))[0]


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_attention_softmax_guard_is_dropped_where_the_exporter_made_the_mask_finite():
    """The exporter writes a boolean mask as a bias of 0 or the lowest float and guards the softmax against NaN:
    a guard that cannot act. Dropped, the file computes the same values, bit for bit."""
    proto, inputs, expected = _attention_file()
    assert "IsNaN" in _ops(proto)
    before = _run_inputs(proto, inputs)
    done = rewrite_for_serving(proto)
    assert done[0].endswith("the NaN guard on its weights is dropped (its mask is finite)")
    assert len(done) == 2 and re.fullmatch(r"[1-9][0-9]* node metadata entries dropped", done[1])  # the exporter's
    assert "IsNaN" not in _ops(proto) and _ops(proto).count("Softmax") == 1
    after = _run_inputs(proto, inputs)
    np.testing.assert_array_equal(after, before)
    # the queries that see a key get torch's result (the one that sees none averages the values in both files)
    np.testing.assert_allclose(after[:, :, :4], expected[:, :, :4], rtol=0, atol=1e-5)
    np.testing.assert_allclose(after[0], expected[0], rtol=0, atol=1e-5)


def test_attention_softmax_guard_is_kept_where_the_mask_may_be_minus_infinity():
    """With a bias that may be -inf, a query that sees no key gets NaN weights: the guard gives torch's zeros and
    is kept."""
    from onnx import numpy_helper

    proto, inputs, expected = _attention_file()
    lowest = [
        init
        for init in proto.graph.initializer
        if numpy_helper.to_array(init).dtype == np.float32
        and numpy_helper.to_array(init).size == 1
        and float(numpy_helper.to_array(init).reshape(())) == np.finfo(np.float32).min
    ]
    assert len(lowest) == 1  # the masked keys' bias
    lowest[0].CopyFrom(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), lowest[0].name))
    assert [line for line in rewrite_for_serving(proto) if "metadata" not in line] == []
    assert "IsNaN" in _ops(proto)
    got = _run_inputs(proto, inputs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.all(got[1, 0, 4] == 0)


def _weight_graph(zero_point: list[int], zero_point_type: int = TensorProto.INT64) -> onnx.ModelProto:
    """x @ DequantizeLinear(W int8, per-row scales, Cast(zero point) to int8): a per-channel weight as torch's
    dynamo exporter writes a pt2e program's (its zero points int64 in the program), with node metadata."""
    weight = np.array([[1, -2, 3, 4], [-5, 6, 7, -8], [9, 10, -11, 12], [13, 14, 15, -16]], dtype=np.int8)
    initializers = [
        onnx.numpy_helper.from_array(weight, "w"),
        onnx.numpy_helper.from_array(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32), "s"),
        helper.make_tensor("z64", zero_point_type, [4], zero_point),
    ]
    matmul = helper.make_node("MatMul", ["x", "wf"], ["y"])
    matmul.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="File model.py, line 1, in forward")
    nodes = [
        helper.make_node("Cast", ["z64"], ["z"], to=TensorProto.INT8),
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0),
        matmul,
    ]
    graph = helper.make_graph(
        nodes,
        "weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_cast_zero_point_is_stored_in_int8_and_a_symmetric_weights_zero_point_is_left_out():
    model = _weight_graph([0, 0, 0, 0])
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    before = _run(copy.deepcopy(model), x)
    size = model.ByteSize()
    done = rewrite_for_serving(model)
    assert done == ["z64: INT64 -> INT8 initializer", "w: zero point 0 left out", "1 node metadata entries dropped"]
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert list(model.graph.node[0].input) == ["w", "s"]
    assert not any(node.metadata_props for node in model.graph.node)
    assert sorted(i.name for i in model.graph.initializer) == ["s", "w"]  # the unread zero points are gone
    np.testing.assert_array_equal(_run(model, x), before)  # the same values, bit for bit
    assert model.ByteSize() < size - 4 * 8 - 20


def test_a_nonzero_zero_point_is_kept_and_a_cast_that_changes_values_is_left_to_the_runtime():
    model = _weight_graph([0, 1, 0, -1])
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    before = _run(copy.deepcopy(model), x)
    assert rewrite_for_serving(model)[:1] == ["z64: INT64 -> INT8 initializer"]
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(zero_points["z"], np.array([0, 1, 0, -1], dtype=np.int8))
    assert len(model.graph.node[0].input) == 3  # read: it is not 0 everywhere
    np.testing.assert_array_equal(_run(model, x), before)

    wrapping = _weight_graph([0, 300, 0, 0])  # int8 cannot hold 300: the Cast stays as it is
    assert not any("INT8 initializer" in line for line in rewrite_for_serving(wrapping))
    assert [n.op_type for n in wrapping.graph.node] == ["Cast", "DequantizeLinear", "MatMul"]
