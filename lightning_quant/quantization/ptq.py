"""Post-training quantization of any ``nn.Module``: static (calibrate, convert) or dynamic."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from lightning_quant.analysis import SkipSearch, quantizable_layers, skip_search
from lightning_quant.quantization.calibrate import calibrate
from lightning_quant.quantization.config import QuantizationConfig, check_non_negative, check_positive_int, parse_enum
from lightning_quant.quantization.convert import convert_copy
from lightning_quant.quantization.dynamic import DEFAULT_DYNAMIC_TYPES, check_dynamic_options, quantize_dynamic_copy
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.inputs import ExampleInputs, batch_inputs, batch_targets

log = logging.getLogger(__name__)


class Mode(str, Enum):
    """Post-training modes: static (calibrated activations) or dynamic (activations quantized at run time)."""

    STATIC = "static"
    DYNAMIC = "dynamic"


MODES = tuple(m.value for m in Mode)


def _has_quantized_modules(model: nn.Module) -> bool:
    return any(
        type(m).__module__.startswith("torch.ao.nn.quantized")
        and not type(m).__name__.startswith(("Quantize", "DeQuantize"))
        for m in model.modules()
    )


def prepare_and_calibrate(
    model: nn.Module,
    calibration_data: Iterable[Any],
    config: QuantizationConfig,
    calibration_batches: int = 32,
    batch_to_input: Optional[Callable[[Any], Any]] = None,
    example: Optional[ExampleInputs] = None,
    progress: bool = True,
) -> nn.Module:
    """A prepared copy of ``model`` whose observers have seen ``calibration_batches`` batches.

    Convert it with :func:`~lightning_quant.quantization.convert.convert_copy` for each engine
    needed; ``model`` itself is not modified.

    Raises:
        ValueError: no calibration batch.
        NonFiniteError: NaN/Inf in the inputs or a layer's output (named).
    """
    batches = iter(calibration_data)
    if example is None:
        first = next(batches, None)
        if first is None:
            raise ValueError(
                "calibration data yielded no batch: it is empty or an iterator that was already "
                "consumed; pass a DataLoader or a list of batches"
            )
        example = batch_inputs(first, batch_to_input).to("cpu")
        batches = _chain_first(first, batches)
    float_copy = copy.deepcopy(model).cpu().eval()
    prepared = get_flow(config.flow).prepare(float_copy, config, example, qat=False)
    used = calibrate(prepared, batches, calibration_batches, batch_to_input, progress)
    log.info("calibrated on %d batch(es)", used)
    return prepared


def convert_calibrated(prepared: nn.Module, config: QuantizationConfig, engine: Optional[str] = None) -> nn.Module:
    """Convert a calibrated model for ``engine`` (default: the backend's), checking something was quantized.

    Raises:
        ValueError: no layer was converted to int8.
    """
    int8 = convert_copy(prepared, config.flow, engine or config.engine)
    if not _has_quantized_modules(int8):
        raise ValueError(
            "nothing to quantize statically: no layer was converted to int8 (static mode quantizes Conv, "
            'Linear and their fusions); check skip, or use mode="dynamic" for LSTM/GRU models'
        )
    return int8


STATIC_LAYER_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def builder(
    model: nn.Module,
    config: QuantizationConfig,
    mode: Mode,
    calibration_data: Optional[Iterable[Any]],
    calibration_batches: int,
    batch_to_input: Optional[Callable[[Any], Any]],
    dtype: str,
    module_types: Sequence[Union[str, type]],
    progress: bool = False,
) -> Callable[[list[str]], nn.Module]:
    """A function from an extra skip list to the int8 model (static mode recalibrates each time)."""
    types = check_dynamic_options(dtype, module_types) if mode is Mode.DYNAMIC else ()

    def build(extra_skip: list[str]) -> nn.Module:
        skipped = dataclasses.replace(config, skip=tuple(config.skip) + tuple(extra_skip), export=None)
        if mode is Mode.DYNAMIC:
            return quantize_dynamic_copy(model, skipped, types, dtype)
        if calibration_data is None:
            raise ValueError('mode="static" needs calibration_data: an iterable of representative batches')
        prepared = prepare_and_calibrate(
            model, calibration_data, skipped, calibration_batches, batch_to_input, progress=progress
        )
        return convert_calibrated(prepared, skipped)

    return build


def quantize_within_budget(
    model: nn.Module,
    build: Callable[[list[str]], nn.Module],
    batches: Sequence[Any],
    engine: str,
    max_metric_drop: float,
    layer_types: Sequence[type],
    batch_to_input: Optional[Callable[[Any], Any]] = None,
) -> tuple[nn.Module, SkipSearch]:
    """The int8 model with the fewest float islands that keeps the score within ``max_metric_drop``.

    Returns:
        the int8 model (with every candidate in float if even that misses the budget: check
        ``search.met``) and the :class:`~lightning_quant.analysis.SkipSearch`.
    """
    check_non_negative(max_metric_drop, "max_metric_drop", allow_none=True)
    targets = batch_targets(batches)
    layers = quantizable_layers(model, layer_types)
    search, _ = skip_search(model, build, layers, batches, engine, max_metric_drop, targets, batch_to_input)
    return build(list(search.skipped)), search


def _chain_first(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def quantize(
    model: nn.Module,
    calibration_data: Optional[Iterable[Any]] = None,
    mode: str = "static",
    backend: str = "x86",
    flow: str = "fx",
    observer: str = "histogram",
    per_channel: Optional[bool] = None,
    skip: Sequence[Union[str, type]] = (),
    qconfig_mapping: Any = None,
    calibration_batches: int = 32,
    batch_to_input: Optional[Callable[[Any], Any]] = None,
    dtype: str = "qint8",
    module_types: Sequence[Union[str, type]] = DEFAULT_DYNAMIC_TYPES,
    progress: bool = True,
    max_metric_drop: Optional[float] = None,
    eval_data: Optional[Iterable[Any]] = None,
    eval_batches: int = 16,
) -> nn.Module:
    """Return an int8 copy of ``model``, quantized after training; ``model`` is not modified.

    Args:
        model: any ``nn.Module`` (a Hugging Face model too).
        calibration_data: an iterable of batches (a DataLoader, a list); required for static
            mode, ignored (may be ``None``) for dynamic mode. The model input is read from each
            batch as Lightning users expect (tensor, first item of a tuple, mapping as keyword
            arguments) or by ``batch_to_input``.
        mode: ``"static"`` (default: calibrated int8 activations) or ``"dynamic"``.
        backend, flow, observer, per_channel, skip, qconfig_mapping: as for
            :class:`~lightning_quant.QuantizationAwareTraining`. ``observer`` defaults to
            ``"histogram"`` here: with a few calibration batches it clips outliers best.
        calibration_batches: batches used for calibration (default 32).
        batch_to_input: callable from a batch to the model input.
        dtype: dynamic mode: ``"qint8"`` (default) or ``"float16"`` weights.
        module_types: dynamic mode: module types to quantize (default Linear, LSTM, GRU).
        progress: show a progress bar while calibrating.
        max_metric_drop: keep the most sensitive layers in float until the int8 model is within
            this much of the float model on ``eval_data``: top-1 accuracy when batches carry
            targets ``(input, target)``, else mean cosine similarity of outputs (float = 1.0).
            ``None`` (default) quantizes every layer. See :func:`quantize_within_budget`.
        eval_data: batches for that score (default: the calibration data); ``eval_batches`` of them.

    Raises:
        ValueError: an invalid option, empty calibration data, or nothing to quantize.
        NonFiniteError: NaN/Inf met during calibration, naming the layer.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> int8 = quantize(net, [torch.randn(8, 4) for _ in range(4)], progress=False)
        >>> int8(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    mode = parse_enum(Mode, mode, "mode")
    config = QuantizationConfig(
        backend=backend,
        flow=flow,
        observer=observer,
        per_channel=per_channel,
        skip=skip,
        qconfig_mapping=qconfig_mapping,
        export=None,
    )
    calibration_batches = check_positive_int(calibration_batches, "calibration_batches")
    if max_metric_drop is not None:
        data = eval_data if eval_data is not None else calibration_data
        if data is None:
            raise ValueError("max_metric_drop needs eval_data (or calibration_data) to measure the drop on")
        batches = list(itertools.islice(iter(data), eval_batches))
        build = builder(model, config, mode, calibration_data, calibration_batches, batch_to_input, dtype, module_types)
        types = check_dynamic_options(dtype, module_types) if mode is Mode.DYNAMIC else STATIC_LAYER_TYPES
        int8, search = quantize_within_budget(
            model, build, batches, config.engine, max_metric_drop, types, batch_to_input
        )
        log.info("int8 within budget: %s; layers kept in float: %s", search.met, search.skipped)
        return int8
    return builder(
        model, config, mode, calibration_data, calibration_batches, batch_to_input, dtype, module_types, progress
    )([])
