"""Save an int8 model's weights and load them into the float model, without TorchScript.

- torchao models (``flow="torchao"``): their weights are torchao tensors that load into the float
  model's own layers; the file is the state dict (``torch.save``, or safetensors with torchao's
  metadata when the path ends in ``.safetensors``).
- torch.ao models (``flow="fx"``/``"eager"``, static or dynamic): their int8 modules do not fit a
  float model, so the file holds the state dict and the model's recipe
  (:mod:`~lightning_quant.quantization.recipe`); loading rebuilds the same int8 structure from the
  float model, then loads the weights, scales and zero points into it.
- pt2e models are programs: their file is the ``.pt2`` export, loaded with :func:`load_pt2`.

Every file is read with ``torch.load(weights_only=True)``: no code is unpickled. Names a file holds
(module types) are looked up among the float model's own types and torch's, never imported. Files are
checked before they are read: against their export set's manifest (SHA-256), their zip checksums
(``.pt``), or the SHA-256 of their tensors recorded in their metadata (``.safetensors``).
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization import flows
from lightning_quant.quantization.config import ExportTarget
from lightning_quant.quantization.convert import convert_prepared, for_inference, quantized_engine
from lightning_quant.quantization.recipe import config_of, example_of, recipe_of
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.checks import has_module, require_module
from lightning_quant.utils.files import atomic_write
from lightning_quant.utils.integrity import CorruptFileError, UnsafeFileError, load_weights_only, read_checked
from lightning_quant.utils.modules import type_named_in_file

#: the key that marks a torch.ao int8 file (recipe + state dict)
FORMAT_KEY = "lightning_quant_int8"


def _torchao_target(path: str | os.PathLike) -> ExportTarget:
    return ExportTarget.SAFETENSORS if str(path).endswith(".safetensors") else ExportTarget.STATE_DICT


def save_int8(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write an int8 model's weights so :func:`load_int8` can rebuild it from the float model.

    The file is written under a temporary name and renamed: an existing file is replaced whole or
    not at all. A ``.safetensors`` path writes safetensors (torchao models only).

    Raises:
        ValueError: a float or pt2e model (export it with ``export="pt2"``, load with ``load_pt2``), a
            torch.ao model without a recipe (not converted by lightning-quant) or with one that cannot
            be recorded (a custom ``qconfig_mapping``), or safetensors for a torch.ao model.

    Example::

        >>> import torch
        >>> from lightning_quant import quantize
        >>> int8 = quantize(torch.nn.Linear(64, 8), recipe="int8_weight_only")
        >>> save_int8(int8, "linear_int8.pt")  # doctest: +SKIP
        >>> load_int8(torch.nn.Linear(64, 8), "linear_int8.pt")  # doctest: +SKIP
    """
    flow = flows.flow_of(model)
    writer = flows.capable(flow, flows.WritesWeights)
    if writer is not None and flows.int8_layers(model):
        return atomic_write(path, writer.weights_bytes(model, _torchao_target(path)))
    if flow is None or not flows.int8_layers(model):
        raise ValueError(f"save_int8 writes int8 models; {type(model).__name__} has no int8 layer")
    if flow.spec.int8_file == "program":
        raise ValueError(
            "a pt2e int8 model is a program: write it with export='pt2' (torch.export.save) and load it with "
            "lightning_quant.load_pt2(path)"
        )
    recipe = recipe_of(model)
    if recipe is None:
        raise ValueError(
            f"{type(model).__name__} carries no lightning-quant recipe: save_int8 rebuilds models converted by "
            "lightning-quant (the callbacks, quantize()); export this one with export='torchscript'"
        )
    if "unrecordable" in recipe:
        raise ValueError(f"save_int8 cannot record how this model was made: {recipe['unrecordable']}")
    if str(path).endswith(".safetensors"):
        raise ValueError(
            "safetensors holds plain tensors; torch.ao's int8 weights are quantized tensors: use a .pt path"
        )
    state = model.state_dict()
    opaque = [key for key, value in state.items() if _holds_script_object(value)]
    if opaque:
        raise ValueError(
            f"{opaque[:3]} hold torch's packed int8 weights as TorchScript objects (dynamic LSTM/GRU layers), which "
            "torch.load(weights_only=True) refuses to read: export this model with export='torchscript', or keep "
            "those layers float (skip=) to save it"
        )
    buffer = io.BytesIO()
    torch.save({FORMAT_KEY: recipe, "state_dict": state}, buffer)
    return atomic_write(path, buffer.getvalue())


def _holds_script_object(value: Any) -> bool:
    if isinstance(value, torch.ScriptObject):
        return True
    return isinstance(value, (tuple, list)) and any(_holds_script_object(v) for v in value)


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    return None


def check_shapes(expected: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse weights whose shapes differ from the rebuilt model's (torch's packed int8 weights would
    take them without a word).

    Raises:
        RuntimeError: naming up to three keys and both shapes.
    """
    wrong = [
        f"{key}: saved {_shapes(saved[key])}, model {_shapes(value)}"
        for key, value in expected.items()
        if key in saved and _shapes(saved[key]) != _shapes(value)
    ]
    if wrong:
        raise RuntimeError(f"size mismatch between the saved int8 weights and this float model: {wrong[:3]}")


def load_int8(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`save_int8` (or the ``state_dict``/``safetensors`` exports) into
    ``model``, the float model built as for training (its trained weights are not needed).

    torchao files load into ``model`` itself (its layers take the int8 tensors) and return it;
    torch.ao files rebuild the int8 structure from a copy of ``model`` and return that. Either way
    the result computes what the saved model computed, bit for bit, in eval mode without gradients.

    Raises:
        FileNotFoundError: no such file.
        ModuleNotFoundError: the file holds torchao tensors and torchao is not installed.
        CorruptFileError: the file is empty, truncated, damaged, or differs from its checksum.
        UnsafeFileError: the file holds pickled objects beyond tensors and plain values, or names a module type
            that is neither the float model's nor torch's; nothing of it ran and nothing was imported.
        RuntimeError: the file's keys or shapes do not fit ``model``.
    """
    if str(path).endswith(".safetensors"):
        data = read_checked(path, "safetensors file")
        return _load_torchao(model, data, ExportTarget.SAFETENSORS, path)
    data = read_checked(path, "int8 weights file (torch.save)", zip_format=True)
    if has_module("torchao"):
        import torchao.quantization  # noqa: F401  # registers torchao's tensor classes as safe to load
    payload = load_weights_only(data, path, "int8 weights file")
    if isinstance(payload, dict) and FORMAT_KEY in payload:
        return _rebuild(model, _recipe_for(model, payload[FORMAT_KEY], path), payload["state_dict"])
    return _load_torchao(model, data, ExportTarget.STATE_DICT, path, payload)  # read and checked once, above


def _load_torchao(
    model: nn.Module, data: bytes, target: ExportTarget, path: str | os.PathLike, state: Any = None
) -> nn.Module:
    writers = [flow for flow in flows.registered() if isinstance(flow, flows.WritesWeights)]
    assert len(writers) == 1, "one flow writes tensor-subclass weight files: a file does not say which"
    package = writers[0].spec.package
    if package is not None:
        require_module(package[0], f"'{package[1]}'", "loading torchao int8 weights")
    return writers[0].load_weights(model, data, target, path, state)


def _recipe_for(model: nn.Module, recipe: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A file's recipe with every module type it names looked up (never imported) and its dtypes checked.

    Raises:
        UnsafeFileError: a type that is neither one of ``model``'s nor torch's, or a dtype that is not torch's.
    """
    if not isinstance(recipe, dict):
        raise CorruptFileError(path, f"holds a recipe that is not a mapping ({type(recipe).__name__})")
    submodules = {name for name, _ in model.named_modules() if name}

    def module_type(name: Any) -> type:
        kind = type_named_in_file(name, model) if isinstance(name, str) else None
        if kind is None:
            raise UnsafeFileError(
                path,
                f"it names the module type {name!r}, which is neither a type in {type(model).__name__} nor one of "
                "torch's; a file does not choose what gets imported",
            )
        return kind

    def key(entry: Any) -> Any:
        return entry if isinstance(entry, str) and entry in submodules else module_type(entry)

    recipe = dict(recipe)
    recipe["skip"] = [key(k) for k in recipe.get("skip", [])]
    recipe["layers"] = {key(k): v for k, v in dict(recipe.get("layers", {})).items()}
    if "module_types" in recipe:
        recipe["module_types"] = [module_type(name) for name in recipe["module_types"]]
    for spec in [*recipe.get("args", []), *dict(recipe.get("kwargs", {})).values()]:
        dtype = getattr(torch, str(spec.get("dtype")), None) if isinstance(spec, dict) else None
        if not isinstance(dtype, torch.dtype):
            raise UnsafeFileError(path, f"its recipe gives an input as {spec!r}, not a torch dtype and shape")
    return recipe


def _rebuild(float_model: nn.Module, recipe: dict[str, Any], state: dict[str, Any]) -> nn.Module:
    """The int8 structure ``recipe`` describes, built from a copy of ``float_model``, with ``state`` loaded."""
    config = config_of(recipe)
    engine = recipe.get("engine", config.engine)
    model = copy.deepcopy(float_model).cpu()
    if recipe["kind"] == "dynamic":
        rebuilder = flows.capable(config.flow, flows.QuantizesWithoutData)
        assert rebuilder is not None, "a dynamic recipe names a torch.ao flow"
        int8 = rebuilder.quantize_without_data(model, config, tuple(recipe["module_types"]), recipe["dtype"], engine)
    else:
        flow = flows.get_flow(config.flow)
        example = example_of(recipe)
        qat = bool(recipe["qat"])
        prepared = flow.prepare(model.train(qat), config, example, qat=qat)
        prepared.eval()
        with torch.no_grad(), known_torch_warnings_silenced():
            example(prepared)  # observers see one batch, so conversion has ranges to replace
        with quantized_engine(engine), known_torch_warnings_silenced():
            int8 = convert_prepared(prepared, config.flow, recipe.get("keep_float", ()))
    check_shapes(int8.state_dict(), state)
    with quantized_engine(engine):  # int8 weights are packed for the engine they were converted for
        int8.load_state_dict(state, strict=True)
    return for_inference(int8)
