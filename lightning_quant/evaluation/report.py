"""The quantization report: task metric, output and per-layer SQNR, ranges, size, latency; JSON, Markdown, PNG."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.evaluation.analysis import observer_ranges, per_layer_sqnr
from lightning_quant.evaluation.metrics import (
    compiled_latency_ms,
    file_latency_ms,
    int8_latency,
    latency_ms,
    state_dict_bytes,
    what_to_serve,
)
from lightning_quant.quantization import flows
from lightning_quant.quantization.distributed import RankReducer
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.outputs import (
    collect_outputs,
    higher_is_better,
    is_causal_lm,
    sqnr_db,
    task_metric,
)
from lightning_quant.utils.files import write_file_set
from lightning_quant.utils.tables import format_table, speed_against, speed_change

log = logging.getLogger(__name__)


def build_report(
    *,
    fp32_model: nn.Module,
    reference: nn.Module,
    int8_model: nn.Module,
    batches: Sequence[Any],
    example: ExampleInputs,
    engine: str,
    prepared: nn.Module | None = None,
    export_paths: dict[str, str] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    targets: torch.Tensor | None = None,
    metric: Any = None,
    threshold: float = 0.01,
    next_steps: Sequence[str] = (),
    batch_to_input: Callable[[Any], Any] | None = None,
    repeats: int = 30,
    reducer: RankReducer | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Everything the report says, as plain data (see :func:`write_report`).

    Args:
        fp32_model: the float architecture timed and sized.
        reference: the model whose outputs count as float: the trained float model, or a
            prepared/QAT model with quantization switched off (same module names as ``int8_model``,
            so per-layer SQNR can match layers).
        int8_model: the converted model.
        batches: evaluation batches.
        example: inputs for latency.
        engine: quantized engine of ``int8_model``.
        prepared: the model holding the observers (for their ranges), if any.
        export_paths: exported files, for their sizes.
        targets: the targets of ``batches`` (for the task metric); ``None`` skips it.
        metric: a torchmetrics ``Metric`` to use instead of accuracy/MSE.
        threshold: largest acceptable metric loss (default 0.01 = 1 point of accuracy).
        next_steps: remedies to name when the threshold is missed.
        reducer: under DDP, the task metric is over every rank's batches (the same on every rank);
            the SQNR figures, sizes and latencies are this rank's.
        backend: the backend ``export_paths`` were written for: each file that is a program is timed where it
            is served (``latency_ms["files"]``) and the fastest way to serve the int8 model is named (``serve``).
    """
    float_out = collect_outputs(reference, batches, batch_to_input=batch_to_input)
    int8_out = collect_outputs(int8_model, batches, engine, batch_to_input)
    layers = per_layer_sqnr(reference, int8_model, batches, engine, batch_to_input)
    worst = sorted(layers.items(), key=lambda kv: -kv[1]["loss_db"])
    report: dict[str, Any] = {
        "engine": engine,
        "output_sqnr_db": sqnr_db(float_out, int8_out),
        "output_finite": bool(torch.isfinite(int8_out).all()),
        "sizes": {
            "fp32_state_dict": state_dict_bytes(fp32_model),
            "int8_state_dict": state_dict_bytes(int8_model),
            "files": {t: os.path.getsize(p) for t, p in (export_paths or {}).items() if os.path.exists(p)},
        },
        "latency_ms": {"fp32": {}, "int8": {}},
        "layers": [{"name": n, **v} for n, v in layers.items()],
        "worst_layers": [n for n, _ in worst[:3]],
        "ranges": observer_ranges(prepared) if prepared is not None else {},
        "int8_graph": flows.boundaries(int8_model),
        "warnings": [],
        "next_steps": [],
    }
    report["sizes"]["ratio"] = report["sizes"]["fp32_state_dict"] / report["sizes"]["int8_state_dict"]
    # an int8 model whose kernels come from torch.compile (pt2e on x86) is timed compiled, and so is
    # its fp32 reference; the compile time is reported on its own
    served = flows.served_by(int8_model)
    report["latency_ms"]["int8_served_by"] = served
    report["latency_ms"]["compiled"] = served == "compiled"
    for bs in batch_sizes:
        if served == "compiled":
            report["latency_ms"]["fp32"][str(bs)], _ = compiled_latency_ms(fp32_model, example, bs, repeats, 5)
        else:
            report["latency_ms"]["fp32"][str(bs)] = latency_ms(fp32_model, example, bs, repeats, 5)
        ms, compile_s = int8_latency(int8_model, example, bs, repeats, 5, engine)
        report["latency_ms"]["int8"][str(bs)] = ms
        if compile_s is not None:
            report["latency_ms"].setdefault("compile_s", {})[str(bs)] = compile_s
    if export_paths and backend is not None:
        files_ms = file_latency_ms(export_paths, int8_model, example, backend, batch_sizes, repeats, 5)
        report["latency_ms"]["files"] = files_ms
        report["serve"] = what_to_serve(report["latency_ms"]["fp32"], report["latency_ms"]["int8"], files_ms)
    report["slower_than_float"] = slower_than_float(report)
    worst_names = ", ".join(
        f"{n} (adds {v['loss_db']:.1f} dB of error, output {v['sqnr_db']:.1f} dB)" for n, v in worst[:3]
    )
    if targets is not None:
        causal = is_causal_lm(fp32_model)
        name, float_value = task_metric(float_out, targets, metric, reducer, causal)
        _, int8_value = task_metric(int8_out, targets, metric, reducer, causal)
        loss = (float_value - int8_value) if higher_is_better(name) else (int8_value - float_value)
        report["metric"] = {"name": name, "float": float_value, "int8": int8_value, "loss": loss}
        if loss > threshold:
            report["warnings"].append(
                f"int8 loses {loss:.4f} {name} (threshold {threshold}); worst layers: {worst_names}"
            )
            report["next_steps"] = list(next_steps)
    if not report["output_finite"]:
        report["warnings"].append(f"int8 outputs hold NaN or Inf; worst layers: {worst_names}")
        report["next_steps"] = list(next_steps)
    return report


def slower_than_float(report: dict[str, Any]) -> str:
    """Why the int8 model runs slower than float at some batch size, from its graph, or ``""``."""
    latency = report["latency_ms"]
    slow = [bs for bs, ms in latency["int8"].items() if ms > latency["fp32"][bs]]
    if not slow:
        return ""
    sizes = ", ".join(f"batch {bs} ({latency['int8'][bs]:.3g} ms vs {latency['fp32'][bs]:.3g} ms)" for bs in slow)
    graph = report.get("int8_graph") or {}
    int8_layers = sum(1 for layer in report["layers"] if layer.get("precision") == "int8")
    if not graph:
        why = (
            "it quantizes its activations inside each layer at run time (dynamic or weight-only), which pays "
            "off only where the layers' matrices are large"
        )
    else:
        floats = ", ".join(f"{kind} x{count}" for kind, count in list(graph["float_ops"].items())[:6])
        why = (
            f"its graph quantizes {graph['quantize']} times and dequantizes {graph['dequantize']} times around "
            f"{int8_layers} int8 layer(s), each a pass over an activation"
            + (f", and runs in float between them: {floats}" if floats else "")
            + "; int8 pays where layers are large and run back to back. Keep the layers around those float ops "
            "float (layers={name: 'float'}), or let the search aim at latency "
            "(quantize(..., search=Search(latency=True)))"
        )
    return f"int8 is slower than float at {sizes}: {why}" + faster_files(latency, slow)


def faster_files(latency: dict[str, Any], batch_sizes: list[str]) -> str:
    """Where the in-process int8 model is slower than float: which written file is faster than float at those
    batch sizes (the one to serve instead), or that none is; ``""`` where no file was timed."""
    files = latency.get("files") or {}
    if not files:
        return ""
    words = []
    for bs in batch_sizes:
        times = {target: ms[bs] for target, ms in files.items() if bs in ms}
        if not times:
            continue
        best = min(times, key=times.__getitem__)
        fp32 = latency["fp32"][bs]
        if times[best] < fp32:
            words.append(
                f"at batch {bs} serve the {best} file instead ({times[best]:.3g} ms, "
                + speed_against(fp32, times[best], "float")
                + ")"
            )
        else:
            words.append(
                f"at batch {bs} no written file is faster than float either (the fastest, {best}, "
                + speed_against(fp32, times[best], "float")
                + ")"
            )
    sentence = "; ".join(words)
    return f". {sentence[0].upper()}{sentence[1:]}" if words else ""


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: headline table, per-layer SQNR, observer ranges, warnings and next steps."""
    lines = ["# Quantization report", ""]
    rows = []
    if "metric" in report:
        m = report["metric"]
        rows.append((f"{m['name']}", f"{m['float']:.4f}", f"{m['int8']:.4f}", f"loss {m['loss']:+.4f}"))
    sizes = report["sizes"]
    rows.append(
        ("weights (bytes)", sizes["fp32_state_dict"], sizes["int8_state_dict"], f"{sizes['ratio']:.2f}x smaller")
    )
    how = {"compiled": ", both compiled", "executorch": ", int8 in ExecuTorch"}.get(
        report["latency_ms"].get("int8_served_by", "eager"), ""
    )
    for bs, fp32 in report["latency_ms"]["fp32"].items():
        int8 = report["latency_ms"]["int8"][bs]
        rows.append((f"latency batch {bs} (ms{how})", f"{fp32:.3f}", f"{int8:.3f}", speed_change(fp32, int8)))
    for target, times in report["latency_ms"].get("files", {}).items():
        for bs, ms in times.items():
            fp32 = report["latency_ms"]["fp32"][bs]
            rows.append((f"latency batch {bs} (ms), {target} file", "", f"{ms:.3f}", speed_change(fp32, ms)))
    rows.append(
        ("output SQNR (dB)", "", f"{report['output_sqnr_db']:.1f}", "finite" if report["output_finite"] else "NaN/Inf")
    )
    lines += [format_table(("", "float", "int8", ""), rows), ""]
    if report.get("serve"):
        lines += ["What to serve, on this machine:", ""]
        lines += [f"- batch {bs}: {sentence}" for bs, sentence in report["serve"].items()] + [""]
    if sizes["files"]:
        lines += ["Exported files: " + ", ".join(f"{t} {b} bytes" for t, b in sizes["files"].items()), ""]
    graph = report.get("int8_graph") or {}
    if graph:
        floats = ", ".join(f"{kind} x{count}" for kind, count in graph["float_ops"].items()) or "nothing"
        lines += [
            f"The int8 graph quantizes {graph['quantize']} times and dequantizes {graph['dequantize']} times; "
            f"in float between: {floats}.",
            "",
        ]
    if report.get("slower_than_float"):
        lines += [f"**Speed:** {report['slower_than_float']}", ""]
    lines += [
        "## Per-layer SQNR, in forward order",
        "",
        "Output SQNR accumulates the error of every layer before; *lost* is what the layer itself adds "
        "(input SQNR - output SQNR).",
        "",
        format_table(
            ("layer", "precision", "input SQNR (dB)", "output SQNR (dB)", "lost (dB)"),
            [
                (
                    l["name"],
                    l.get("precision", "-"),
                    f"{l['input_sqnr_db']:.1f}",
                    f"{l['sqnr_db']:.1f}",
                    f"{l['loss_db']:.1f}",
                )
                for l in report["layers"]
            ],
        ),
        "",
        f"Worst layers: {', '.join(report['worst_layers']) or '-'}",
        "",
    ]
    if report["ranges"]:
        lines += [
            "## Observer ranges",
            "",
            format_table(
                ("observer", "observes", "min", "max", "scale", "zero point"),
                [
                    (
                        n,
                        r["observes"] or "-",
                        f"{r['min']:.4g}",
                        f"{r['max']:.4g}",
                        f"{r['scale']:.4g}",
                        r["zero_point"],
                    )
                    for n, r in report["ranges"].items()
                ],
            ),
            "",
        ]
    for warning in report["warnings"]:
        lines.append(f"**Warning:** {warning}")
    if report["next_steps"]:
        lines += ["", "Next steps, cheapest first:", *[f"1. {step}" for step in report["next_steps"]]]
    return "\n".join(lines) + "\n"


def _bar_chart(
    plt: Any,
    labels: list[str],
    widths: list[float],
    lefts: list[float],
    color: Any,
    xlabel: str,
    title: str,
) -> bytes:
    """A horizontal bar chart as PNG bytes."""
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1.2))
    ax.barh(labels, widths, left=lefts, color=color)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(report: dict[str, Any], directory: os.PathLike | str) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots (per-layer SQNR, observer ranges).

    Every file is made in memory, then the set is written as one
    (:func:`~lightning_quant.utils.files.write_file_set`): a full disk or a killed process leaves the
    previous report as it was, never an empty, half-written or mixed one; ``report.manifest.json``
    lists each file's SHA-256.
    """
    directory = Path(directory)
    contents: dict[str, bytes] = {
        "report.json": json.dumps(report, indent=2).encode("utf-8"),
        "report.md": report_markdown(report).encode("utf-8"),
    }
    keys = {"json": "report.json", "md": "report.md"}
    for key, png in _plots(report).items():
        keys[key] = f"{key.removesuffix('_png')}.png"
        contents[keys[key]] = png
    family = ["report.json", "report.md", "sqnr.png", "ranges.png"]
    written = write_file_set(directory, "report", contents, family=family)
    return {key: written[name] for key, name in keys.items()}


def _plots(report: dict[str, Any]) -> dict[str, bytes]:
    """The report's PNG plots (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: report plots skipped (pip install matplotlib)")
        return {}
    plots = {}
    if report["layers"]:
        names = [l["name"] for l in report["layers"]][::-1]
        values = [max(l["sqnr_db"], -10) if math.isfinite(l["sqnr_db"]) else 100 for l in report["layers"]][::-1]
        colors = ["#c0392b" if n in report["worst_layers"][:1] else "#2e86c1" for n in names]
        plots["sqnr_png"] = _bar_chart(
            plt,
            names,
            values,
            [0] * len(names),
            colors,
            "output SQNR vs float (dB), higher is better",
            "Per-layer output SQNR, in forward order\n(red: the layer that adds the most error)",
        )
    if report["ranges"]:
        ranges = report["ranges"]
        names = list(ranges)[::-1]
        labels = [f"{n} ({ranges[n]['observes']})" if ranges[n]["observes"] else n for n in names]
        plots["ranges_png"] = _bar_chart(
            plt,
            labels,
            [ranges[n]["max"] - ranges[n]["min"] for n in names],
            [ranges[n]["min"] for n in names],
            "#7d3c98",
            "observed range",
            "Observer ranges",
        )
    return plots
