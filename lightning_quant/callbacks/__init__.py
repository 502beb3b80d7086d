"""Lightning callbacks: each says *when* a model is quantized; the core in ``quantization`` says *how*."""

from lightning_quant.callbacks.base import QuantizationCallback, QuantizationListener
from lightning_quant.callbacks.distillation import KnowledgeDistillation
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.callbacks.report import QuantizationReport

__all__ = [
    "KnowledgeDistillation",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "QuantizationCallback",
    "QuantizationListener",
    "QuantizationReport",
]
