"""The model zoo matrix: architectures nobody here wrote, through QAT and PTQ, with fidelity and speed.

Run with ``make zoo`` (its own virtualenv, ``.venv-zoo``: torchvision and geffnet beside the CPU torch;
outside ``make test`` and CI). For each model (random init, 3x64x64 images; BatchNorm statistics
first settled by a few forward passes in train mode and Linear layers given torch's default
initialisation, as a trained model's would be: :func:`_trained_like`):

- **QAT**: prepare (fx, or eager for torchvision's quantizable models, pt2e for Hugging Face), a
  few training steps, convert; *fidelity* is the cosine of the int8 model's output to the
  fake-quantized model it came from (observers paused, as QAT's validation runs it); below 0.98,
  what ``QuantizationAwareTraining`` does after fit with fx: the layers where the two part,
  converted float, and the fidelity then; the int8 model is exported (TorchScript, or ``.pt2``
  for pt2e) and reloaded by the export's own check;
- **PTQ**: ``quantize()`` with calibration batches; cosine of int8 to float;
- **speed**: fp32 vs the PTQ int8 model at batch 8, medians of repeated forward passes; where
  int8 is less than 1.5x faster, the same with ``search_latency=True``.

A case that fails prints its error in the table instead of a figure.

torchvision 0.28 is the release that matches torch 2.13, but the registry's wheel is a CUDA build
whose C++ ops do not load beside the CPU torch: ``import torchvision`` fails on its fake-kernel
registrations ("operator torchvision::nms does not exist"), and so would ``import lightning``
(torchmetrics imports torchvision). The models are pure Python, so stand-in schemas for the ops
torchvision registers at import are defined first (:func:`stand_in_torchvision_ops`); nothing here
calls those ops.
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

#: the ops torchvision registers fake kernels for at import (``torch.library.register_fake``), with
#: their schemas; its other registrations skip ops that are missing
TORCHVISION_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def stand_in_torchvision_ops() -> None:
    """Define ``torchvision::<op>`` schemas this torch lacks, so ``import torchvision`` works on CPU."""
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in TORCHVISION_OPS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            library.define(schema)
    _LIBRARIES.append(library)  # a Library undefines its ops when collected


_LIBRARIES: list[Any] = []


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _trained_like(model: nn.Module, steps: int = 8) -> None:
    """Make a randomly initialised classifier behave like a trained one where it matters for quantization:

    - Linear layers get torch's default initialisation: torchvision zero-initialises ViT's head and
      draws MobileNetV3's and EfficientNet's from N(0, 0.01), which makes their outputs 0 or ~1e-5,
      where every cosine is meaningless (a zero output has none);
    - BatchNorm statistics of a few batches, as a trained model has (random init has mean 0, var 1).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(_images(16, 100 + step))
    model.eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def torchvision_models() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    import torchvision.models as tv
    import torchvision.models.quantization as tvq

    def small_vit() -> nn.Module:
        return tv.VisionTransformer(
            image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
        )

    return {
        "resnet18": (lambda: tv.resnet18(num_classes=10), "fx"),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), "fx"),
        "mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), "fx"),
        "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), "fx"),
        "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), "fx"),
        "regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=10), "fx"),
        "shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), "fx"),
        "vit (small)": (small_vit, "fx"),
        "quantizable resnet18": (lambda: tvq.resnet18(num_classes=10), "eager"),
        "quantizable mobilenet_v2": (lambda: tvq.mobilenet_v2(num_classes=10), "eager"),
        "quantizable mobilenet_v3_large": (lambda: tvq.mobilenet_v3_large(num_classes=10), "eager"),
        "quantizable resnet18 (fx)": (lambda: tvq.resnet18(num_classes=10), "fx"),
    }


def geffnet_models() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    import geffnet

    return {
        "geffnet mixnet_s": (lambda: geffnet.mixnet_s(num_classes=10), "fx"),
        "geffnet efficientnet_b0": (lambda: geffnet.efficientnet_b0(num_classes=10), "fx"),
    }


def run_vision_case(factory: Callable[[], nn.Module], flow: str, steps: int, repeats: int) -> dict[str, Any]:
    from lightning_quant import Search, quantize, recipe_for
    from lightning_quant.evaluation.analysis import conversion_fidelity, fake_quant_reference
    from lightning_quant.evaluation.metrics import median_ms
    from lightning_quant.export import export_int8
    from lightning_quant.quantization import ExampleInputs, QuantizationConfig, get_flow
    from lightning_quant.quantization.config import Backend, ExportTarget
    from lightning_quant.quantization.convert import convert_copy, quantized_engine
    from lightning_quant.quantization.flows import int8_layers
    from lightning_quant.quantization.schedule import observers_paused

    torch.manual_seed(0)
    model = factory()
    _trained_like(model)
    float_model = copy.deepcopy(model).eval()
    x = _images(8, 1)
    result: dict[str, Any] = {}
    # QAT
    config = QuantizationConfig(flow=flow, export=None)
    qat = get_flow(flow).prepare(copy.deepcopy(model).train(), config, ExampleInputs((x,)), qat=True)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for step in range(steps):
        loss = qat(_images(16, step)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    int8 = convert_copy(qat, flow, "x86")
    with torch.no_grad(), quantized_engine("x86"), observers_paused(qat):  # as QAT's validation runs it
        result["qat_fidelity"] = cosine(int8(x), qat(x))
    # what QuantizationAwareTraining does after fit below the floor (fx): the layers where int8 parts
    # from fake quant, converted float
    # chosen on two batches, judged on two others, as the callback does
    reference = fake_quant_reference(qat)
    fidelity = conversion_fidelity(reference, int8, [x, _images(8, 2)], "x86")
    result["kept_float"] = ""
    if not fidelity.ok and fidelity.layers and flow == "fx":
        judge = [_images(8, 3), _images(8, 4)]
        kept = convert_copy(qat, flow, "x86", keep_float=list(fidelity.layers))
        before = conversion_fidelity(reference, int8, judge, "x86").cosine
        after = conversion_fidelity(reference, kept, judge, "x86").cosine
        verdict = "kept" if after > before else "not kept"
        result["kept_float"] = f"{before:.4f} -> {after:.4f} ({len(fidelity.layers)} float: {verdict})"
    with tempdir() as folder:
        records = export_int8(
            lambda engine: int8, (ExportTarget.TORCHSCRIPT,), folder, ExampleInputs((x,)), Backend.X86
        )
    result["export_diff"] = records["torchscript"].max_abs_diff
    # PTQ
    calibration = [_images(16, 200 + i) for i in range(8)]
    ptq = quantize(float_model, calibration, recipe_for(flow), progress=False)
    with torch.no_grad(), quantized_engine("x86"):
        result["ptq_cosine"] = cosine(ptq(x), float_model(x))
        fp32_ms = median_ms(lambda: float_model(x), repeats, 1)
        int8_ms = median_ms(lambda: ptq(x), repeats, 1)
    result["speedup"] = fp32_ms / int8_ms
    result["latency_search"] = ""
    if result["speedup"] < 1.5 and flow == "fx":  # int8 barely faster or slower: what the latency search keeps float
        fast = quantize(float_model, calibration, recipe_for(flow), progress=False, search=Search(latency=True))
        with torch.no_grad(), quantized_engine("x86"):
            fast_ms = median_ms(lambda: fast(x), repeats, 1)
            kept = sum(1 for p in int8_layers(fast).values() if p == "float") - sum(
                1 for p in int8_layers(ptq).values() if p == "float"
            )
            result["latency_search"] = (
                f"{fp32_ms / fast_ms:.2f}x ({kept} float, cos {cosine(fast(x), float_model(x)):.4f})"
            )
    return result


def hugging_face_models() -> dict[str, Callable[[], nn.Module]]:
    import transformers

    def bert() -> nn.Module:
        config = transformers.BertConfig(
            vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
        )
        return transformers.BertForSequenceClassification(config)

    def distilbert() -> nn.Module:
        config = transformers.DistilBertConfig(vocab_size=1000, dim=128, n_layers=2, n_heads=2, hidden_dim=256)
        return transformers.DistilBertForSequenceClassification(config)

    def gpt2() -> nn.Module:
        config = transformers.GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=2, pad_token_id=0)
        return transformers.GPT2ForSequenceClassification(config)

    def lightning_transformer() -> nn.Module:
        from lightning.pytorch.demos import Transformer

        return Transformer(vocab_size=1000, ninp=128, nhead=2, nhid=256, nlayers=2)

    return {
        "hf bert": bert,
        "hf distilbert": distilbert,
        "hf gpt2": gpt2,
        "lightning Transformer": lightning_transformer,
    }


def run_text_case(factory: Callable[[], nn.Module], steps: int, repeats: int) -> dict[str, Any]:
    """The text models through the callbacks, trained as their own examples train them: a Hugging Face model
    with ``self.model(**batch).loss`` and ``labels`` in the batch; Lightning's demo ``Transformer`` with
    ``self.model(input, target)``. Each tries ``flow="pt2e"``; where pt2e refuses the model, the flow its
    message names first is used (and shown in the table)."""
    import re

    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, recipe_for
    from lightning_quant.evaluation.analysis import fake_quant_reference
    from lightning_quant.quantization.convert import quantized_engine

    hugging_face = not type(factory()).__module__.startswith("lightning")

    def batch(seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 1000, (8, 32), generator=torch.Generator().manual_seed(seed))
        if hugging_face:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 500).long()}
        return {"inputs": ids, "target": torch.roll(ids, 1, 1)}

    class TextModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = factory()

        def training_step(self, b: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if hugging_face:
                return self.model(**b).loss
            return F.nll_loss(self.model(b["inputs"], b["target"]), b["target"].view(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> DataLoader:
            return DataLoader([batch(10 + i) for i in range(steps)], batch_size=None)

    def trainer(callback: pl.Callback) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )

    def prediction(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), quantized_engine("x86"):
            if hugging_face:
                return model(**{k: v for k, v in b.items() if k != "labels"}).logits
            return model(b["inputs"], b["target"]).exp()

    result: dict[str, Any] = {"flow": "pt2e"}
    inputs = batch(1)
    with tempdir() as folder:
        module = TextModule()
        qat = QuantizationAwareTraining("pt2e", export_dir=folder)
        try:
            trainer(qat).fit(module)
        except Exception as err:  # pt2e refuses the model: use the flow its message names first
            named = re.search(r"use flow='(\w+)'", str(err))  # the first flow the remedy names
            if named is None:
                raise
            result["flow"] = named.group(1)
            module = TextModule()
            qat = QuantizationAwareTraining(recipe_for(result["flow"]), export_dir=folder)
            trainer(qat).fit(module)
        result["qat_fidelity"] = cosine(
            prediction(qat.quantized_model, inputs), prediction(fake_quant_reference(qat.target(module)), inputs)
        )
        result["export_diff"] = max(r.max_abs_diff for r in qat.export_records.values())
        result["exports"] = sorted(qat.export_paths)
        float_module = TextModule()
        dynamic = result["flow"] == "torchao"  # torchao has no calibrated mode
        recipe = recipe_for(result["flow"], mode="dynamic" if dynamic else None)
        ptq = PostTrainingQuantization(recipe, calibration_batches=steps, export=None, progress=False)
        trainer(ptq).fit(float_module)
        float_model = float_module.model.eval()
        result["ptq_cosine"] = cosine(prediction(ptq.quantized_model, inputs), prediction(float_model, inputs))
    result["speedup"] = float("nan")  # pt2e models are served compiled; see make bench-pt2e for timings
    result["kept_float"] = f"flow={result['flow']}, exports {result['exports']}"
    result["latency_search"] = ""
    return result


class tempdir:
    def __enter__(self) -> str:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="zoo_")
        return self._dir.name

    def __exit__(self, *exc: Any) -> None:
        self._dir.cleanup()


def main(argv: list[str] | None = None) -> list[tuple[str, ...]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="QAT training steps per model")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="names of the cases to run")
    parser.add_argument("--publish", help="also write the table to this Markdown file (make zoo does)")
    args = parser.parse_args(argv)
    stand_in_torchvision_ops()
    from publish import publish

    from lightning_quant.utils import format_table
    from lightning_quant.utils.timing import machine_description

    cases: dict[str, Callable[[], dict[str, Any]]] = {}
    vision: dict[str, tuple[Callable[[], nn.Module], str]] = {}
    for group in (torchvision_models, geffnet_models):
        try:
            vision.update(group())
        except ModuleNotFoundError as err:  # the text models run in .venv too: `--only "hf bert" ...`
            print(f"{err.name} is not installed: its models are skipped (make zoo installs it)", flush=True)
    for name, (factory, flow) in vision.items():
        cases[name] = lambda factory=factory, flow=flow: run_vision_case(factory, flow, args.steps, args.repeats)
    for name, factory in hugging_face_models().items():
        cases[name] = lambda factory=factory: run_text_case(factory, args.steps, args.repeats)
    rows = []
    for name, run in cases.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            r = run()
            row = (
                name,
                f"{r['qat_fidelity']:.4f}",
                r["kept_float"] or "-",
                f"{r['export_diff']:.3g}",
                f"{r['ptq_cosine']:.4f}",
                f"{r['speedup']:.2f}x" if r["speedup"] == r["speedup"] else "-",  # text rows: not timed
                r["latency_search"] or "-",
                f"{time.perf_counter() - start:.0f}",
            )
        except Exception as err:  # a failing case is a row, not the end of the matrix
            traceback.print_exc()
            message = " ".join(f"{type(err).__name__}: {err}".split())[:90]
            row = (name, message, "-", "-", "-", "-", "-", f"{time.perf_counter() - start:.0f}")
        print(" | ".join(row), flush=True)
        rows.append(row)
    headers = (
        "model",
        "QAT int8 vs fake-quant cosine",
        "diverging layers float (text: flow, exports)",
        "export reload max diff",
        "PTQ cosine",
        "speed-up b8",
        "with search_latency",
        "s",
    )
    table = format_table(headers, rows)
    print(table)
    heading = f"{args.steps} QAT steps per model, 3x64x64 images (text: their own inputs); {machine_description()}"
    command = "make zoo" + (" ARGS='--only " + " ".join(f'"{n}"' for n in args.only) + "'" if args.only else "")
    publish(args.publish, f"{heading}\n\n{table}", command)
    return rows


if __name__ == "__main__":
    main()
