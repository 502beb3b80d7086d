"""Accuracy, size and latency of a float and an int8 model, and the table that compares them."""

from __future__ import annotations

import copy
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization import flows, inputs
from lightning_quant.quantization.convert import compiled_runner, quantized_engine
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.outputs import collect_outputs
from lightning_quant.utils.modules import state_dict_bytes
from lightning_quant.utils.tables import format_table, speed_against, speed_change
from lightning_quant.utils.timing import median_ms


def latency_ms(
    module: nn.Module,
    example: ExampleInputs,
    batch_size: int,
    repeats: int = 50,
    warmup: int = 10,
    engine: str | None = None,
) -> float:
    """Median wall time in milliseconds of one forward pass at ``batch_size``, after ``warmup`` passes."""
    inputs = example.to("cpu").with_batch_size(batch_size)
    module = module.eval()
    with quantized_engine(engine or torch.backends.quantized.engine), torch.inference_mode():
        return median_ms(lambda: inputs(module), repeats, warmup)


def executorch_latency_ms(
    module: nn.Module, example: ExampleInputs, batch_size: int, repeats: int = 50, warmup: int = 10
) -> float:
    """Median ms of ``module`` (pt2e, xnnpack) lowered to ExecuTorch and run in its runtime, as served
    (lowered once per model)."""
    from lightning_quant.export import executorch_runner

    inputs = example.to("cpu").with_batch_size(batch_size)
    if module not in _EXECUTORCH_RUNNERS:
        _EXECUTORCH_RUNNERS[module] = executorch_runner(module, example.to("cpu"))
    run = _EXECUTORCH_RUNNERS[module]
    return median_ms(lambda: run(inputs), repeats, warmup)


#: ExecuTorch programs lowered for timing, by model (dropped with the model)
_EXECUTORCH_RUNNERS: weakref.WeakKeyDictionary[nn.Module, Callable[[ExampleInputs], Any]] = weakref.WeakKeyDictionary()


def int8_latency(
    module: nn.Module, example: ExampleInputs, batch_size: int, repeats: int, warmup: int, engine: str | None
) -> tuple[float, float | None]:
    """``(median ms, compile seconds or None)`` of an int8 model the way it is served
    (:func:`lightning_quant.quantization.flows.served_by`): eagerly, compiled, or in ExecuTorch
    (batches up to ``EXECUTORCH_MAX_BATCH``, which its files take; larger ones run the graph eagerly)."""
    from lightning_quant.export import EXECUTORCH_MAX_BATCH

    served = flows.served_by(module)
    if served == "compiled":
        return compiled_latency_ms(module, example, batch_size, repeats, warmup)
    if served == "executorch" and batch_size <= EXECUTORCH_MAX_BATCH:
        return executorch_latency_ms(module, example, batch_size, repeats, warmup), None
    return latency_ms(module, example, batch_size, repeats, warmup, engine), None


def compiled_latency_ms(
    module: nn.Module, example: ExampleInputs, batch_size: int, repeats: int = 50, warmup: int = 10
) -> tuple[float, float]:
    """``(median ms, compile seconds)`` of ``module`` compiled as it is served (``torch.compile`` with
    freezing) at ``batch_size``: the first call, which compiles, is timed on its own."""
    inputs = example.to("cpu").with_batch_size(batch_size)
    run = compiled_runner(copy.deepcopy(module).eval())
    start = time.perf_counter()
    run(inputs)
    compile_s = time.perf_counter() - start
    return median_ms(lambda: run(inputs), repeats, warmup), compile_s


def file_latency_ms(
    files: Mapping[str, str | os.PathLike],
    model: nn.Module,
    example: ExampleInputs,
    backend: str,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 50,
    warmup: int = 10,
) -> dict[str, dict[str, float]]:
    """Median ms of one call of each exported file where it is served, ``{target: {batch size: ms}}``
    (:func:`lightning_quant.export.file_runner`: TorchScript and lite-interpreter files by torch's loaders, ONNX in
    ONNX Runtime, a ``.pt2`` as served, a ``.pte`` in ExecuTorch's runtime). Files that hold weights, or whose runtime
    is not installed, are left out; a ``.pte`` is timed up to the batch its memory was planned for.

    Args:
        files: ``{target: path}``, as ``callback.export_paths``.
        model: the int8 model the files were written from (its signature orders keyword inputs).
        example: the inputs, tiled or cut to each batch size.
        backend: the backend of the run (decides how a ``.pt2`` is served and the engine TorchScript runs on).
    """
    from lightning_quant.export import EXECUTORCH_MAX_BATCH, KEYWORD_TARGETS, engine_for, file_runner
    from lightning_quant.quantization.config import Backend, ExportTarget

    example = example.to("cpu")
    positional = inputs.as_positional(model, example)
    out: dict[str, dict[str, float]] = {}
    for target, path in files.items():
        run = file_runner(target, path, backend)
        if run is None:
            continue
        kind = ExportTarget(target)
        times: dict[str, float] = {}
        for bs in batch_sizes:
            if kind is ExportTarget.EXECUTORCH and bs > EXECUTORCH_MAX_BATCH:
                continue
            batch = (example if kind in KEYWORD_TARGETS else positional).with_batch_size(bs)
            with quantized_engine(engine_for(kind, Backend(backend))), torch.no_grad():
                times[str(bs)] = median_ms(lambda: run(batch), repeats, warmup)  # noqa: B023  # called here
        out[kind.value] = times
    return out


def what_to_serve(
    fp32_ms: Mapping[str, float], in_process_ms: Mapping[str, float], files_ms: Mapping[str, Mapping[str, float]]
) -> dict[str, str]:
    """For each batch size, the fastest way to run the int8 model (the model in process, or one of its files) in
    words, with how it compares with the other int8 ways and with fp32: ``{batch size: sentence}``."""
    out = {}
    for bs, fp32 in fp32_ms.items():
        ways = {"the int8 model in process": in_process_ms[bs]} if bs in in_process_ms else {}
        ways |= {f"the {target} file": times[bs] for target, times in files_ms.items() if bs in times}
        if not ways:
            continue
        best = min(ways, key=ways.__getitem__)
        others = [speed_against(ms, ways[best], way) for way, ms in ways.items() if way != best]
        out[bs] = ", ".join([f"{best} ({ways[best]:.3f} ms)", *others, speed_against(fp32, ways[best], "fp32")])
    return out


def classification_accuracy(
    module: nn.Module,
    batches: Iterable[Any],
    engine: str | None = None,
    batch_to_input: Callable[[Any], Any] | None = None,
    target_of: Callable[[Any], torch.Tensor] = inputs.target_of,
) -> float:
    """Top-1 accuracy of ``module`` (on CPU) over ``batches`` of ``(input, target)`` (or mappings with labels)."""
    batches = list(batches)
    if not batches:
        raise ValueError("no batches to measure accuracy on")
    predictions = collect_outputs(module, batches, engine, batch_to_input).argmax(dim=-1)
    targets = torch.cat([target_of(batch).cpu().reshape(-1) for batch in batches])
    return int((predictions == targets).sum()) / targets.numel()


def compare(
    float_model: nn.Module,
    int8_model: nn.Module | None,
    test_batches: Sequence[Any],
    example: ExampleInputs,
    engine: str,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 50,
    warmup: int = 10,
    float_eval_model: nn.Module | None = None,
    batch_to_input: Callable[[Any], Any] | None = None,
    files: Mapping[str, str | os.PathLike] | None = None,
    backend: str = "x86",
) -> dict[str, Any]:
    """Float vs int8: test accuracy, weight bytes and median latency at each batch size; with ``files``, each
    exported file timed where it is served too, and the fastest way to serve named (``serve_b<bs>``).

    Args:
        float_model: the fp32 model timed and sized.
        int8_model: the quantized model; ``None`` measures the float model alone (a baseline).
        test_batches: ``(input, target)`` batches for accuracy.
        example: inputs for timing (tiled or cut to each batch size).
        engine: quantized engine the int8 model was converted for.

    The int8 model is timed where its int8 kernels run (``int8_served_by``): eagerly (torch.ao
    modules), compiled (pt2e on x86: ``int8_compile_s_b<bs>`` is the compile time, and fp32 is
    also timed compiled as ``fp32_compiled_ms_b<bs>``) or in ExecuTorch's runtime (pt2e on
    xnnpack). Uncompiled, a pt2e model would run its quantize/dequantize pairs in float.
        float_eval_model: the model whose accuracy counts as "float" when it is not
            ``float_model`` (a QAT model with quantization switched off, say).
        files: ``{target: path}`` of the int8 model's exported files (``callback.export_paths``), each timed as
            :func:`file_latency_ms` does (``file_ms``).
        backend: the backend the files were written for.
    """
    metrics: dict[str, Any] = {
        "float_acc": classification_accuracy(
            float_eval_model or float_model, test_batches, batch_to_input=batch_to_input
        ),
        "fp32_bytes": state_dict_bytes(float_model),
    }
    if int8_model is not None:
        metrics["int8_acc"] = classification_accuracy(int8_model, test_batches, engine, batch_to_input)
        metrics["int8_bytes"] = state_dict_bytes(int8_model)
        metrics["int8_served_by"] = flows.served_by(int8_model)
    for bs in batch_sizes:
        metrics[f"fp32_ms_b{bs}"] = latency_ms(float_model, example, bs, repeats, warmup)
        if int8_model is None:
            continue
        if metrics["int8_served_by"] == "compiled":  # compare with fp32 compiled too
            metrics[f"fp32_compiled_ms_b{bs}"], _ = compiled_latency_ms(float_model, example, bs, repeats, warmup)
        metrics[f"int8_ms_b{bs}"], compile_s = int8_latency(int8_model, example, bs, repeats, warmup, engine)
        if compile_s is not None:
            metrics[f"int8_compile_s_b{bs}"] = compile_s
    if int8_model is not None and files:
        metrics["file_ms"] = file_latency_ms(files, int8_model, example, backend, batch_sizes, repeats, warmup)
        fp32_ms = {str(bs): metrics.get(f"fp32_compiled_ms_b{bs}", metrics[f"fp32_ms_b{bs}"]) for bs in batch_sizes}
        int8_ms = {str(bs): metrics[f"int8_ms_b{bs}"] for bs in batch_sizes}
        for size, sentence in what_to_serve(fp32_ms, int8_ms, metrics["file_ms"]).items():
            metrics[f"serve_b{size}"] = sentence
    return metrics


def comparison_table(metrics: dict[str, Any], batch_sizes: Sequence[int] = (1, 32)) -> str:
    """The float-vs-int8 table :func:`compare`'s metrics make: accuracy, size, latency per batch size."""
    rows = [
        (
            "accuracy (test)",
            f"{metrics['float_acc']:.4f}",
            f"{metrics['int8_acc']:.4f}",
            f"{metrics['int8_acc'] - metrics['float_acc']:+.4f}",
        ),
        (
            "weights (bytes)",
            metrics["fp32_bytes"],
            metrics["int8_bytes"],
            f"{metrics['fp32_bytes'] / metrics['int8_bytes']:.2f}x smaller",
        ),
    ]
    for bs in batch_sizes:
        fp32, int8 = metrics[f"fp32_ms_b{bs}"], metrics[f"int8_ms_b{bs}"]
        compiled = metrics.get(f"fp32_compiled_ms_b{bs}")
        if compiled is None:
            where = ", int8 in ExecuTorch" if metrics.get("int8_served_by") == "executorch" else ""
            rows.append((f"latency batch {bs} (ms){where}", f"{fp32:.3f}", f"{int8:.3f}", speed_change(fp32, int8)))
            continue
        rows.append((f"latency batch {bs} (ms), float eager", f"{fp32:.3f}", f"{int8:.3f}", speed_change(fp32, int8)))
        rows.append(
            (
                f"latency batch {bs} (ms), both compiled",
                f"{compiled:.3f}",
                f"{int8:.3f}",
                speed_change(compiled, int8),
            )
        )
        rows.append((f"compile time batch {bs} (s)", "", f"{metrics[f'int8_compile_s_b{bs}']:.1f}", ""))
    fp32_of = {bs: metrics.get(f"fp32_compiled_ms_b{bs}", metrics[f"fp32_ms_b{bs}"]) for bs in batch_sizes}
    for target, times in metrics.get("file_ms", {}).items():
        for bs in batch_sizes:
            if str(bs) in times:
                ms = times[str(bs)]
                rows.append((f"latency batch {bs} (ms), {target} file", "", f"{ms:.3f}", speed_change(fp32_of[bs], ms)))
    table = format_table(("", "float", "int8", "change"), rows)
    serve = [f"serve at batch {bs}: {metrics[f'serve_b{bs}']}" for bs in batch_sizes if f"serve_b{bs}" in metrics]
    return "\n".join([table, *serve])
