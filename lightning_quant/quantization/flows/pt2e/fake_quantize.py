"""torchao pt2e's fake quantizers with the vectorized CPU path of
:mod:`lightning_quant.quantization.flows.fake_quantize` (the pt2e flow's QAT activations)."""

from __future__ import annotations

from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize

from lightning_quant.quantization.flows.fake_quantize import CpuFakeQuantizeMixin, CpuFusedFakeQuantizeMixin


class CpuFusedFakeQuantizePt2e(CpuFusedFakeQuantizeMixin, FusedMovingAvgObsFakeQuantize):
    """torchao pt2e's ``FusedMovingAvgObsFakeQuantize``, the same numbers, vectorized on CPU."""


class CpuFakeQuantizePt2e(CpuFakeQuantizeMixin, FakeQuantize):
    """torchao pt2e's ``FakeQuantize`` (min/max and histogram observers), the same numbers, vectorized on CPU."""
