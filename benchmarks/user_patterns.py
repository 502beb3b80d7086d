"""The matrix of code as users write it: LightningModule patterns x flows x callbacks, one figure per cell.

Run with ``make bench-patterns`` (a few minutes on 2 cores; outside ``make test``, which asserts the
same cells in ``tests/callbacks/test_user_patterns.py`` and ``tests/callbacks/test_hugging_face.py``).
Each cell trains 2 epochs (Hugging Face: 1), converts and exports with the callback's defaults, then
calls the int8 model the inference way on the inputs the network really receives. The figure is the
mean cosine of the int8 model's outputs (logits) to the model it came from: the fake-quant model for
QAT (+ distillation + report), the float model for PTQ (+ report); ``report = int8 acc`` says the
report's accuracy equals the accuracy computed on those inputs. A refused cell shows its error's type.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from publish import publish  # noqa: E402

from lightning_quant import (  # noqa: E402
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationReport,
    recipe_for,
)
from lightning_quant.evaluation.analysis import fake_quant_reference  # noqa: E402
from lightning_quant.quantization.convert import quantized_engine  # noqa: E402
from lightning_quant.quantization.outputs import mean_cosine  # noqa: E402
from lightning_quant.utils import format_table  # noqa: E402
from lightning_quant.utils.timing import machine_description  # noqa: E402
from tests.callbacks import test_hugging_face as hf  # noqa: E402
from tests.callbacks.test_user_patterns import PATTERNS, _accuracy, _module_of, images  # noqa: E402
from tests.helpers import quiet_trainer  # noqa: E402


def vision_cell(pattern: str, flow: str, kind: str) -> str:
    pl_module = PATTERNS[pattern]()
    module = _module_of(pattern)
    folder = tempfile.mkdtemp(prefix="patterns_")
    report = QuantizationReport(batch_sizes=(2,), report_dir=folder)
    if kind == "ptq":
        mode = "dynamic" if flow == "torchao" else "static"  # torchao has no calibrated mode
        recipe = recipe_for(flow, mode=mode)
        callback: Any = PostTrainingQuantization(recipe, module=module, export_dir=folder, progress=False)
        callbacks = [callback, report]
    else:
        callback = QuantizationAwareTraining(recipe_for(flow), module=module, export_dir=folder)
        callbacks = [callback, KnowledgeDistillation(module=module, alpha=0.3), report]
    quiet_trainer(callbacks=callbacks, max_epochs=2, default_root_dir=folder).fit(pl_module)
    x, y = images(64, 1)
    args, kwargs = pl_module.real_inputs(x)
    target = callback.target(pl_module)
    reference = fake_quant_reference(target) if kind == "qat" else target.eval()
    with torch.no_grad(), quantized_engine(callback.config.engine):
        cosine = mean_cosine(reference(*args, **kwargs), callback.quantized_model(*args, **kwargs))
    real = _accuracy(callback.quantized_model, pl_module, x, y, callback.config.engine)
    same = abs(report.report["metric"]["int8"] - real) < 1e-6
    return f"{cosine:.4f}{'' if same else ' (report acc differs!)'}"


def hf_cell(kind: str, flow: str, callback_kind: str) -> str:
    module = hf.HFLossModule(kind)
    folder = tempfile.mkdtemp(prefix="patterns_")
    inputs = hf._prediction_inputs(kind)
    if callback_kind == "qat":
        callback: Any = QuantizationAwareTraining(recipe_for(flow), export_dir=folder)
        quiet_trainer(callbacks=[callback, KnowledgeDistillation(alpha=0.3)], default_root_dir=folder).fit(module)
        reference = fake_quant_reference(callback.target(module))
    else:
        recipe, batches = (recipe_for(flow, mode="dynamic"), 32) if flow == "torchao" else (recipe_for(flow), 4)
        callback = PostTrainingQuantization(recipe, calibration_batches=batches, export_dir=folder, progress=False)
        quiet_trainer(callbacks=[callback], default_root_dir=folder).validate(module, verbose=False)
        reference = module.model.eval()
    with torch.no_grad():
        cosine = mean_cosine(reference(**inputs).logits, callback.quantized_model(**inputs).logits)
    return f"{cosine:.4f} ({', '.join(sorted(callback.export_paths))})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", nargs="*", default=["fx", "eager", "pt2e", "torchao"])
    parser.add_argument("--publish", help="also write the table to this Markdown file (make bench-patterns does)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"machine: {machine_description()}")
    rows = []
    start = time.perf_counter()

    def cell(run: Any, *a: str) -> str:
        try:
            return run(*a)
        except Exception as err:  # a refused cell is a figure too
            return f"refused: {type(err).__name__}"

    for pattern in sorted(PATTERNS):
        for kind in ("qat", "ptq"):
            label = "QAT + KD + report" if kind == "qat" else "PTQ + report"
            rows.append((pattern, label, *(cell(vision_cell, pattern, flow, kind) for flow in args.flows)))
            print(" | ".join(rows[-1]), flush=True)
    for model in ("bert", "llama"):
        for kind in ("qat", "ptq"):
            label = "QAT + KD" if kind == "qat" else "PTQ"
            row = [f"HF {model} **batch with labels", label]
            for flow in args.flows:
                row.append(
                    cell(hf_cell, model, flow, kind) if flow in ("pt2e", "torchao") else "n/a: FX cannot trace **kwargs"
                )
            rows.append(tuple(row))
            print(" | ".join(rows[-1]), flush=True)
    table = format_table(("pattern", "callbacks", *args.flows), rows)
    seconds = f"{time.perf_counter() - start:.0f} s"
    print(table)
    print(seconds)
    heading = f"machine: {machine_description()}"
    publish(args.publish, f"{heading}\n\n{table}\n\nwhole run: {seconds}", "make bench-patterns")


if __name__ == "__main__":
    main()
