"""Activation fake quantization for QAT on CPU: torch's fused fake quantizer, the same numbers, about half the time.

QAT's default activation quantizer, torch's ``FusedMovingAvgObsFakeQuantize`` (torch.ao's, and torchao's pt2e
copy), runs one operator, ``fused_moving_avg_obs_fake_quant``, that observes the tensor's range and fake-quantizes
it. On CPU its fake quantization is an element-at-a-time loop: on the 1M-parameter CNN of ``make bench-fit`` it
took more time than the rest of QAT's cost together (a QAT fit 1.34x a float one; 1.23x with the quantizer below,
AMD EPYC, 2 threads). :class:`CpuFusedFakeQuantize` keeps torch's operator for what it decides and replaces only
the loop:

- the range: torch's operator, given the tensor's minimum and maximum (``torch.aminmax``) instead of the tensor.
  It reads nothing else of it, so the moving averages, scale and zero point it writes are torch's, bit for bit;
- the fake quantization: the same arithmetic as torch's kernel (``round(x / scale)`` as ``x * (1 / scale)``
  rounded half to even, the zero point's clamp, times the scale) in vectorized tensor operations, and the same
  gradient: the output's gradient where the value was inside the range, zero where it was clamped.

It does so for a float32 CPU tensor, per-tensor schemes, fake quantization on and eager execution; anything else
(CUDA, per-channel weights, a disabled fake quantization, ``torch.compile`` or ``torch.export`` tracing it) runs
torch's operator unchanged. :class:`CpuFakeQuantize` does the same for torch's ``FakeQuantize``, the activation
quantizer of the min/max and histogram observers: its observer and the scale and zero point it gives are torch's,
the fake quantization the vectorized one. The tests compare outputs, gradients and every buffer with torch's, bit
for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.ao.quantization import FakeQuantize, FusedMovingAvgObsFakeQuantize


class _FakeQuantizePerTensor(torch.autograd.Function):
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``, its gradient masked to the range."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, inv_scale: float, lowest: int, highest: int) -> torch.Tensor:
        # the zero point is folded into the clamp's bounds (lowest = qmin - zero_point): exact on integers
        rounded = torch.mul(x, inv_scale).round_()
        clamped = rounded.clamp(lowest, highest)
        ctx.save_for_backward(clamped == rounded)
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None, None


class _VectorizedFakeQuantize:
    """What both vectorized quantizers share: when to take the vectorized path, and the path itself."""

    # what the mixins read of torch's fake quantizers (declared for the type checker only)
    activation_post_process: Any
    observer_enabled: torch.Tensor
    fake_quant_enabled: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    ch_axis: int
    is_per_channel: bool

    def _vectorized(self, X: torch.Tensor) -> bool:
        return (
            type(X) is torch.Tensor  # not a fake, functional or traced tensor
            and X.device.type == "cpu"
            and X.dtype == torch.float32
            and X.numel() > 0
            and not self.is_per_channel
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and bool(self.fake_quant_enabled[0] == 1)
        )

    def _fake_quantize(self, X: torch.Tensor) -> torch.Tensor:
        """``X`` fake quantized with the current scale and zero point, as torch's per-tensor kernel does it."""
        scale = self.scale
        zero_point = int(self.zero_point)
        return _FakeQuantizePerTensor.apply(
            X,
            scale.item(),
            (1.0 / scale).item(),  # in float32, as torch's kernel computes it
            self.activation_post_process.quant_min - zero_point,
            self.activation_post_process.quant_max - zero_point,
        )


class CpuFusedFakeQuantizeMixin(_VectorizedFakeQuantize):
    """The CPU path of :class:`CpuFusedFakeQuantize`, over any class with torch's fused quantizer's buffers."""

    is_symmetric_quant: bool

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self._vectorized(X):
            return super().forward(X)  # type: ignore[misc]
        observer = self.activation_post_process
        # torch's operator on (min, max): it reads the tensor only through its minimum and maximum
        torch.fused_moving_avg_obs_fake_quant(
            torch.stack(torch.aminmax(X.detach())),
            self.observer_enabled,
            self.fake_quant_enabled,
            observer.min_val,
            observer.max_val,
            self.scale,
            self.zero_point,
            observer.averaging_constant,
            observer.quant_min,
            observer.quant_max,
            self.ch_axis,
            False,
            self.is_symmetric_quant,
        )
        return self._fake_quantize(X)


class CpuFakeQuantizeMixin(_VectorizedFakeQuantize):
    """The CPU path of :class:`CpuFakeQuantize`: torch's ``FakeQuantize.forward`` with the fake quantization
    vectorized. The observer (min/max, histogram) and the scale and zero point it gives are torch's."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self._vectorized(X):
            return super().forward(X)  # type: ignore[misc]
        # torch's forward with its fake quantization switched off does the observing, as it is
        self.fake_quant_enabled[0] = 0
        try:
            super().forward(X)  # type: ignore[misc]
        finally:
            self.fake_quant_enabled[0] = 1
        return self._fake_quantize(X)


class CpuFusedFakeQuantize(CpuFusedFakeQuantizeMixin, FusedMovingAvgObsFakeQuantize):
    """torch.ao's ``FusedMovingAvgObsFakeQuantize`` with the vectorized CPU path above; built the same way
    (``CpuFusedFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=127, ...)``)
    and saved with the same ``state_dict`` keys.

    Example::

        >>> import torch
        >>> from torch.ao.quantization import FakeQuantize, FusedMovingAvgObsFakeQuantize
        >>> x = torch.randn(4, 8)
        >>> torch.equal(CpuFusedFakeQuantize()(x), FusedMovingAvgObsFakeQuantize()(x))
        True
    """


class CpuFakeQuantize(CpuFakeQuantizeMixin, FakeQuantize):
    """torch.ao's ``FakeQuantize`` (the QAT activation quantizer of the ``"minmax"`` and ``"histogram"``
    observers) with the vectorized CPU fake quantization above; built and saved the same way.

    Example::

        >>> import torch
        >>> from torch.ao.quantization import FakeQuantize, MinMaxObserver
        >>> x = torch.randn(4, 8)
        >>> torch.equal(CpuFakeQuantize(MinMaxObserver)(x), FakeQuantize(MinMaxObserver)(x))
        True
    """
