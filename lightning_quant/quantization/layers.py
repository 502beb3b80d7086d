"""Per-layer settings (``layers=``, ``skip=``) resolved against a model, the same for every flow.

A rule is keyed by a submodule name (that module and everything inside it, the nearest name
winning), an import path or an ``nn.Module`` type; a name beats a type, which beats the
config's global options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from lightning_quant.quantization.config import LayerSetting, Precision, QuantizationConfig
from lightning_quant.utils.modules import locate_module_type, within


@dataclass(frozen=True)
class LayerRules:
    """``config.layers`` and ``config.skip`` checked against a model: settings by module name and by type."""

    names: dict[str, LayerSetting]
    types: list[tuple[type, LayerSetting]]

    def setting_of(self, name: str, module: nn.Module) -> LayerSetting | None:
        """The setting of one module: the nearest enclosing name, else its type, else ``None`` (global)."""
        enclosing = within(name, sorted(self.names, key=lambda n: -n.count(".")))
        if enclosing is not None:
            return self.names[enclosing]
        return next((setting for cls, setting in self.types if isinstance(module, cls)), None)

    def items(self) -> list[tuple[str, LayerSetting]]:
        """Every rule as ``(name or type name, setting)``, for messages."""
        return [*self.names.items(), *((cls.__name__, setting) for cls, setting in self.types)]


def resolve_layers(model: nn.Module, config: QuantizationConfig) -> LayerRules:
    """``config.layers`` (with ``skip`` as ``"float"``) resolved against ``model``.

    Raises:
        ValueError: a key that is neither a submodule name of ``model`` nor an importable module type.
    """
    float_setting = LayerSetting(precision=Precision.FLOAT)
    entries = [(key, setting) for key, setting in config.layers] + [(entry, float_setting) for entry in config.skip]
    names, types = resolve_skip(model, tuple(key for key, _ in entries), what="layers/skip entry")
    by_key = dict(entries)
    resolved_types = [t for t in types]
    type_keys = [key for key, _ in entries if key not in names]
    return LayerRules(
        names={name: by_key[name] for name in names},
        types=list(zip(resolved_types, (by_key[key] for key in type_keys))),
    )


#: what the static flows (fx, eager) can run per layer, and the activation dtypes their kernels take
STATIC_PRECISIONS = (Precision.INT8, Precision.FLOAT)
STATIC_ACTIVATION_DTYPES = ("quint8",)


def check_static_setting(key: str, setting: LayerSetting, flow: str) -> None:
    """Refuse, before any training, a per-layer setting the static flows cannot run.

    Raises:
        ValueError: a precision other than int8/float, or an activation dtype the int8 kernels do not take.
    """
    if setting.precision not in STATIC_PRECISIONS:
        hint = {
            Precision.FP16: 'fp16 is a dynamic-mode precision (mode="dynamic": half-precision weights)',
            Precision.INT4: "int4 needs torchao's weight schemes, which this flow does not run",
        }[setting.precision]
        raise ValueError(
            f"layers[{key!r}] asks for {setting.precision.value!r}, which flow={flow!r} cannot run ({hint}); "
            f"its precisions are {[p.value for p in STATIC_PRECISIONS]}"
        )
    if setting.dtype is not None and setting.dtype not in STATIC_ACTIVATION_DTYPES:
        raise ValueError(
            f"layers[{key!r}] asks for {setting.dtype!r} activations, which neither fbgemm/x86 nor qnnpack "
            f"executes; the activation dtypes that run are {list(STATIC_ACTIVATION_DTYPES)}"
        )


def resolve_skip(
    model: nn.Module, skip: tuple[str | type, ...], what: str = "skip entry"
) -> tuple[tuple[str, ...], tuple[type, ...]]:
    """Split ``skip`` into submodule names and module types, checking each against ``model``.

    Raises:
        ValueError: an entry is neither a submodule name of ``model`` nor an importable module type.
    """
    names, types = [], []
    submodules = dict(model.named_modules())
    for entry in skip:
        if isinstance(entry, type):
            types.append(entry)
        elif entry in submodules and entry:
            names.append(entry)
        else:
            located = locate_module_type(entry)
            if located is None:
                candidates = [name for name in submodules if name][:20]
                raise ValueError(
                    f"{what} {entry!r} is neither a submodule of {type(model).__name__} "
                    f"(submodules include {candidates}) nor an importable nn.Module type such as 'torch.nn.LSTM'"
                )
            types.append(located)
    return tuple(names), tuple(types)
