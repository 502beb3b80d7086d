"""torchao pt2e's fused fake quantizer with the vectorized CPU path of
:mod:`lightning_quant.quantization.flows.fake_quantize` (the pt2e flow's QAT activations)."""

from __future__ import annotations

from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

from lightning_quant.quantization.flows.fake_quantize import CpuFusedFakeQuantizeMixin


class CpuFusedFakeQuantizePt2e(CpuFusedFakeQuantizeMixin, FusedMovingAvgObsFakeQuantize):
    """torchao pt2e's ``FusedMovingAvgObsFakeQuantize``, the same numbers, vectorized on CPU."""
