"""Int8 quantization of PyTorch models as a Lightning callback: QAT, then convert and export."""

from lightning_quant.callbacks import QuantizationAwareTraining
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

__version__ = "0.1.0"

__all__ = [
    "Backend", "ExampleInputs", "ExportTarget", "Flow", "FxTracingError", "Observer", "QATSchedule",
    "QuantizationAwareTraining", "QuantizationConfig", "quantization_disabled",
]
