"""torchao compatibility, kept apart: patches to torchao's private helpers, each feature-detected.

Every patch here checks that the names it replaces exist (this torchao release's layout) and changes
nothing otherwise; each is applied inside our own calls only and undone after.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx

from lightning_quant.quantization.warnings import known_torch_warnings_silenced

_aten = torch.ops.aten
#: pattern graphs torchao exported once in this process, by what determines them
_PATTERNS: dict[Any, torch.fx.GraphModule] = {}


def _pattern_key(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    """What a pattern graph depends on: the pattern's code and captured values, and the shapes and
    dtypes (not the values) of its example inputs. ``None`` when something is not hashable."""

    def shape(value: Any) -> Any:
        return ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

    try:
        cells = tuple(c.cell_contents for c in (pattern.__closure__ or ()))
        key = (
            pattern.__code__,
            cells,
            tuple(shape(x) for x in example_inputs),
            is_cuda,
            tuple(sorted((k, shape(v)) for k, v in kwargs.items())),
        )
        hash(key)
    except (AttributeError, TypeError, ValueError):
        return None
    return key


@contextlib.contextmanager
def quicker_conv_bn_folding() -> Iterator[None]:
    """Make torchao's QAT conv-BN folding affordable, without changing what it computes.

    On every prepare and convert, torchao 0.18 exports ~100 small pattern graphs with
    ``torch.export`` (every conv type x bias x per-channel x BN-mode combination), about 25 s
    on a 2-core CPU, even for conv types the model does not have. Here, inside our calls only:
    pattern graphs are kept for the process (keyed by the pattern's code, captured values and
    input shapes; a copy is handed out each time), and the folding of a conv type absent from the
    graph is skipped. When torchao's private names differ (another release), nothing is changed.
    """
    try:
        from torchao.quantization.pt2e import qat_utils
    except ImportError:
        yield
        return
    export_pattern = getattr(qat_utils, "_get_aten_graph_module_for_pattern", None)
    fold_helper = getattr(qat_utils, "_fold_conv_bn_qat_helper", None)
    duplicate_dequantize = getattr(qat_utils, "_duplicate_dequantize_node", None)
    if export_pattern is None or fold_helper is None or duplicate_dequantize is None:
        yield
        return
    import torch.nn.functional as F

    conv_ops = {
        F.conv1d: _aten.conv1d.default,
        F.conv2d: _aten.conv2d.default,
        F.conv_transpose1d: _aten.conv_transpose1d.default,
        F.conv_transpose2d: _aten.conv_transpose2d.input,
    }

    def cached_pattern(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])

    def fold_present(m: torch.fx.GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> Any:
        op = conv_ops.get(conv_fn)
        if op is not None and not any(n.target is op for n in m.graph.nodes):
            m.graph.eliminate_dead_code()
            m.recompile()
            duplicate_dequantize(m)
            return m
        return fold_helper(m, conv_fn, example_inputs, is_cuda)

    qat_utils._get_aten_graph_module_for_pattern = cached_pattern
    qat_utils._fold_conv_bn_qat_helper = fold_present
    try:
        yield
    finally:
        qat_utils._get_aten_graph_module_for_pattern = export_pattern
        qat_utils._fold_conv_bn_qat_helper = fold_helper


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """torchao logs warnings as it is first imported (CUDA/MX kernels it cannot load on a CPU build,
    no Triton, an Enum registration torch calls deprecated); none concern a user on CPU. Raised to
    ERROR for the first import only, and restored."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_pt2e() -> None:
    """Import torchao's pt2e (which registers the ``quantized_decomposed`` ops pt2e programs call)."""
    if "torchao.quantization.pt2e.quantize_pt2e" not in sys.modules:
        with _quiet_torchao_import(), known_torch_warnings_silenced():
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
