"""Int8 quantization of PyTorch models as Lightning callbacks (QAT, PTQ) and one function (``quantize``).

The package follows a model through quantization, and imports run one way, from the top down:

- ``callbacks``: *when* (Lightning hooks); a base class and a listener protocol they share;
- ``evaluation``: what it cost and bought (metrics, per-layer analysis, the report);
- ``export``: files for servers, phones and ONNX runtimes;
- ``quantization``: *how* (config, qconfig, flows, schedule, calibration, conversion, search);
- ``utils``: checks, names, tables and file writes with no knowledge of quantization.

``lightning_quant.demos`` (data and models) and ``lightning_quant.app`` (the commands) use the
library and are not part of it.
"""

from importlib import metadata as _metadata

from lightning_quant.callbacks import (
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationCallback,
    QuantizationListener,
    QuantizationReport,
)
from lightning_quant.export import verify_export
from lightning_quant.quantization import (
    Backend,
    CpuFakeQuantize,
    CpuFusedFakeQuantize,
    DynamicRecipe,
    EagerRecipe,
    ExampleInputs,
    ExportTarget,
    Flow,
    FxRecipe,
    FxTracingError,
    Mode,
    NonFiniteError,
    Observer,
    Pt2eExportError,
    Pt2eRecipe,
    QATSchedule,
    QuantizationConfig,
    Recipe,
    Scheme,
    Search,
    SkipSearch,
    TorchaoRecipe,
    load_int8,
    load_pt2,
    quantization_disabled,
    quantize,
    quantize_within_budget,
    recipe_for,
    save_int8,
)
from lightning_quant.quantization.options import Algorithm
from lightning_quant.utils.integrity import CorruptFileError, UnsafeFileError

try:  # one source for the version: pyproject.toml, through the installed package's metadata
    __version__ = _metadata.version("lightning-quant")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Algorithm",
    "Backend",
    "CorruptFileError",
    "CpuFakeQuantize",
    "CpuFusedFakeQuantize",
    "DynamicRecipe",
    "EagerRecipe",
    "ExampleInputs",
    "ExportTarget",
    "Flow",
    "FxRecipe",
    "FxTracingError",
    "KnowledgeDistillation",
    "Mode",
    "NonFiniteError",
    "Observer",
    "PostTrainingQuantization",
    "Pt2eExportError",
    "Pt2eRecipe",
    "QATSchedule",
    "QuantizationAwareTraining",
    "QuantizationCallback",
    "QuantizationConfig",
    "QuantizationListener",
    "QuantizationReport",
    "Recipe",
    "Scheme",
    "Search",
    "SkipSearch",
    "TorchaoRecipe",
    "UnsafeFileError",
    "load_int8",
    "load_pt2",
    "quantization_disabled",
    "quantize",
    "quantize_within_budget",
    "recipe_for",
    "save_int8",
    "verify_export",
]
