"""The calls' few arguments, and the keyword arguments of the previous release mapped onto them.

The callbacks and :func:`~lightning_quant.quantize` take a recipe (:mod:`~lightning_quant.quantization.flows.recipes`),
a schedule, calibration, a search, what to export and which submodule. Code written against the previous release
passed a stack's options one by one (``backend=``, ``flow=``, ``observer=``, ``scheme=``, the epoch schedule...);
those still work for this release: :func:`take_deprecated` maps them onto the same settings and warns with a
``DeprecationWarning`` that spells the new form.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_quant.quantization.config import DEFAULT_GROUP_SIZE, QuantizationConfig, config_from
from lightning_quant.quantization.flows.dynamic import DEFAULT_DYNAMIC_TYPES
from lightning_quant.quantization.flows.recipes import DynamicRecipe, Recipe, as_recipe, code_of
from lightning_quant.quantization.options import Mode
from lightning_quant.utils.checks import check_bool, check_non_negative, check_positive_int

#: the previous release's options of a stack, now a recipe's, with their defaults
RECIPE_OPTIONS: dict[str, Any] = {
    "backend": "x86",
    "flow": "fx",
    "observer": None,  # each call's own default (QAT: moving_average; post-training: histogram)
    "per_channel": None,
    "skip": (),
    "layers": None,
    "qconfig_mapping": None,
    "modules_to_fuse": None,
    "scheme": None,
    "group_size": DEFAULT_GROUP_SIZE,
    "config": None,
}
#: the previous release's post-training mode options, now a recipe's
MODE_OPTIONS: dict[str, Any] = {"mode": "static", "dtype": "qint8", "module_types": DEFAULT_DYNAMIC_TYPES}
#: the previous release's epoch schedule, now a ``QATSchedule``
SCHEDULE_OPTIONS: dict[str, Any] = {"quant_start_epoch": 0, "freeze_observers_epoch": None, "freeze_bn_epoch": None}
#: the previous release's search options, now a ``Search``
SEARCH_OPTIONS: dict[str, Any] = {
    "max_metric_drop": None,
    "eval_batches": 16,
    "search_precisions": None,
    "max_size_bytes": None,
    "search_score": "auto",
    "search_latency": False,
}
#: the new name of each search option
SEARCH_NAMES = {
    "max_metric_drop": "max_metric_drop",
    "eval_batches": "eval_batches",
    "search_precisions": "precisions",
    "max_size_bytes": "max_size_bytes",
    "search_score": "score",
    "search_latency": "latency",
}


def _call(name: str, options: Mapping[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={code_of(v)}" for k, v in options.items()) + ")"


def _recipe_text(given: Mapping[str, Any]) -> str | None:
    """The recipe the previous release's options mean, as code."""
    options = {k: v for k, v in given.items() if k in RECIPE_OPTIONS or k in MODE_OPTIONS or k == "recipe"}
    if not options:
        return None
    native = options.pop("recipe", None)
    flow = options.pop("flow", "fx")
    flow = str(getattr(flow, "value", flow))
    mode = options.pop("mode", "static")
    mode = str(getattr(mode, "value", mode))
    if native is not None:
        flow = type(as_recipe(native)).flow.value
    if flow == "torchao" or options.get("scheme") is not None:
        scheme = options.pop("scheme", None)
        keep = {k: v for k, v in options.items() if k in ("backend", "group_size", "layers", "skip")}
        return _call("TorchaoRecipe", {**({"config": native or scheme} if native or scheme else {}), **keep})
    if mode == "dynamic":
        keep = {
            k: v
            for k, v in options.items()
            if k in ("backend", "dtype", "module_types", "per_channel", "layers", "skip")
        }
        return _call("DynamicRecipe", keep)
    name = {"fx": "FxRecipe", "eager": "EagerRecipe", "pt2e": "Pt2eRecipe"}.get(flow, "FxRecipe")
    if name == "Pt2eRecipe":
        backend = options.pop("backend", None)
        options = {**({"quantizer": native or backend} if native or backend else {}), **options}
    options.pop("dtype", None), options.pop("module_types", None)
    return _call(name, options)


def take_deprecated(owner: str, given: Mapping[str, Any], accepted: Mapping[str, Any], new_form: str) -> dict[str, Any]:
    """The previous release's keyword arguments ``given`` to ``owner``, checked and warned about.

    Args:
        owner: the call, for messages.
        given: the keyword arguments the new signature did not take.
        accepted: the previous release's names this call still maps, with their defaults.
        new_form: how the new call reads, for the warning (``"recipe=..., schedule=..."``); ``{recipe}``,
            ``{schedule}`` and ``{search}`` in it are filled from the options given.

    Returns:
        ``given`` (only names of ``accepted``).

    Raises:
        TypeError: a name that neither the new signature nor the previous release had.
    """
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(
            f"{owner} got unexpected keyword arguments {unknown}; it takes {new_form.split('|')[0]} (and, from the "
            f"previous release, {sorted(accepted)})"
        )
    if given:
        warnings.warn(
            f"{owner}({', '.join(f'{k}=...' for k in given)}) is deprecated and will be removed in the next release: "
            f"write {owner}({_new_form(given)})",
            DeprecationWarning,
            stacklevel=3,
        )
    return dict(given)


def _new_form(given: Mapping[str, Any]) -> str:
    parts = []
    if "config" in given:
        parts.append("recipe=<a recipe>, module=..., export=..., export_dir=... (what the QuantizationConfig held)")
    recipe = _recipe_text({k: v for k, v in given.items() if k != "config"})
    if recipe:
        parts.append(f"recipe={recipe}")
    schedule = {k: v for k, v in given.items() if k in SCHEDULE_OPTIONS}
    if schedule:
        parts.append(f"schedule={_call('QATSchedule', schedule)}")
    search = {SEARCH_NAMES[k]: v for k, v in given.items() if k in SEARCH_OPTIONS}
    if search:
        parts.append(f"search={_call('Search', search)}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Resolved:
    """What a call's recipe (or the previous release's options) resolve to."""

    config: QuantizationConfig
    mode: Mode | str  # the previous release's mode= as given: the call parses it with its message
    dtype: str
    module_types: tuple[Any, ...]


def resolve(
    owner: str,
    recipe: Any,
    legacy: Mapping[str, Any],
    shared: Mapping[str, Any],
    observer: str,
) -> Resolved:
    """The config, post-training mode and dynamic options of a call.

    Args:
        owner: the call, for messages.
        recipe: its ``recipe=`` (a recipe, a stack's own object, a shorthand or ``None``).
        legacy: the previous release's options it was given (:func:`take_deprecated`).
        shared: ``module``, ``export``, ``export_dir``.
        observer: the call's default activation observer.

    Raises:
        ValueError: a recipe beside options that the recipe holds.
    """
    stack = {k: v for k, v in legacy.items() if k in RECIPE_OPTIONS or k in MODE_OPTIONS}
    typed = recipe is not None and (isinstance(recipe, (Recipe, str)))
    if typed and stack:
        raise ValueError(
            f"{owner} got recipe={recipe!r} and {sorted(stack)}, which the recipe holds: set them on the recipe"
        )
    if typed or not stack:
        chosen = as_recipe(recipe if recipe is not None else "fx")
        settings = chosen.settings()
        if "observer" in settings and settings["observer"] is None:
            settings["observer"] = observer  # the call's default
        config = QuantizationConfig(**settings, **shared)
        if isinstance(chosen, DynamicRecipe):
            return Resolved(config, Mode.DYNAMIC, chosen.dtype, tuple(chosen.module_types))
        mode = chosen.mode
        return Resolved(config, mode, MODE_OPTIONS["dtype"], MODE_OPTIONS["module_types"])
    options = {**{k: v for k, v in RECIPE_OPTIONS.items() if k != "config"}, "observer": observer, **shared}
    options.update({k: v for k, v in legacy.items() if k in RECIPE_OPTIONS and k != "config"})
    options["recipe"] = recipe
    defaults = {**RECIPE_OPTIONS, "observer": observer, "recipe": None, "module": None, "export": "default"}
    defaults["export_dir"] = None
    parameters = {
        name: inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value) for name, value in defaults.items()
    }
    config = config_from(legacy.get("config"), options, parameters, owner)
    return Resolved(
        config,
        legacy.get("mode", MODE_OPTIONS["mode"]),
        legacy.get("dtype", MODE_OPTIONS["dtype"]),
        legacy.get("module_types", MODE_OPTIONS["module_types"]),
    )


@dataclass(frozen=True)
class Search:
    """What a post-training call searches after calibrating, on validation batches (or ``eval_data``).

    Args:
        max_metric_drop: keep the most sensitive layers at a more exact precision until the int8 model is within
            this much of the float model: top-1 accuracy when batches carry targets, else mean output cosine.
        max_size_bytes: a size budget the other way round: layers start at the most exact precision and the least
            sensitive step down until the model fits.
        eval_batches: batches that score each step (default 16).
        precisions: what a layer may be given, cheapest first: ``("int8", "float")`` (default), ``("int8", "fp16",
            "float")`` in dynamic mode, ``("int4", "int8", "float")`` on torchao.
        score: ``"auto"`` (accuracy with targets, else cosine), ``"accuracy"`` or ``"cosine"``.
        latency: static mode on a flow whose conversion can keep layers float (fx): keep in float the int8 layers
            between float ops whose quantize/dequantize steps cost more time than they save.

    Example::

        >>> Search(max_metric_drop=0.01).options()["max_metric_drop"]
        0.01
    """

    max_metric_drop: float | None = None
    max_size_bytes: int | None = None
    eval_batches: int = 16
    precisions: tuple[str, ...] = ("int8", "float")
    score: str = "auto"
    latency: bool = False

    def __post_init__(self) -> None:
        check_non_negative(self.max_metric_drop, "Search.max_metric_drop", allow_none=True)
        check_positive_int(self.max_size_bytes, "Search.max_size_bytes", allow_none=True)
        check_positive_int(self.eval_batches, "Search.eval_batches")
        check_bool(self.latency, "Search.latency")
        if isinstance(self.precisions, str) or not all(isinstance(p, str) for p in self.precisions):
            raise TypeError(f"Search.precisions must be a sequence of precision names, got {self.precisions!r}")
        object.__setattr__(self, "precisions", tuple(self.precisions))

    def options(self) -> dict[str, Any]:
        """The search as the previous release's keyword arguments (what the calls read)."""
        return {old: getattr(self, new) for old, new in SEARCH_NAMES.items()}


def search_options(search: Search | Mapping[str, Any] | None, legacy: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """A call's search settings by the previous release's names, from ``search=`` or those names.

    Raises:
        TypeError: ``search`` is neither a ``Search``, a mapping of its fields nor ``None``.
        ValueError: ``search=`` beside the previous release's search options.
    """
    given = {k: v for k, v in legacy.items() if k in SEARCH_OPTIONS}
    if search is None:
        return {**Search().options(), **{k: v for k, v in given.items() if v is not None or k != "search_precisions"}}
    if given:
        raise ValueError(f"{owner} got search= and {sorted(given)}: put {sorted(given)} in the Search")
    if isinstance(search, Mapping):
        search = Search(**dict(search))
    if not isinstance(search, Search):
        raise TypeError(f"search must be a Search, a mapping of its fields or None, got {type(search).__name__}")
    return search.options()
