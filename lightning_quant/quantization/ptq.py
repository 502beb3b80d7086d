"""Post-training quantization of any ``nn.Module``: static (calibrate, convert) or dynamic."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization import flows
from lightning_quant.quantization.arguments import (
    MODE_OPTIONS,
    RECIPE_OPTIONS,
    SEARCH_NAMES,
    SEARCH_OPTIONS,
    Search,
    resolve,
    search_options,
    take_deprecated,
)
from lightning_quant.quantization.calibrate import calibrate
from lightning_quant.quantization.config import (
    Flow,
    LayerSetting,
    Precision,
    QuantizationConfig,
    Scheme,
)
from lightning_quant.quantization.convert import convert_copy, for_inference, quantized_engine
from lightning_quant.quantization.distributed import RankReducer, reduce_observers
from lightning_quant.quantization.flows import ChecksModel, QuantizesWithoutData, capable, get_flow
from lightning_quant.quantization.flows.dynamic import (
    DEFAULT_DYNAMIC_TYPES,
    DYNAMIC_PRECISIONS,
    check_dynamic_options,
    dynamic_spec,
)
from lightning_quant.quantization.flows.spec import DEFAULT_FLOW, SPECS, FlowSpec, flows_with, spec_of, spelled
from lightning_quant.quantization.inputs import (
    ExampleInputs,
    batch_inputs,
    batch_reader,
    batch_targets,
    check_call,
    required_inputs,
)
from lightning_quant.quantization.layers import STATIC_PRECISIONS, check_static_setting, resolve_layers
from lightning_quant.quantization.options import MODE_SCHEMES, Mode
from lightning_quant.quantization.recipe import attach, static_recipe
from lightning_quant.quantization.search import (
    LatencySearch,
    PrecisionSearch,
    SkipSearch,
    budget_search,
    check_precision_ladder,
    latency_search,
    quantizable_layers,
)
from lightning_quant.utils.checks import (
    check_bool,
    check_callable,
    check_non_negative,
    check_positive_int,
    parse_enum,
)
from lightning_quant.utils.modules import within
from lightning_quant.utils.timing import median_ms

log = logging.getLogger(__name__)


MODES = tuple(m.value for m in Mode)

#: what each mode computes, for messages
MODE_MEANINGS = {
    Mode.STATIC: "int8 activations with ranges calibrated ahead of time",
    Mode.DYNAMIC: "activations quantized at run time",
    Mode.WEIGHT_ONLY: "int8/int4 weights, float activations",
}

#: the torchao scheme each post-training mode takes when none is named


def recipe_mode(config: QuantizationConfig, mode: Mode) -> Mode:
    """The mode a torchao config given as ``recipe=`` implies (weight-only or dynamic), where the call left
    ``mode`` at its default (static, which torchao's configs do not have)."""
    if "scheme" in spec_of(config.flow).options and config.recipe is not None and mode is Mode.STATIC:
        return Mode.DYNAMIC if Scheme(config.scheme).dynamic else Mode.WEIGHT_ONLY
    return mode


def check_flow_mode(mode: Mode, flow: Flow | str) -> FlowSpec:
    """The declaration of ``flow``, after checking it runs ``mode``.

    Raises:
        ValueError: naming the flows that run ``mode`` and the modes ``flow`` runs.
    """
    spec = spec_of(flow)
    if mode not in spec.modes:
        able = [s.flow.value for s in SPECS.values() if mode in s.modes]
        raise ValueError(
            f"mode={mode.value!r} ({MODE_MEANINGS[mode]}) runs on flow={spelled(able)}: set flow={able[0]!r}; "
            f"flow={spec.flow.value!r} runs mode={spelled(spec.modes)}"
        )
    return spec


def mode_config(config: QuantizationConfig, mode: Mode) -> QuantizationConfig:
    """``config`` with the torchao scheme ``mode`` implies, after checking that mode, flow and scheme agree.

    Raises:
        ValueError: ``mode="weight_only"`` off the torchao flow, ``mode="static"`` on it, a scheme of
            the other mode, or ``range_learning`` (trained ranges need training).
    """
    spec = check_flow_mode(mode, config.flow)
    if config.range_learning:
        raise ValueError(
            "range_learning=True trains each weight's scales with the optimizer during QAT; after training there is "
            "nothing to learn them with: use it with QuantizationAwareTraining, or leave it out (post-training "
            "scales come from each weight; algorithm='awq' chooses them from calibration batches)"
        )
    if "scheme" not in spec.options:
        return config
    if config.scheme is None:
        config = dataclasses.replace(config, scheme=MODE_SCHEMES[mode])
    elif Scheme(config.scheme).dynamic != (mode is Mode.DYNAMIC):
        allowed = [s.value for s in Scheme if s.dynamic == (mode is Mode.DYNAMIC)]
        raise ValueError(
            f"scheme={Scheme(config.scheme).value!r} is not a {mode.value} scheme; mode={mode.value!r} takes {allowed}"
        )
    get_flow(config.flow).check(config)
    return config


def calibrates(mode: Mode, config: QuantizationConfig) -> bool:
    """Whether a post-training run of ``mode`` and ``config`` reads calibration batches: static ranges, or a
    torchao algorithm (AWQ, SmoothQuant) that chooses the weights from the activations it sees."""
    return mode is Mode.STATIC or config.algorithm is not None


def calibrated_by(mode: Mode, config: QuantizationConfig) -> str:
    """What reads the calibration batches, for messages: ``mode="static"`` or ``algorithm='awq'``."""
    return f"algorithm={config.algorithm.value!r}" if config.algorithm is not None else f'mode="{mode.value}"'


def uncalibrated_copy(
    model: nn.Module,
    config: QuantizationConfig,
    module_types: Sequence[str | type] = (),
    dtype: str = "qint8",
    engine: str | None = None,
    allow_float: bool = False,
) -> nn.Module:
    """An int8 copy of ``model`` in a mode that needs no calibration (torch.ao's dynamic int8, torchao's schemes),
    from the flow that runs it (:class:`~lightning_quant.quantization.flows.QuantizesWithoutData`); ``model``
    itself is not modified.

    Raises:
        ValueError: nothing to quantize, or a setting the model cannot take (see the flow).
    """
    flow = capable(config.flow, QuantizesWithoutData)
    assert flow is not None, f"flow={config.flow.value!r} has no mode without calibration"
    types = check_dynamic_options(dtype, module_types) if "module_types" in spec_of(config.flow).options else ()
    return for_inference(flow.quantize_without_data(model, config, types, dtype, engine, allow_float))


def prepare_and_calibrate(
    model: nn.Module,
    calibration_data: Iterable[Any],
    config: QuantizationConfig,
    calibration_batches: int = 32,
    batch_to_input: Callable[[Any], Any] | None = None,
    example: ExampleInputs | None = None,
    progress: bool = True,
    reducer: RankReducer | None = None,
) -> nn.Module:
    """A prepared copy of ``model`` whose observers have seen ``calibration_batches`` batches.

    Convert it with :func:`~lightning_quant.quantization.convert.convert_copy` for each engine
    needed; ``model`` itself is not modified. With a ``reducer`` (several processes, each
    calibrating on its shard: ``calibration_batches`` is per rank), the observers end with the
    statistics of every rank's batches together, the same on every rank.

    Raises:
        ValueError: no calibration batch.
        NonFiniteError: NaN/Inf in the inputs or a layer's output (named).
    """
    batches: Iterable[Any] = iter(calibration_data)
    if example is None:
        example, batches = first_example(batches, batch_to_input)
        check_call(model, example, "the first calibration batch")
    float_copy = copy.deepcopy(model).cpu().eval()
    prepared = get_flow(config.flow).prepare(float_copy, config, example, qat=False)
    attach(prepared, static_recipe(config, example, qat=False))
    used = calibrate(prepared, batches, calibration_batches, batch_to_input, progress)
    merged = reduce_observers(prepared, reducer)
    log.info("calibrated on %d batch(es)%s", used, f"; merged {merged} observers over the ranks" if reducer else "")
    return prepared


def convert_calibrated(prepared: nn.Module, config: QuantizationConfig, engine: str | None = None) -> nn.Module:
    """Convert a calibrated model for ``engine`` (default: the backend's), checking something was quantized.

    Raises:
        ValueError: no layer was converted to int8.
    """
    int8 = convert_copy(prepared, config.flow, engine or config.engine)
    if not flows.has_int8_layers(int8):
        raise ValueError(
            "nothing to quantize statically: no layer was converted to int8 (static mode quantizes Conv, "
            'Linear and their fusions); check skip, or use mode="dynamic" for LSTM/GRU models'
        )
    return int8


STATIC_LAYER_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_mode_options(
    mode: Mode, dtype: str, module_types: Sequence[str | type], flow: Flow | str = DEFAULT_FLOW
) -> tuple[type, ...]:
    """Validate the options that belong to one mode; returns the dynamic mode's module types.

    ``dtype`` and ``module_types`` say what dynamic mode quantizes; static mode quantizes
    Conv/Linear (and their fusions) with calibrated activations and takes neither.

    Raises:
        ValueError: an invalid value, a dynamic-mode option set for ``mode="static"``, or
            ``mode="dynamic"`` with ``flow="pt2e"``.
    """
    spec = check_flow_mode(mode, flow)
    types = check_dynamic_options(dtype, module_types)
    given = [
        name
        for name, changed in (("dtype", dtype != "qint8"), ("module_types", types != DEFAULT_DYNAMIC_TYPES))
        if changed
    ]
    if given and "module_types" not in spec.options:
        raise ValueError(
            f"{given} are options of torch.ao's dynamic mode (flow={spelled(flows_with('module_types'))}); "
            f"flow={spec.flow.value!r} quantizes Linear layers (and embeddings named in layers=) in its scheme: say "
            "int4/int8/float per layer with layers=, or leave them out"
        )
    if given and mode is Mode.STATIC:
        raise ValueError(
            f"{given} are options of mode='dynamic', but mode='static' (which quantizes Conv/Linear with "
            "calibrated activations): set mode='dynamic', or leave them out"
        )
    return types


def check_layers(
    model: nn.Module, config: QuantizationConfig, mode: Mode, module_types: tuple[type, ...], dtype: str
) -> None:
    """Check ``config.layers`` (and ``skip``) against ``model`` and what ``mode`` can run, before any work.

    Raises:
        ValueError: a key the model lacks, or a precision/dtype/option the mode or flow cannot run.
    """
    checker = capable(config.flow, ChecksModel)
    if checker is not None:
        checker.check_model(model, config)
        return
    if mode is Mode.DYNAMIC:
        dynamic_spec(model, config, module_types, dtype)
        return
    for key, setting in resolve_layers(model, config).items():
        check_static_setting(key, setting, config.flow.value)


def check_calibration_data(data: Any, name: str = "calibration_data") -> None:
    """Refuse, before any training, calibration data that would yield no batch when its time comes.

    Raises:
        ValueError: ``data`` is a one-shot iterator (used once, it is empty the next time) or empty.
    """
    if iter(data) is data:
        raise ValueError(
            f"{name} is an iterator ({type(data).__name__}), which is empty once read: pass a list of batches or a "
            "DataLoader, which can be read again"
        )
    if isinstance(data, Sized) and len(data) == 0:
        raise ValueError(f"{name} is empty ({type(data).__name__} of length 0): give it representative batches")


def builder(
    model: nn.Module,
    config: QuantizationConfig,
    mode: Mode,
    calibration_data: Iterable[Any] | None,
    calibration_batches: int,
    batch_to_input: Callable[[Any], Any] | None,
    dtype: str,
    module_types: Sequence[str | type],
    progress: bool = False,
    reducer: RankReducer | None = None,
) -> Callable[[Any], nn.Module]:
    """A function to the int8 model from layers to keep in float (a list, added to ``skip``) or
    from ``{layer: precision}`` (added to ``layers``); static mode recalibrates each time."""
    types = (
        check_dynamic_options(dtype, module_types)
        if mode is Mode.DYNAMIC and "module_types" in spec_of(config.flow).options
        else ()
    )

    def build(extra: Sequence[str] | Mapping[str, str]) -> nn.Module:
        if isinstance(extra, Mapping):
            rules = tuple(config.layers) + tuple((name, LayerSetting(Precision(p))) for name, p in extra.items())
            skipped = dataclasses.replace(config, layers=rules, export=())
        else:
            skipped = dataclasses.replace(config, skip=tuple(config.skip) + tuple(extra), export=())
        if not calibrates(mode, config):  # no calibration: the flow quantizes from the weights alone
            return uncalibrated_copy(model, skipped, types or module_types, dtype, allow_float=bool(extra))
        if calibration_data is None:
            raise ValueError(
                f"{calibrated_by(mode, config)} needs calibration_data: an iterable of representative batches"
            )
        prepared = prepare_and_calibrate(
            model, calibration_data, skipped, calibration_batches, batch_to_input, progress=progress, reducer=reducer
        )
        return convert_calibrated(prepared, skipped)

    return build


def first_example(
    calibration_data: Iterable[Any], batch_to_input: Callable[[Any], Any] | None
) -> tuple[ExampleInputs, Iterable[Any]]:
    """The model inputs of the first batch (on CPU), and the batches with that one still first.

    Raises:
        ValueError: no batch.
    """
    batches = iter(calibration_data)
    first = next(batches, None)
    if first is None:
        raise ValueError(
            "calibration data yielded no batch: it is empty or an iterator that was already "
            "consumed; pass a DataLoader or a list of batches"
        )
    return batch_inputs(first, batch_to_input).to("cpu"), _chain_first(first, batches)


def _chain_first(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def quantize(
    model: nn.Module,
    calibration_data: Iterable[Any] | None = None,
    recipe: Any = None,
    *,
    calibration_batches: int = 32,
    batch_to_input: Callable[[Any], Any] | None = None,
    eval_data: Iterable[Any] | None = None,
    search: Search | Mapping[str, Any] | None = None,
    progress: bool = True,
    **deprecated: Any,
) -> nn.Module:
    """Return an int8 copy of ``model``, quantized after training; ``model`` is not modified.

    Args:
        model: any ``nn.Module`` (a Hugging Face model too).
        calibration_data: an iterable of batches (a DataLoader, a list); required for static
            mode, ignored (may be ``None``) for dynamic mode. The model input is read from each
            batch as Lightning users expect (tensor, first item of a tuple, mapping as keyword
            arguments; for ``forward(x, mask)``, the first two items of a tuple) or by ``batch_to_input``.
        recipe: how the model is quantized, on which stack and in which mode, as for
            :class:`~lightning_quant.PostTrainingQuantization`: a recipe (``FxRecipe``, ``EagerRecipe``,
            ``Pt2eRecipe``: static; ``DynamicRecipe``; ``TorchaoRecipe``: its scheme's mode), a stack's own
            object (an ``AOBaseConfig``, a pt2e ``Quantizer``, a ``QConfigMapping``) or a shorthand (``"x86"``,
            ``"dynamic"``, ``"int8_weight_only"``...). Default: ``FxRecipe()`` with the ``"histogram"`` observer,
            which clips outliers best with a few calibration batches.
        calibration_batches: batches used for calibration (default 32).
        batch_to_input: callable from a batch to the model input.
        eval_data: batches the search scores on (default: the calibration data).
        search: a :class:`~lightning_quant.Search`: keep the most sensitive layers at a more exact precision
            until the int8 model is within ``max_metric_drop`` of the float model on ``eval_data`` (top-1
            accuracy when batches carry targets ``(input, target)``, else mean output cosine), fit
            ``max_size_bytes``, or keep float the layers where int8 is slower (``latency``, static fx).
            :func:`quantize_within_budget` does the same and also returns the search.
        progress: show a progress bar while calibrating.
        **deprecated: the previous release's keyword arguments (``mode``, ``backend``, ``flow``, ``observer``,
            ``per_channel``, ``skip``, ``layers``, ``qconfig_mapping``, ``dtype``, ``module_types``, ``scheme``,
            ``group_size``, ``config``, ``max_metric_drop``, ``eval_batches``, ``search_precisions``,
            ``max_size_bytes``, ``search_score``, ``search_latency``), with a ``DeprecationWarning``.

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
    int8, _ = _quantize(_arguments("quantize", dict(locals())))
    return int8


#: how :func:`quantize` reads, for messages
QUANTIZE_FORM = "model, calibration_data, recipe, calibration_batches, batch_to_input, eval_data, search, progress"


def _arguments(owner: str, call: dict[str, Any]) -> dict[str, Any]:
    """The arguments of :func:`quantize` by the names its body reads: the recipe resolved, the search spread."""
    deprecated = call.pop("deprecated")
    legacy = take_deprecated(owner, deprecated, {**RECIPE_OPTIONS, **MODE_OPTIONS, **SEARCH_OPTIONS}, QUANTIZE_FORM)
    resolved = resolve(owner, call.pop("recipe"), legacy, {}, "histogram")
    searched = search_options(call.pop("search"), legacy, owner)
    return {
        **call,
        **searched,
        "config": resolved.config,
        "mode": resolved.mode,
        "dtype": resolved.dtype,
        "module_types": resolved.module_types,
    }


def quantize_within_budget(
    model: nn.Module,
    calibration_data: Iterable[Any] | None = None,
    *,
    max_metric_drop: float | None = None,
    max_size_bytes: int | None = None,
    **options: Any,
) -> tuple[nn.Module, SkipSearch | PrecisionSearch]:
    """:func:`quantize` with the sensitivity search, returning the int8 model and the search.

    Everything is quantized first; if that misses ``max_metric_drop``, each candidate layer is
    quantized alone and scored, and the most sensitive are kept in float one at a time until
    the budget holds (or every candidate is float: check ``search.met``).

    Args:
        model, calibration_data: as for :func:`quantize`.
        max_metric_drop: the budget (accuracy points, or cosine without targets).
        **options: any other argument of :func:`quantize` (``mode``, ``eval_data``, ``config``...).

    Returns:
        the int8 model and the :class:`~lightning_quant.SkipSearch` (``skipped``: the layers
        kept in float; ``history``: the score after each step; ``met``).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> int8, search = quantize_within_budget(net, recipe="dynamic", max_metric_drop=0.1,
        ...                                       eval_data=[torch.randn(8, 4)])
        >>> search.met
        True
    """
    if max_metric_drop is None and max_size_bytes is None:
        raise ValueError("quantize_within_budget needs max_metric_drop or max_size_bytes (or both)")
    arguments = inspect.signature(quantize).bind(model, calibration_data, **options)
    arguments.apply_defaults()
    call = dict(arguments.arguments)
    budget = {"max_metric_drop": max_metric_drop, "max_size_bytes": max_size_bytes}
    given = call["search"]
    if given is not None:
        given = Search(**dict(given)) if isinstance(given, Mapping) else given
        call["search"] = dataclasses.replace(given, **budget)
    else:
        call["deprecated"] = {**call["deprecated"], **budget}  # spread like the previous release's search options
        searched = search_options(None, call["deprecated"], "quantize_within_budget")
        call["deprecated"] = {k: v for k, v in call["deprecated"].items() if k not in SEARCH_OPTIONS}
        call["search"] = Search(**{SEARCH_NAMES[k]: v for k, v in searched.items()})
    int8, search = _quantize(_arguments("quantize_within_budget", call))
    assert search is not None  # a budget is set, so the search ran
    return int8, search


def _quantize(args: dict[str, Any]) -> tuple[nn.Module, SkipSearch | PrecisionSearch | None]:
    """The body of :func:`quantize`: ``args`` are its arguments by name."""
    mode = parse_enum(Mode, args["mode"], "mode")
    config = args["config"]
    get_flow(config.flow).check(config)
    config = dataclasses.replace(config, export=())
    mode = recipe_mode(config, mode)
    config = mode_config(config, mode)
    calibration_batches = check_positive_int(args["calibration_batches"], "calibration_batches")
    max_metric_drop = check_non_negative(args["max_metric_drop"], "max_metric_drop", allow_none=True)
    eval_batches = check_positive_int(args["eval_batches"], "eval_batches")
    check_callable(args["batch_to_input"], "batch_to_input")
    model, calibration_data, batch_to_input = args["model"], args["calibration_data"], args["batch_to_input"]
    dtype, module_types = args["dtype"], args["module_types"]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # a forward of several inputs, forward(x, mask), reads a batch (x, mask, target...): the target follows them
    inputs = required_inputs(model) if batch_to_input is None else 1
    batch_to_input = batch_to_input or batch_reader(model)
    check_mode_options(mode, dtype, module_types, config.flow)
    ladder = check_precision_ladder(args["search_precisions"], search_precisions_of(mode, config.flow))
    max_size_bytes = check_positive_int(args["max_size_bytes"], "max_size_bytes", allow_none=True)
    searching = max_metric_drop is not None or max_size_bytes is not None
    latency = check_search_latency(args["search_latency"], mode, config.flow)
    build = builder(
        model,
        config,
        mode,
        calibration_data,
        calibration_batches,
        batch_to_input,
        dtype,
        module_types,
        progress=args["progress"] and not searching,  # no bar for each of the search's builds
    )
    if not searching:
        if latency:
            return _fastest(
                model, calibration_data, config, calibration_batches, batch_to_input, args["progress"]
            ), None
        return build([]), None
    data = args["eval_data"] if args["eval_data"] is not None else calibration_data
    if data is None:
        budget = "max_metric_drop" if max_metric_drop is not None else "max_size_bytes"
        raise ValueError(f"{budget} needs eval_data (or calibration_data) to measure the drop on")
    batches = list(itertools.islice(iter(data), eval_batches))
    layers = search_candidates(model, config, mode, module_types, dtype)
    search, _ = budget_search(
        model,
        build,
        layers,
        batches,
        config.engine,
        max_metric_drop,
        search_targets(batches, args["search_score"], inputs),
        batch_to_input,
        ladder=ladder,
        max_size_bytes=max_size_bytes,
    )
    log.info("int8 within budget: %s; layers: %s", search.met, search.layers)
    chosen = search.layers if isinstance(search, PrecisionSearch) else list(search.skipped)
    if latency:
        float_layers = [name for name, p in search.layers.items() if p == "float"]
        within = dataclasses.replace(config, skip=tuple(config.skip) + tuple(float_layers))
        return _fastest(model, calibration_data, within, calibration_batches, batch_to_input, False), search
    return build(chosen), search


def latency_of(module: nn.Module, example: ExampleInputs, engine: str, repeats: int = 20) -> float:
    """Median ms of ``module`` on ``example``: what the latency search minimises."""
    with quantized_engine(engine), torch.inference_mode():
        return median_ms(lambda: example(module), repeats, 3)


def _fastest(
    model: nn.Module,
    calibration_data: Iterable[Any] | None,
    config: QuantizationConfig,
    calibration_batches: int,
    batch_to_input: Callable[[Any], Any] | None,
    progress: bool,
) -> nn.Module:
    """Calibrate once, then :func:`search_fastest` over the fx int8 graph's boundary layers."""
    if calibration_data is None:
        raise ValueError('mode="static" needs calibration_data: an iterable of representative batches')
    example, batches = first_example(calibration_data, batch_to_input)
    prepared = prepare_and_calibrate(model, batches, config, calibration_batches, batch_to_input, example, progress)
    search = search_fastest(prepared, model, example, config.engine, config.flow)
    return convert_copy(prepared, config.flow, config.engine, search.kept_float)


def search_fastest(
    prepared: nn.Module, float_model: nn.Module, example: ExampleInputs, engine: str, flow: Flow | str = DEFAULT_FLOW
) -> LatencySearch:
    """:func:`latency_search` of a calibrated fx model: which of its boundary layers to keep float
    (their savings measured layer by layer, :func:`~lightning_quant.quantization.flows.fx.float_savings`),
    each model made by converting ``prepared`` again (no recalibration), timed on ``example``; logged."""
    from lightning_quant.quantization.flows.fx import boundary_layers, float_savings

    def run_ms(module: nn.Module) -> float:
        return latency_of(module, example, engine)

    def convert(names: list[str]) -> nn.Module:
        return convert_copy(prepared, flow, engine, names)

    with quantized_engine(engine):
        int8 = convert([])
        candidates = list(boundary_layers(int8))
        savings = float_savings(int8, convert(candidates), example) if candidates else {}
    fp32 = copy.deepcopy(float_model).cpu().eval()
    search = latency_search(convert, savings, run_ms, run_ms(fp32))
    log.info(
        "latency search: %d of %d boundary layer(s) kept float %s: int8 %.3g ms -> %.3g ms (fp32 %.3g ms, %.2fx)",
        len(search.kept_float),
        len(candidates),
        search.kept_float[:10],
        search.int8_ms,
        search.final_ms,
        search.fp32_ms,
        search.speedup,
    )
    return search


def check_search_latency(search_latency: Any, mode: Mode, flow: Flow) -> bool:
    """Validate ``search_latency``.

    Raises:
        TypeError: not a bool.
        ValueError: asked outside static mode on the fx flow.
    """
    wanted = check_bool(search_latency, "search_latency")
    if wanted and (mode is not Mode.STATIC or not spec_of(flow).keeps_float):
        able = [s.flow.value for s in SPECS.values() if s.keeps_float]
        raise ValueError(
            f"search_latency=True needs mode='static' and flow={spelled(able)} (whose conversion can leave layers "
            f"float without recalibrating), got mode={mode.value!r}, flow={Flow(flow).value!r}"
        )
    return wanted


SEARCH_SCORES = ("auto", "accuracy", "cosine")


def check_search_score(score: Any) -> str:
    """Validate what a search measures.

    Raises:
        ValueError: naming the scores there are.
    """
    if score not in SEARCH_SCORES:
        raise ValueError(f"search_score must be one of {SEARCH_SCORES}, got {score!r}")
    return str(score)


def search_targets(
    batches: Sequence[Any],
    score: str,
    inputs: int = 1,
    read: Callable[[Sequence[Any]], Any] | None = None,
) -> Any:
    """The targets the search scores against: ``None`` means cosine to the float outputs; a tuple batch's
    target is its item after the model's ``inputs`` inputs, or what ``read`` (a callback's reading of the
    step) finds.

    Raises:
        ValueError: an unknown score, or ``"accuracy"`` for batches without targets.
    """
    if check_search_score(score) == "cosine":
        return None
    targets = read(batches) if read is not None else batch_targets(batches, max(inputs, 1))
    if score == "accuracy" and targets is None:
        raise ValueError('search_score="accuracy" needs batches with targets; use "cosine" for these')
    return targets


def search_precisions_of(mode: Mode, flow: Flow | str = DEFAULT_FLOW) -> tuple[str, ...]:
    """What a search may give a layer in ``mode`` on ``flow``."""
    declared = spec_of(flow).search_precisions
    if declared is not None:
        return tuple(p.value for p in declared)
    return tuple(p.value for p in (DYNAMIC_PRECISIONS if mode is Mode.DYNAMIC else STATIC_PRECISIONS))


def search_candidates(
    model: nn.Module, config: QuantizationConfig, mode: Mode, module_types: Sequence[str | type], dtype: str
) -> list[str]:
    """The layers a search may change: what the mode quantizes, less those ``skip`` or ``layers`` name."""
    if "scheme" in spec_of(config.flow).options:  # a scheme quantizes Linear layers
        types: tuple[type, ...] = (nn.Linear,)
    else:
        types = check_dynamic_options(dtype, module_types) if mode is Mode.DYNAMIC else STATIC_LAYER_TYPES
    fixed = [key for key, _ in config.layers if isinstance(key, str)] + [k for k in config.skip if isinstance(k, str)]
    return [name for name in quantizable_layers(model, types) if within(name, fixed) is None]
