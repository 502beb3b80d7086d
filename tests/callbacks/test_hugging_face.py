"""Hugging Face models (keyword inputs, ``ModelOutput``) trained with QAT and quantized after training
through the pt2e flow, exported and reloaded; FX cannot trace their ``**kwargs`` forward."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, seed_everything
from torch.utils.data import DataLoader

from lightning_quant import (
    FxTracingError,
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    TorchaoRecipe,
    load_pt2,
    verify_export,
)
from lightning_quant.evaluation.analysis import fake_quant_reference
from lightning_quant.quantization.flows import int8_layers, output_steps
from lightning_quant.quantization.outputs import mean_cosine
from tests.helpers import quiet_trainer, requires_executorch, requires_torchao

transformers = pytest.importorskip("transformers")
pytestmark = requires_torchao

VOCAB = 64


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        return transformers.BertForSequenceClassification(config)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return transformers.DistilBertForSequenceClassification(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2ForSequenceClassification(config)


def _batches(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (8, 12), generator=g)
        labels = (ids[:, 0] > VOCAB // 2).long()  # learnable from the first token
        batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    return batches


class HFClassifier(LightningModule):
    """A sequence classifier called with keyword inputs; batches are ``(inputs dict, labels)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.model = _model(kind)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = 0  # GPT-2 pools the last non-pad token

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.cross_entropy(self.model(**inputs).logits, labels)

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val_loss", F.cross_entropy(self.model(**inputs).logits, labels))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(_batches(4, 0), batch_size=None)

    def val_dataloader(self):
        return DataLoader(_batches(2, 1), batch_size=None)


KINDS = ["bert", "distilbert", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_hugging_face_qat_through_pt2e_exports_and_reloads(kind, tmp_path):
    seed_everything(0)
    model = HFClassifier(kind)
    callback = QuantizationAwareTraining(flow="pt2e", backend="xnnpack", export="pt2", export_dir=tmp_path)
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    int8 = callback.quantized_model
    # attention, FFN and head: BERT's and DistilBERT's Linear layers; GPT-2's transformers Conv1D
    # (addmm, which pt2e quantizers do not annotate) swapped for the Linear it computes
    layers = int8_layers(int8)
    assert sum(p == "int8" for p in layers.values()) >= 8
    if kind == "gpt2":
        assert layers["transformer.h.0.attn.c_attn"] == layers["transformer.h.1.mlp.c_proj"] == "int8"
    inputs, _ = _batches(1, 5)[0]
    out = int8(**inputs)
    assert isinstance(out, transformers.utils.ModelOutput) and out.logits.shape == (8, 2)  # as trained
    with torch.no_grad():
        fake = model.model.eval()(**inputs).logits
    assert mean_cosine(fake, out.logits) > 0.98
    # the .pt2 file reloads, takes the same keyword inputs and computes the same logits within the
    # export check's bound (4 quantization steps of the model's output)
    reloaded = load_pt2(callback.export_paths["pt2"])
    step = max(output_steps(int8))
    torch.testing.assert_close(reloaded(**inputs).logits, out.logits, rtol=0, atol=4 * step)


def test_hugging_face_encoder_through_pt2e_writes_an_onnx_file_onnx_runtime_runs_by_input_name(tmp_path):
    """The program of a model called with keyword token inputs is written as ONNX whose inputs are named after them
    (what a server feeds); ONNX Runtime computes the int8 model's logits within the export check's bound."""
    import onnx
    import onnxruntime

    seed_everything(0)
    model = HFClassifier("bert")
    callback = PostTrainingQuantization(
        flow="pt2e", calibration_batches=4, export=("onnx",), export_dir=tmp_path, progress=False
    )
    quiet_trainer(callbacks=[callback]).validate(model, verbose=False)
    int8 = callback.quantized_model
    inputs, _ = _batches(1, 5)[0]
    session = onnxruntime.InferenceSession(str(callback.export_paths["onnx"]), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert "input_ids" in names and set(names) <= set(inputs)
    assert [o.name for o in session.get_outputs()] == ["output_0"]  # as the fx flow's file names them
    # its attention masks are finite (0 or the lowest float), so the softmax feeds the matmul unguarded, as
    # OpenVINO fuses it
    graph = onnx.load(str(callback.export_paths["onnx"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Softmax") == 2 and "IsNaN" not in ops
    # each layer's product of query and key takes both from int8 pairs with zero point 0 (activations, not
    # weights), the form OpenVINO runs as its int8 attention
    producer = {name: node for node in graph.node for name in node.output}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}

    def int8_activation(name: str) -> bool:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] in constants:
            return False
        zero_point = constants[node.input[2]]
        return zero_point.dtype == np.int8 and not zero_point.any()

    scores = [n for n in graph.node if n.op_type == "MatMul" and all(int8_activation(i) for i in n.input)]
    assert len(scores) == 2
    logits = session.run(None, {name: inputs[name].numpy() for name in names})[0]
    step = max(output_steps(int8))
    torch.testing.assert_close(torch.from_numpy(logits), int8(**inputs).logits, rtol=0, atol=4 * step)


@pytest.mark.parametrize("kind", KINDS)
def test_hugging_face_ptq_through_pt2e_is_close_to_float(kind, tmp_path):
    model = HFClassifier(kind)
    callback = PostTrainingQuantization(flow="pt2e", calibration_batches=4, export=None, progress=False)
    quiet_trainer(callbacks=[callback]).validate(model, verbose=False)
    inputs, _ = _batches(1, 5)[0]
    with torch.no_grad():
        float_logits = model.model.eval()(**inputs).logits
    assert mean_cosine(float_logits, callback.quantized_model(**inputs).logits) > 0.99


def test_hugging_face_fx_failure_points_to_pt2e():
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(export=None)])
    with pytest.raises(FxTracingError, match=r'use flow="pt2e" \(torch.export captures what FX cannot'):
        trainer.fit(HFClassifier("bert"))


# ---------------------------------------------------------------- Hugging Face's own pattern: **batch with labels
def _labelled(kind: str, n: int, seed: int) -> list[dict]:
    """Batches as a transformers data collator gives them: the model's inputs and its ``labels`` in one dict
    (a causal LM's labels are its input ids)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (8, 12), generator=g)
        labels = ids.clone() if kind == "llama" else (ids[:, 0] > VOCAB // 2).long()
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _labelled_model(kind: str):
    if kind != "llama":
        return _model(kind)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


class HFLossModule(LightningModule):
    """How every transformers example trains: the model computes its own loss from the batch's labels."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.model = _labelled_model(kind)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = 0

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(_labelled(self.kind, 4, 0), batch_size=None)

    def val_dataloader(self):
        return DataLoader(_labelled(self.kind, 2, 1), batch_size=None)


def _prediction_inputs(kind: str) -> dict:
    return {k: v for k, v in _labelled(kind, 1, 5)[0].items() if k != "labels"}


@pytest.mark.parametrize(
    ("kind", "flow", "export"),
    [
        ("bert", "pt2e", "default"),
        ("bert", "torchao", "default"),
        pytest.param("llama", "pt2e", "default", marks=pytest.mark.slow),
        ("llama", "torchao", ("state_dict", "pt2")),
    ],
)
def test_hugging_face_loss_from_labels_trains_converts_and_exports(kind, flow, export, tmp_path):
    seed_everything(0)
    module = HFLossModule(kind)
    qat = QuantizationAwareTraining(flow=flow, export=export, export_dir=tmp_path)
    quiet_trainer(callbacks=[qat, KnowledgeDistillation(alpha=0.3)], max_epochs=1).fit(module)
    # the labels were a training input only: the int8 model and its files are called for a prediction
    assert "labels" not in qat.example_inputs.kwargs and "labels" in qat.training_call.kwargs
    inputs = _prediction_inputs(kind)
    out = qat.quantized_model(**inputs)
    assert isinstance(out, transformers.utils.ModelOutput) and out.loss is None
    assert out.logits.shape == ((8, 2) if kind == "bert" else (8, 12, VOCAB))
    assert qat.fidelity is not None and qat.fidelity.cosine > 0.99  # compared on logits, not on a loss
    with torch.no_grad():
        reference = fake_quant_reference(qat.target(module))(**inputs).logits
    assert mean_cosine(reference, out.logits) > 0.99
    assert all(record.max_abs_diff < 0.05 for record in qat.export_records.values())
    if "pt2" in qat.export_paths:
        assert mean_cosine(load_pt2(qat.export_paths["pt2"])(**inputs).logits, out.logits) > 0.999
    if flow == "torchao" and kind == "llama":  # the user's model keeps its generation cache (off only while a
        assert module.model.config.use_cache is True  # program is captured)


@pytest.mark.parametrize(("kind", "flow"), [("bert", "pt2e"), ("llama", "pt2e"), ("llama", "torchao")])
def test_hugging_face_ptq_of_a_loss_from_labels_model_is_called_without_labels(kind, flow, tmp_path):
    module = HFLossModule(kind)
    mode = {"mode": "dynamic"} if flow == "torchao" else {"calibration_batches": 4}
    export = None if (kind, flow) == ("llama", "pt2e") else "default"  # its .pt2 is checked by the QAT test
    ptq = PostTrainingQuantization(flow=flow, export=export, export_dir=tmp_path, progress=False, **mode)
    quiet_trainer(callbacks=[ptq]).validate(module, verbose=False)
    inputs = _prediction_inputs(kind)
    with torch.no_grad():
        float_logits = module.model.eval()(**inputs).logits
        int8 = ptq.quantized_model(**inputs)
    assert int8.loss is None and mean_cosine(float_logits, int8.logits) > 0.99
    assert sorted(ptq.example_inputs.kwargs) == ["attention_mask", "input_ids"]


# ---------------------------------------------------------------- Lightning's demo Transformer
class DemoTransformer(LightningModule):
    """``lightning.pytorch.demos.Transformer`` trained as its demo trains it: ``self.model(input, target)``."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        torch.manual_seed(0)
        self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, VOCAB, (32, 12), generator=g)
        return DataLoader(torch.utils.data.TensorDataset(x, torch.roll(x, 1, 1)), batch_size=8)


def test_lightning_demo_transformer_refused_by_pt2e_naming_torchao_which_trains_it(tmp_path):
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(flow="pt2e", export=None)])
    with pytest.raises(Exception, match=r"torch.export could not capture Transformer .* use flow='torchao'"):
        trainer.fit(DemoTransformer())
    module = DemoTransformer()
    qat = QuantizationAwareTraining(flow="torchao", export_dir=tmp_path)
    quiet_trainer(callbacks=[qat], max_epochs=1).fit(module)
    ptq = PostTrainingQuantization(flow="torchao", mode="dynamic", export_dir=tmp_path / "ptq", progress=False)
    quiet_trainer(callbacks=[ptq], max_epochs=1).fit(DemoTransformer())
    x = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = fake_quant_reference(qat.target(module))(x, torch.roll(x, 1, 1))
        assert mean_cosine(reference.exp(), qat.quantized_model(x, torch.roll(x, 1, 1)).exp()) > 0.99
    assert sorted(qat.export_paths) == sorted(ptq.export_paths) == ["state_dict"]


@pytest.mark.parametrize("flow", [pytest.param("pt2e", marks=pytest.mark.slow), "torchao"])
def test_hugging_face_causal_lm_qat_under_bf16_mixed_precision(flow, tmp_path):
    """Llama's RMSNorm casts to float32 explicitly, which torch.export asserts; under autocast the values
    before the cast are bfloat16: the assertion is dropped, the cast does its work."""
    seed_everything(0)
    module = HFLossModule("llama")
    qat = QuantizationAwareTraining(flow=flow, export=None)
    quiet_trainer(callbacks=[qat], max_epochs=1, precision="bf16-mixed").fit(module)
    inputs = _prediction_inputs("llama")
    with torch.no_grad():
        reference = fake_quant_reference(qat.target(module))(**inputs).logits
    assert mean_cosine(reference, qat.quantized_model(**inputs).logits) > 0.99


# ---------------------------------------------------------------- export="hf": a folder transformers loads
FRESH_PROCESS = """
import sys, torch, transformers
folder, reference = sys.argv[1], torch.load(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(**reference["inputs"]).logits
    tokens = model.generate(reference["prompt"], max_new_tokens=6, do_sample=False)
print(type(model.model.layers[0].mlp.up_proj.weight).__name__, type(model.model.embed_tokens.weight).__name__)
print(torch.equal(logits, reference["logits"]), torch.equal(tokens, reference["tokens"]))
"""


def _fresh_from_pretrained(folder, model, inputs, tmp_path) -> list[str]:
    """What a fresh process sees when it loads ``folder`` with ``AutoModelForCausalLM``: its layers' weight classes,
    whether its logits equal ``model``'s bit for bit, whether its greedy generation equals ``model``'s."""
    import subprocess
    import sys

    prompt = inputs["input_ids"][:1, :4]
    with torch.no_grad():
        reference = {
            "inputs": inputs,
            "logits": model(**inputs).logits,
            "prompt": prompt,
            "tokens": model.generate(prompt, max_new_tokens=6, do_sample=False),
        }
    assert reference["tokens"].shape == (1, 10)  # generate() runs on the converted model
    torch.save(reference, tmp_path / "reference.pt")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "reference.pt")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_qat_writes_a_folder_transformers_loads_bit_identical(tied, tmp_path):
    seed_everything(0)
    module = HFLossModule("llama")
    if tied:  # the lm_head shares the embedding's weight: quantized, they are two tensors, and the folder says so
        module.model.lm_head.weight = module.model.model.embed_tokens.weight
        module.model.config.tie_word_embeddings = True
    qat = QuantizationAwareTraining(
        recipe=TorchaoRecipe(layers={"model.embed_tokens": "int8"}), export="hf", export_dir=tmp_path / "out"
    )
    quiet_trainer(callbacks=[qat], max_epochs=1).fit(module)
    folder = tmp_path / "out" / "model_int8_hf"
    assert qat.export_paths["hf"] == str(folder) and qat.export_records["hf"].max_abs_diff == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["quantization_config"]["include_input_output_embeddings"] is True
    assert config["tie_word_embeddings"] is False
    manifest = verify_export(tmp_path / "out")  # every file of the folder against its SHA-256
    assert {"model_int8_hf/config.json", "model_int8_hf/model.safetensors"} <= set(manifest["files"])
    seen = _fresh_from_pretrained(folder, qat.quantized_model, _prediction_inputs("llama"), tmp_path)
    assert seen == ["IntxUnpackedToInt8Tensor", "IntxUnpackedToInt8Tensor", "True", "True"]


@pytest.mark.parametrize("algorithm", [None, "awq"])
def test_causal_lm_ptq_folder_holds_int8_weights_and_the_tokenizer_files(algorithm, tmp_path):
    """Round to nearest, and AWQ (its scales ride in the int8 tensors, and come back from the folder)."""
    module = HFLossModule("llama")
    source = tmp_path / "pretrained"
    module.model.save_pretrained(source)  # as a user's model comes: from a folder, with its tokenizer beside it
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    module.model = transformers.AutoModelForCausalLM.from_pretrained(source)
    recipe = TorchaoRecipe("int8_weight_only", algorithm=algorithm)
    ptq = PostTrainingQuantization(
        recipe, calibration_batches=2, export="hf", export_dir=tmp_path / "out", progress=False
    )
    quiet_trainer(callbacks=[ptq]).validate(module, verbose=False)
    assert (ptq.quantized_model.model.layers[0].mlp.up_proj.weight.act_pre_scale is not None) is (algorithm == "awq")
    folder = tmp_path / "out" / "model_int8_hf"
    assert (folder / "tokenizer.json").read_text() == '{"version": "1.0"}'
    seen = _fresh_from_pretrained(folder, ptq.quantized_model, _prediction_inputs("llama"), tmp_path)
    assert seen == ["Int8Tensor", "Parameter", "True", "True"]
    weights = (folder / "model.safetensors").stat().st_size
    # int8 Linear weights (a quarter of their float bytes) beside the float embedding and norms: under half (AWQ adds
    # a float scale per input feature of each layer: 4 KB here)
    assert weights < (0.47 if algorithm is None else 0.52) * (source / "model.safetensors").stat().st_size


def test_export_hf_of_a_model_holding_no_transformers_model_is_refused_before_training(tmp_path):
    class Plain(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 32)), batch_size=8)

    module = Plain()
    trainer = quiet_trainer(callbacks=[QuantizationAwareTraining(recipe="torchao", export="hf", export_dir=tmp_path)])
    with pytest.raises(Exception, match=r"export 'hf' writes a Hugging Face model folder: .* set module="):
        trainer.fit(module)
    assert trainer.global_step == 0
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- export="executorch": an 8da4w decoder on a phone
def _runtime_greedy(pte: str, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation in ExecuTorch's runtime, as an app runs the ``.pte``: the program maps the ids so far (and
    their attention mask, when it was exported with one) to logits (no KV cache: each step runs the whole
    sequence), and the next id is the last position's argmax."""
    from executorch.runtime import Runtime

    with open(pte, "rb") as handle:
        data = handle.read()
    program = Runtime.get().load_program(data)
    method = program.load_method("forward")
    with_mask = method.metadata.num_inputs() == 2
    ids = prompt
    for _ in range(new_tokens):
        logits = method.execute([ids, torch.ones_like(ids)] if with_mask else [ids])[0]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@requires_executorch
def test_causal_lm_8da4w_pte_generates_in_the_executorch_runtime_as_eager_does(tmp_path):
    module = HFLossModule("llama")
    config = copy.deepcopy(module.model.config)
    config.num_hidden_layers = 1  # lowering to XNNPACK is most of this test's time (twice: rehearsal, then export)
    torch.manual_seed(0)
    module.model = transformers.LlamaForCausalLM(config)
    recipe = TorchaoRecipe("int8_dyn_int4_weight", group_size=32, backend="xnnpack")
    ptq = PostTrainingQuantization(recipe, export="executorch", export_dir=tmp_path, progress=False)
    quiet_trainer(callbacks=[ptq]).validate(module, verbose=False)
    assert ptq.export_records["executorch"].max_abs_diff < 0.05  # its reload check: one forward in the runtime
    prompt = _prediction_inputs("llama")["input_ids"][:1, :4]
    eager = ptq.quantized_model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False
    )
    assert torch.equal(_runtime_greedy(ptq.export_paths["executorch"], prompt, 8), eager)  # token for token
