"""Silence the warnings torch raises for its own quantization APIs, only around our calls.

torch 2.13 marks ``torch.ao.quantization`` deprecated and warns on every prepare/convert;
the observers it builds warn about ``reduce_range``; TorchScript warns that scripting is
deprecated. Users cannot act on these, so :func:`known_torch_warnings_silenced` hides
exactly these messages inside a ``warnings.catch_warnings`` block and nothing else: any
other warning still reaches the user, and the global filters are untouched on exit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

#: (category, regex on the start of the message) of every warning we silence.
KNOWN_TORCH_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
    (UserWarning, r"must run observer before calling calculate_qparams"),
    (DeprecationWarning, r"`torch\.jit\.script` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.trace` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.save` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.load` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.freeze` is deprecated"),
    (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    (UserWarning, r"Exporting a model to ONNX with a batch_size other than 1"),
    (DeprecationWarning, r"Lite Interpreter is deprecated"),
    (UserWarning, r"Lite Interpreter is deprecated"),
    (DeprecationWarning, r"The feature will be removed\. Please remove usage of this function"),
)


@contextlib.contextmanager
def known_torch_warnings_silenced() -> Iterator[None]:
    """Hide the known torch quantization/TorchScript warnings for the duration of the block."""
    with warnings.catch_warnings():
        for category, message in KNOWN_TORCH_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
