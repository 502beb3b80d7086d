"""Lightning callbacks: each says *when* a model is quantized; the core in ``quantization`` says *how*."""

from lightning_quant.callbacks.qat import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining"]
