"""The recipe of an int8 model: what rebuilds its int8 structure from the float model.

torch.ao's int8 modules cannot be loaded into a float model: the prepared and converted structure
(fused modules, quantized layers, stubs) must exist first. A recipe records what made it (flow,
backend, the per-layer choices, the example's shapes, the engine it was packed for) as plain
JSON-able values, so :func:`lightning_quant.save_int8` can store it beside the state dict and
:func:`lightning_quant.load_int8` can build the same structure from a fresh float model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization.config import LayerSetting, QuantizationConfig
from lightning_quant.quantization.inputs import ExampleInputs

#: where a prepared or converted model keeps its recipe
RECIPE_ATTRIBUTE = "_lightning_quant_recipe"
RECIPE_VERSION = 1


def _key(key: str | type) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _tensor_spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return None


def static_recipe(config: QuantizationConfig, example: ExampleInputs, qat: bool) -> dict[str, Any]:
    """The recipe of a model a flow prepared with ``config`` on ``example``.

    A setting a recipe cannot record (a ``qconfig_mapping`` object, a non-tensor input) gives a recipe
    that says why under ``"unrecordable"``: :func:`lightning_quant.save_int8` refuses it then.
    """
    unrecordable = None
    if config.qconfig_mapping is not None:
        unrecordable = "it was made with a custom qconfig_mapping (a torch object): say the same with layers= and skip="
    if config.recipe is not None:
        unrecordable = f"it was made with recipe={type(config.recipe).__name__}(...), an object a file cannot hold"
    specs = [_tensor_spec(a) for a in example.args] + [_tensor_spec(v) for v in example.kwargs.values()]
    if any(spec is None for spec in specs):
        unrecordable = "its example inputs hold values other than tensors"
    if unrecordable is not None:
        return {"version": RECIPE_VERSION, "unrecordable": unrecordable}
    return {
        "version": RECIPE_VERSION,
        "kind": "static",
        "flow": config.flow.value,
        "backend": config.backend.value,
        "observer": config.observer.value,
        "per_channel": config.per_channel,
        "skip": [_key(k) for k in config.skip],
        "layers": {_key(k): _setting(s) for k, s in config.layers},
        "modules_to_fuse": [list(g) for g in config.modules_to_fuse] if config.modules_to_fuse is not None else None,
        "qat": qat,
        "args": [_tensor_spec(a) for a in example.args],
        "kwargs": {k: _tensor_spec(v) for k, v in example.kwargs.items()},
    }


def dynamic_recipe(config: QuantizationConfig, module_types: tuple[type, ...], dtype: str) -> dict[str, Any]:
    """The recipe of a dynamically quantized model (torch.ao's ``quantize_dynamic``)."""
    return {
        "version": RECIPE_VERSION,
        "kind": "dynamic",
        "flow": config.flow.value,
        "backend": config.backend.value,
        "per_channel": config.per_channel,
        "skip": [_key(k) for k in config.skip],
        "layers": {_key(k): _setting(s) for k, s in config.layers},
        "module_types": [_key(t) for t in module_types],
        "dtype": dtype,
    }


def _setting(setting: LayerSetting) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(setting).items() if v is not None}


def config_of(recipe: Mapping[str, Any]) -> QuantizationConfig:
    """The config a recipe was made with (no exports)."""
    options: dict[str, Any] = {
        "flow": recipe["flow"],
        "backend": recipe["backend"],
        "per_channel": recipe["per_channel"],
        "skip": tuple(recipe["skip"]),
        "layers": dict(recipe["layers"]) or None,
        "export": None,
    }
    if "observer" in recipe:
        options["observer"] = recipe["observer"]
    if recipe.get("modules_to_fuse") is not None:
        options["modules_to_fuse"] = recipe["modules_to_fuse"]
    return QuantizationConfig(**options)


def example_of(recipe: Mapping[str, Any]) -> ExampleInputs:
    """Inputs of the recorded shapes and dtypes (ones: integer inputs stay valid token ids)."""

    def make(spec: Mapping[str, Any]) -> torch.Tensor:
        return torch.ones(spec["shape"], dtype=getattr(torch, spec["dtype"]))

    return ExampleInputs(tuple(make(s) for s in recipe["args"]), {k: make(s) for k, s in recipe["kwargs"].items()})


def attach(model: nn.Module, recipe: dict[str, Any] | None) -> nn.Module:
    """Keep ``recipe`` on ``model`` (deep copies keep it)."""
    if recipe is not None:
        setattr(model, RECIPE_ATTRIBUTE, recipe)
    return model


def recipe_of(model: nn.Module) -> dict[str, Any] | None:
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    return recipe if isinstance(recipe, dict) else None
