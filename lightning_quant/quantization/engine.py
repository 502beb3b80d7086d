"""Where int8 code runs: the quantized engine selected around a block, and a converted model made an inference artifact.

The lowest module of conversion: the flows and :mod:`~lightning_quant.quantization.convert` both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run int8 code in the block: select ``engine`` and lift deterministic-algorithms mode.

    Quantized kernels have no deterministic implementation, so under a Trainer with
    ``deterministic=True`` they raise; the mode is lifted inside the block only. The previous
    engine and mode are restored on exit.
    """
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"this torch build has no {engine!r} quantized engine; "
            f"it supports {torch.backends.quantized.supported_engines}"
        )
    previous = torch.backends.quantized.engine
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.quantized.engine = engine
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def for_inference(model: nn.Module) -> nn.Module:
    """An int8 model is an inference artifact: eval mode and no parameter that asks for gradients
    (layers kept in float included)."""
    return model.eval().requires_grad_(False)
