from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_quant.quantization import flows
from lightning_quant.quantization.config import QuantizationConfig
from lightning_quant.quantization.convert import convert_copy
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.pt2e import Pt2eExportError, Pt2eGraphModule
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.outputs import mean_cosine
from lightning_quant.quantization.schedule import fake_quantizers, set_bn_frozen, set_observers
from tests.helpers import BertEmbedder, TinyNet, requires_executorch

pytest.importorskip("torchao")


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).flatten(1)))


def _args(graph_module: torch.fx.GraphModule, name: str) -> list[tuple]:
    return [tuple(n.args) for n in graph_module.graph.nodes if n.op == "call_function" and name in str(n.target)]


def _prepared(model: nn.Module, qat: bool = True, **options) -> Pt2eGraphModule:
    x = torch.randn(8, 1, 6, 6)
    prepared = get_flow("pt2e").prepare(model, QuantizationConfig(flow="pt2e", **options), ExampleInputs((x,)), qat=qat)
    assert isinstance(prepared, Pt2eGraphModule)
    return prepared


def test_train_and_eval_switch_dropout_and_batch_norm_nodes_and_keep_dropouts_probability():
    torch.manual_seed(0)
    prepared = _prepared(DropoutNet())
    assert prepared.training
    assert _args(prepared, "dropout") == [(_args(prepared, "dropout")[0][0], 0.2, True)]
    assert [a[5] for a in _args(prepared, "batch_norm")] == [True]

    prepared.eval()  # what Lightning calls before validation
    assert [a[1:] for a in _args(prepared, "dropout")] == [(0.2, False)]
    assert [a[5] for a in _args(prepared, "batch_norm")] == [False]
    set_observers(prepared, False)
    x = torch.randn(5, 1, 6, 6)
    torch.testing.assert_close(prepared(x), prepared(x), rtol=0, atol=0)  # no dropout left in eval

    prepared.train()
    assert [a[1:] for a in _args(prepared, "dropout")] == [(0.2, True)]  # probability kept (not reset)
    set_bn_frozen(prepared, True)  # BN frozen: training mode, but batch norm uses its running statistics
    assert prepared.training and [a[5] for a in _args(prepared, "batch_norm")] == [False]
    running_mean = prepared.get_buffer("bn.running_mean").clone()
    prepared(torch.randn(8, 1, 6, 6) + 3)
    torch.testing.assert_close(prepared.get_buffer("bn.running_mean"), running_mean, rtol=0, atol=0)
    set_bn_frozen(prepared, False)
    assert [a[5] for a in _args(prepared, "batch_norm")] == [True]


def test_a_deep_copy_keeps_the_mode_and_the_batch_norm_freeze():
    prepared = _prepared(DropoutNet())
    set_bn_frozen(prepared, True)
    prepared.eval()
    copied = copy.deepcopy(prepared)
    assert isinstance(copied, Pt2eGraphModule) and not copied.training and copied.bn_frozen
    copied.train()
    assert [a[1:] for a in _args(copied, "dropout")] == [(0.2, True)]
    assert [a[5] for a in _args(copied, "batch_norm")] == [False]  # still frozen
    assert not prepared.training  # the original is untouched


class ResidualBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ReLU module called twice, after the first conv and after the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.down = nn.Conv2d(1, 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.head(self.relu(self.bn2(self.conv2(out)) + self.down(x)).flatten(1))


@pytest.mark.parametrize("qat", [False, True])
def test_a_module_called_twice_is_quantized_for_x86_at_each_call(qat):
    """torch's source partitions group every call of one module (pytorch/ao#4478): the X86InductorQuantizer raised
    'Input partition has more than one output node' on torchvision's ResNet block. Each call is annotated on its
    own, and the module's name is back on every node afterwards."""
    torch.manual_seed(0)
    model = ResidualBlock()
    prepared = _prepared(model, qat=qat)
    stacks = [n.meta.get("nn_module_stack") or {} for n in prepared.graph.nodes]
    assert all("@" not in str(fqn) for stack in stacks for fqn, _ in stack.values())
    # both ReLU calls end an int8 pattern: each has an observer or fake quantizer on its output
    relus = [n for n in prepared.graph.nodes if n.op == "call_function" and "relu" in str(n.target)]
    assert len(relus) == 2 and all(any(u.op == "call_module" for u in relu.users) for relu in relus)
    prepared.eval()
    for _ in range(4):
        prepared(torch.randn(8, 1, 6, 6))
    int8 = convert_copy(prepared, "pt2e", "x86")
    assert flows.int8_layers(int8) == {"conv1": "int8", "conv2": "int8", "down": "int8", "head": "int8"}
    x = torch.randn(16, 1, 6, 6)
    model.eval()
    with torch.no_grad():
        assert mean_cosine(int8(x), model(x)) > 0.99


class UnusedPooler(nn.Module):
    """A Hugging Face encoder as a caller uses it: the pooler (Linear-Tanh) runs, its result is not taken."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.act = nn.Linear(8, 8), nn.GELU()
        self.pooler, self.tanh = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x):
        hidden = self.act(self.encoder(x))
        pooled = self.tanh(self.pooler(hidden[:, 0]))  # noqa: F841 - computed by the model, unused by its caller
        return hidden.mean(1)


def test_a_computation_nothing_uses_is_left_out_before_the_quantizer_annotates():
    """torchao's X86InductorQuantizer failed with an IndexError on a Linear-Tanh whose result nothing uses (MiniLM's
    pooler under a caller that takes the hidden states): such nodes are removed from the captured graph."""
    torch.manual_seed(0)
    model, x = UnusedPooler().eval(), torch.randn(4, 5, 8)
    prepared = get_flow("pt2e").prepare(model, QuantizationConfig(flow="pt2e"), ExampleInputs((x,)), qat=False)
    assert not [n for n in prepared.graph.nodes if "tanh" in str(n.target)]
    prepared(x)
    int8 = convert_copy(prepared, "pt2e", "x86")
    assert flows.int8_layers(int8) == {"encoder": "int8"}
    assert flows.source_class(prepared) == flows.source_class(int8) == "UnusedPooler"  # the class it came from
    with torch.no_grad():
        assert mean_cosine(int8(x), model(x)) > 0.99


def test_a_hugging_face_encoder_called_for_its_hidden_states_is_quantized_for_x86():
    """A BertModel whose caller averages the last hidden states, as sentence embedders do: its pooler runs unused.
    The static int8 model is close to float and its Linear layers, but not the pooler's, are int8."""
    from lightning_quant import Pt2eRecipe, quantize

    torch.manual_seed(0)
    model = BertEmbedder().eval()
    ids = [torch.randint(0, 64, (4, 12)) for _ in range(4)]
    int8 = quantize(model, [(x,) for x in ids], Pt2eRecipe("x86"), progress=False)
    layers = flows.int8_layers(int8)
    assert "bert.encoder.layer.0.attention.self.query" in layers and "bert.pooler.dense" not in layers
    held_out = torch.randint(0, 64, (8, 12))
    with torch.no_grad():
        assert mean_cosine(int8(held_out), model(held_out)) > 0.98


def test_prepared_model_takes_other_batch_sizes_and_converts_close_to_its_fake_quant_model():
    torch.manual_seed(0)
    prepared = _prepared(TinyNet(), qat=False)
    assert not prepared.training
    for batch in (1, 3, 16):
        prepared(torch.randn(batch, 1, 6, 6))
    int8 = convert_copy(prepared, "pt2e", "x86")
    x = torch.randn(7, 1, 6, 6)
    set_observers(prepared, False)
    with torch.no_grad():
        reference = prepared(x)
        out = int8(x)
    assert out.shape == (7, 4)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3
    assert flows.int8_layers(int8) == {"features.0": "int8", "head": "int8"}
    # the float weights conversion replaced are gone: only int8 constants and float biases remain
    weights = {k: v.dtype for k, v in int8.state_dict().items() if v.dim() >= 2}
    assert weights and set(weights.values()) == {torch.int8}, weights


def test_skip_and_per_layer_observers_reach_the_quantizer():
    prepared = _prepared(TinyNet(), qat=False, skip=["head"], layers={"features.0": {"observer": "minmax"}})
    observers = {type(m).__name__ for m in fake_quantizers(prepared)} | {
        type(m).__name__ for _, m in flows.observers(prepared)
    }
    assert "MinMaxObserver" in observers
    prepared(torch.randn(8, 1, 6, 6))
    int8 = convert_copy(prepared, "pt2e", "x86")
    assert flows.int8_layers(int8) == {"features.0": "int8", "head": "float"}


def test_per_tensor_weights_on_x86():
    prepared = _prepared(TinyNet(), qat=False, per_channel=False)
    prepared(torch.randn(8, 1, 6, 6))
    int8 = convert_copy(prepared, "pt2e", "x86")
    targets = {str(n.target) for n in int8.graph.nodes if n.op == "call_function"}
    assert not any("dequantize_per_channel" in t for t in targets)
    assert any("dequantize_per_tensor" in t for t in targets)


def test_a_quantizer_that_annotates_nothing_is_refused_at_prepare(monkeypatch):
    """Seen with torch 2.11 and torchao 0.18: prepare inserted no observer, and the "int8" model was float."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    import lightning_quant.quantization.flows.pt2e as pt2e

    # no global config: annotates nothing
    monkeypatch.setattr(pt2e, "build_quantizer", lambda *args: X86InductorQuantizer())
    with pytest.raises(Pt2eExportError, match=r"the X86InductorQuantizer annotated no layer of TinyNet: nothing would"):
        _prepared(TinyNet())


@pytest.mark.parametrize(
    ("dot_product", "qat", "warned"), [(False, True, True), (True, True, False), (False, False, False)]
)
def test_qat_for_x86_warns_on_a_cpu_without_int8_dot_products(monkeypatch, dot_product, qat, warned):
    """Measured on an AVX2-only EPYC: trained x86 programs compiled as served left the int8 model's outputs far
    behind, and the export check refused them after training; the warning says so before training."""
    import warnings

    import lightning_quant.quantization.flows.pt2e as pt2e

    monkeypatch.setattr(pt2e, "has_int8_dot_product", lambda: dot_product)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _prepared(TinyNet(), qat=qat)
    said = [w for w in caught if "no VNNI or AMX int8 instructions" in str(w.message)]
    assert bool(said) is warned
    if warned:
        assert "FxRecipe('x86')" in str(said[0].message) and "Pt2eRecipe('xnnpack')" in str(said[0].message)


def test_a_model_whose_code_fixes_the_batch_size_is_refused_at_prepare():
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(36, 4)

        def forward(self, x):
            return self.fc(x.reshape(8, 36))

    with pytest.raises(Pt2eExportError, match=r"torch.export fixed the batch size of input 'x' to 8: the code of the"):
        _prepared(FixedBatch())


def test_a_model_torch_export_cannot_capture_names_the_remedies():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(36, 4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    with pytest.raises(
        Pt2eExportError,
        match=r"torch.export could not capture DataDependent for flow='pt2e': .*quantize a submodule that is "
        r"\(module=<submodule>\), or use flow='torchao' \(nothing is traced: the model keeps its own forward and "
        r"its Linear layers become int8/int4; for transformers\), flow='fx' or flow='eager'",
    ):
        _prepared(DataDependent())


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ({"head": "fp16"}, r"layers\['head'\] asks for 'fp16', which flow='pt2e' cannot run; its precisions are"),
        ({"head": {"dtype": "quint8"}}, r"layers\['head'\] sets dtype='quint8': with flow='pt2e' the backend"),
    ],
)
def test_per_layer_settings_pt2e_cannot_run_are_refused(layers, match):
    from lightning_quant import QuantizationAwareTraining, quantize

    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(flow="pt2e", layers=layers)
    with pytest.raises(ValueError, match=match):
        quantize(TinyNet(), [torch.randn(4, 1, 6, 6)] * 2, flow="pt2e", layers=layers)


@requires_executorch
def test_xnnpack_backend_converts_with_int8_activations():
    torch.manual_seed(0)
    prepared = _prepared(TinyNet(), qat=False, backend="xnnpack")
    prepared(torch.randn(8, 1, 6, 6))
    int8 = convert_copy(prepared, "pt2e", "x86")
    dtypes = {n.args[-1] for n in int8.graph.nodes if "quantize_per_tensor" in str(n.target)}
    assert dtypes == {torch.int8}
    assert flows.int8_layers(int8) == {"features.0": "int8", "head": "int8"}


class _LabelBranch(nn.Module):
    """Computes its prediction with another layer when it is given labels: the training and the prediction
    graphs then quantize different layers, and the trained ranges have nowhere to go."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, labels=None):
        logits = self.a(x) if labels is None else self.b(x)
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


def test_pt2e_qat_with_labels_refuses_graphs_whose_state_does_not_line_up():
    call = ExampleInputs((torch.randn(4, 4),), {"labels": torch.tensor([0, 1, 2, 3])})
    with pytest.raises(Pt2eExportError, match=r"as graphs whose state does not line up .* use flow='torchao'"):
        get_flow("pt2e").prepare(_LabelBranch(), QuantizationConfig(flow="pt2e", export=None), call, qat=True)


def test_pt2e_qat_with_labels_converts_the_prediction_graph_with_the_trained_state():
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x, labels=None):
            logits = self.head(torch.relu(self.body(x)))
            return logits if labels is None else (F.cross_entropy(logits.view(-1, 3), labels), logits)

    torch.manual_seed(0)
    call = ExampleInputs((torch.randn(16, 4),), {"labels": torch.randint(0, 3, (16,))})
    prepared = get_flow("pt2e").prepare(WithLoss(), QuantizationConfig(flow="pt2e", export=None), call, qat=True)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(5):
        loss, _ = call(prepared)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    view = flows.inference_view(prepared.eval())
    x = torch.randn(16, 4)
    with torch.no_grad():
        _, trained_logits = prepared(x, labels=torch.zeros(16, dtype=torch.long))
        torch.testing.assert_close(view(x), trained_logits)  # the trained state, by the node each quantizes
        int8 = get_flow("pt2e").convert(prepared)
        assert mean_cosine(int8(x), trained_logits) > 0.99


# ---------------------------------------------------------------------- a quantizer of the user's own
def _user_x86_quantizer(qat: bool, linear_float: bool = False):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=qat))
    if linear_float:
        quantizer.set_module_type_qconfig(nn.Linear, None)  # the user's own per-layer choice
    return quantizer


def test_a_user_built_x86_quantizer_passes_straight_through_qat(tmp_path):
    from lightning.pytorch import seed_everything

    from lightning_quant import QuantizationAwareTraining, load_pt2
    from tests.helpers import BoringClassifier, quiet_trainer

    seed_everything(0)
    quantizer = _user_x86_quantizer(qat=True, linear_float=True)  # Linear float: not what the flow would choose
    callback = QuantizationAwareTraining(recipe=quantizer, export_dir=tmp_path)
    assert (callback.config.flow.value, callback.config.backend.value) == ("pt2e", "x86")
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model)
    layers = flows.int8_layers(callback.quantized_model)
    linears = {name for name, m in TinyNet().named_modules() if isinstance(m, nn.Linear)}
    assert linears and {layers[name] for name in linears} == {"float"}  # the user's quantizer decided
    assert "int8" in layers.values()
    x = next(iter(model.val_dataloader()))[0]
    with torch.no_grad():
        fake = model.net.eval()(x)
        int8 = callback.quantized_model(x)
    assert mean_cosine(int8, fake) > 0.99
    reloaded = load_pt2(callback.export_paths["pt2"])
    assert torch.allclose(reloaded(x), int8, atol=1e-4)


def test_a_user_built_quantizer_passes_straight_through_ptq():
    from lightning_quant import PostTrainingQuantization, quantize
    from tests.helpers import BoringClassifier, quiet_trainer, random_images

    callback = PostTrainingQuantization(recipe=_user_x86_quantizer(qat=False), export=None, progress=False)
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    x = random_images(16, seed=4).tensors[0]
    with torch.no_grad():
        reference = model.net.eval()(x)
        assert mean_cosine(callback.quantized_model(x), reference) > 0.99
        net = TinyNet().eval()
        direct = quantize(net, [x], recipe=_user_x86_quantizer(qat=False), progress=False)
        assert set(flows.int8_layers(direct).values()) == {"int8"}
        assert mean_cosine(direct(x), net(x)) > 0.99


def test_a_recipe_that_cannot_work_is_refused_at_construction():
    from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining

    with pytest.raises(TypeError, match=r"recipe must be a pt2e Quantizer .* got int"):
        QuantizationConfig(recipe=5)
    with pytest.raises(ValueError, match=r"runs on flow='pt2e': leave flow out \(or flow='pt2e'\), got flow='eager'"):
        QuantizationConfig(flow="eager", recipe=_user_x86_quantizer(qat=False))
    with pytest.raises(ValueError, match=r"quantizes for backend='x86', got backend='xnnpack': leave backend out"):
        QuantizationConfig(backend="xnnpack", recipe=_user_x86_quantizer(qat=False))
    with pytest.raises(ValueError, match=r"holds its own per-layer settings .* leave layers= and skip= out"):
        QuantizationAwareTraining(recipe=_user_x86_quantizer(qat=True), skip=["head"])
    with pytest.raises(
        ValueError, match=r"got recipe=X86InductorQuantizer\(...\) and \['observer'\], which the recipe"
    ):
        PostTrainingQuantization(recipe=_user_x86_quantizer(qat=False), observer="minmax")


def test_qat_with_a_quantizer_configured_for_ptq_is_refused_before_training():
    from lightning_quant import QuantizationAwareTraining
    from tests.helpers import BoringClassifier, refused_before_training

    refused_before_training(
        BoringClassifier(),
        ValueError,
        r"recipe=X86InductorQuantizer\(...\) put observers, not fake quantization, into the graph: QAT needs a "
        r"quantizer configured for QAT",
        callbacks=[QuantizationAwareTraining(recipe=_user_x86_quantizer(qat=False), export=None)],
    )


def test_a_quantizer_that_fails_on_the_graph_is_named_with_where_and_the_ways_out():
    from lightning_quant import Pt2eExportError, quantize

    class Broken(type(_user_x86_quantizer(qat=False))):
        def annotate(self, model):
            return [][0]  # as a quantizer that fails on a pattern of the graph does

    broken = Broken()
    broken.set_global(_user_x86_quantizer(qat=False).global_config)
    x = torch.randn(8, 1, 6, 6)
    with pytest.raises(
        Pt2eExportError, match=r"Broken failed annotating the graph of TinyNet \(IndexError: list index"
    ):
        quantize(TinyNet().eval(), [(x,)], broken, progress=False)


class TiedLM(nn.Module):
    """Word and position embeddings, a Linear layer and a head that shares the word embeddings' weight, as a
    decoder language model ties them."""

    def __init__(self, vocab: int = 96, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(8, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.embed(ids) + self.pos(torch.arange(ids.shape[1])))))


def _table(int8: torch.fx.GraphModule, lookup: torch.fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a lookup of ``int8`` reads: its int8 codes and per-row scales, or its float table and ``None``."""
    weight = lookup.args[0]
    if weight.op == "get_attr":
        return operator.attrgetter(weight.target)(int8), None
    assert weight.target is torch.ops.quantized_decomposed.dequantize_per_channel.default and weight.args[3] == 0
    return operator.attrgetter(weight.args[0].target)(int8), operator.attrgetter(weight.args[1].target)(int8)


def _rows_within_half_a_step(int8: torch.fx.GraphModule, table: torch.Tensor) -> None:
    """``int8`` looks ``table`` up in int8 with one scale per row, each row within half its step of ``table``."""
    (lookup,) = [
        n
        for n in int8.graph.nodes
        if n.target is torch.ops.aten.embedding.default
        and n.meta["val"].shape[-1] == 16
        and _table(int8, n)[0].shape == table.shape
    ]
    codes, scales = _table(int8, lookup)
    assert codes.dtype == torch.int8 and scales is not None and scales.shape == (table.shape[0],)
    rows = codes.float() * scales[:, None]
    assert ((rows - table).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_x86_stores_embeddings_in_int8_rows_and_a_tied_head_keeps_its_own_int8_weight(per_channel):
    """The word and position tables are int8 with a scale per row (per_channel=False too: it is the Linear layers'
    setting); the head tied to the word table reads its own int8 constant, which Inductor can pack for its int8
    linear kernel only when nothing else reads it; the model stays close to float."""
    from lightning_quant import Pt2eRecipe, quantize

    torch.manual_seed(0)
    model = TiedLM().eval()
    batches = [(torch.randint(0, 96, (4, 8)),) for _ in range(4)]
    int8 = quantize(model, batches, Pt2eRecipe("x86", per_channel=per_channel), progress=False)
    assert flows.int8_layers(int8) == {"embed": "int8", "pos": "int8", "fc": "int8", "head": "int8"}
    _rows_within_half_a_step(int8, model.embed.weight.detach())
    _rows_within_half_a_step(int8, model.pos.weight.detach())
    tables = [v for v in int8.state_dict().values() if tuple(v.shape) == (96, 16)]
    assert [t.dtype for t in tables] == [torch.int8, torch.int8]  # the lookup's and the head's, no float copy
    (head,) = [
        n for n in int8.graph.nodes if n.target is torch.ops.aten.linear.default and n.meta["val"].shape[-1] == 96
    ]
    weight_constant = head.args[1].args[0]
    assert weight_constant.op == "get_attr" and list(weight_constant.users) == [head.args[1]]
    held_out = torch.randint(0, 96, (16, 8))
    with torch.no_grad():
        assert mean_cosine(int8(held_out).flatten(0, 1), model(held_out).flatten(0, 1)) > 0.999
    # the rows are the lookups' own (weight-only), not boundaries: the graph's float passes are as with float tables
    float_tables = quantize(model, batches, Pt2eRecipe("x86", layers={"torch.nn.Embedding": "float"}), progress=False)
    assert flows.boundaries(int8) == flows.boundaries(float_tables)


@pytest.mark.parametrize("layers", [{"embed": "float"}, {"torch.nn.Embedding": "float"}], ids=["name", "type"])
def test_a_rule_that_keeps_an_embedding_float_keeps_its_table_float(layers, recwarn):
    from lightning_quant import Pt2eRecipe, quantize

    torch.manual_seed(0)
    model = TiedLM().eval()
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # untied: the head stays int8
    batches = [(torch.randint(0, 96, (4, 8)),) for _ in range(4)]
    int8 = quantize(model, batches, Pt2eRecipe("x86", layers=layers), progress=False)
    floats = {"embed": "float"} if "embed" in layers else {"embed": "float", "pos": "float"}
    assert flows.int8_layers(int8) == {"embed": "int8", "pos": "int8", "fc": "int8", "head": "int8"} | floats
    lookups = {n.meta["val"].shape[-1]: n for n in int8.graph.nodes if n.target is torch.ops.aten.embedding.default}
    tables = [_table(int8, n) for n in int8.graph.nodes if n.target is torch.ops.aten.embedding.default]
    floats_read = [table for table, scales in tables if scales is None]
    assert len(floats_read) == len(floats) and lookups
    torch.testing.assert_close(
        next(t for t in floats_read if t.shape == (96, 16)), model.embed.weight.detach(), rtol=0, atol=0
    )
    assert not [w for w in recwarn if "Unable to customize" in str(w.message)]  # the type rule is ours, not torchao's


def test_qat_fake_quantizes_embedding_rows_and_converts_to_the_int8_table_it_trained():
    torch.manual_seed(0)
    model = TiedLM()
    before = model.embed.weight.detach().clone()
    ids = torch.randint(0, 96, (8, 8))
    config = QuantizationConfig(flow="pt2e")
    prepared = get_flow("pt2e").prepare(model, config, ExampleInputs((ids,)), qat=True)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(3):
        loss = F.cross_entropy(prepared(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (trained,) = [p.detach().clone() for p in prepared.parameters() if p.shape == (96, 16)]  # one: tied
    assert not torch.equal(trained, before)  # the lookups' table is trained through QAT
    assert any(int(getattr(f, "ch_axis", -1)) == 0 and tuple(f.scale.shape) == (96,) for f in fake_quantizers(prepared))
    prepared.eval()
    set_observers(prepared, False)
    int8 = convert_copy(prepared, "pt2e", "x86")
    assert flows.int8_layers(int8)["embed"] == "int8"
    _rows_within_half_a_step(int8, trained)
    with torch.no_grad():
        torch.testing.assert_close(int8(ids), prepared(ids), rtol=0, atol=1e-4)
