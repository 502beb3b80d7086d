"""Int8 quantization of PyTorch models as Lightning callbacks (QAT, PTQ) and one function (``quantize``)."""

from lightning_quant.callbacks import (
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationReport,
)
from lightning_quant.quantization import (
    Backend,
    ExampleInputs,
    ExportTarget,
    Flow,
    FxTracingError,
    Observer,
    QATSchedule,
    QuantizationConfig,
    quantization_disabled,
)
from lightning_quant.quantization.calibrate import NonFiniteError
from lightning_quant.quantization.ptq import quantize

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ExampleInputs",
    "ExportTarget",
    "Flow",
    "FxTracingError",
    "KnowledgeDistillation",
    "NonFiniteError",
    "Observer",
    "PostTrainingQuantization",
    "QATSchedule",
    "QuantizationAwareTraining",
    "QuantizationConfig",
    "QuantizationReport",
    "quantization_disabled",
    "quantize",
]
