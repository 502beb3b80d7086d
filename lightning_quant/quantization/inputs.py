"""Model inputs taken from what Lightning users already have: a batch or ``example_input_array``.

Users never write a dummy input. :class:`ExampleInputs` holds positional and keyword
arguments for the quantized module; :func:`default_batch_to_input` reads them off a batch the
way Lightning users expect:

- a tensor is the single positional input;
- a tuple or list is ``(input, target, ...)``: its first element is the input (and when that
  first element is itself a tuple/list, its items are the positional inputs; when it is a
  mapping, its items are keyword inputs). For a forward that requires ``n > 1`` positional
  inputs (``forward(x, mask)``), a batch of tensors is ``(x, mask, target, ...)``: its first
  ``n`` items are the inputs (:func:`required_inputs`);
- a mapping (a Hugging Face batch, say) is passed as keyword arguments.

Anything else needs a ``batch_to_input`` callable returning one of those forms.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ExampleInputs:
    """Positional and keyword arguments for one call of a module."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_value(cls, value: Any) -> ExampleInputs:
        """Read inputs off ``example_input_array`` conventions: tensor, tuple of args, or dict of kwargs."""
        if isinstance(value, ExampleInputs):
            return value
        if isinstance(value, torch.Tensor):
            return cls((value,), {})
        if isinstance(value, Mapping):
            return cls((), dict(value))
        if isinstance(value, Sequence) and not isinstance(value, str):
            return cls(tuple(value), {})
        raise TypeError(
            "model inputs must be a tensor, a tuple/list of positional inputs or a mapping of keyword "
            f"inputs, got {type(value).__name__}; pass batch_to_input= to say how to read your batches"
        )

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExampleInputs:
        """A copy with ``fn`` applied to every tensor argument."""
        convert = lambda value: fn(value) if isinstance(value, torch.Tensor) else value  # noqa: E731
        return ExampleInputs(tuple(convert(a) for a in self.args), {k: convert(v) for k, v in self.kwargs.items()})

    def to(self, device: Any) -> ExampleInputs:
        return self.map_tensors(lambda t: t.detach().to(device))

    def with_batch_size(self, size: int) -> ExampleInputs:
        """The same inputs with every batched tensor cut or tiled along dim 0 to ``size`` rows."""

        def resize(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0:
                return tensor
            repeats = -(-size // tensor.shape[0])
            return tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))[:size].contiguous()

        return self.map_tensors(resize)

    @property
    def batch_size(self) -> int | None:
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        return None

    def __call__(self, module: torch.nn.Module) -> Any:
        """Run ``module`` on these inputs."""
        return module(*self.args, **self.kwargs)


def default_batch_to_input(batch: Any, inputs: int = 1) -> ExampleInputs:
    """Take the model input from a batch (see the module docstring for the rules); ``inputs``: how many
    positional inputs the model's forward requires (:func:`required_inputs`)."""
    if isinstance(batch, torch.Tensor) or isinstance(batch, Mapping):
        return ExampleInputs.from_value(batch)
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        if inputs > 1 and len(batch) >= inputs and isinstance(batch[0], torch.Tensor):
            return ExampleInputs(tuple(batch[:inputs]))
        return ExampleInputs.from_value(batch[0] if not isinstance(batch[0], str) else batch)
    return ExampleInputs.from_value(batch)


def batch_inputs(batch: Any, batch_to_input: Callable[[Any], Any] | None = None, inputs: int = 1) -> ExampleInputs:
    """Inputs of ``batch``, through the user's ``batch_to_input`` when one is given (``inputs``: see
    :func:`default_batch_to_input`)."""
    if batch_to_input is None:
        return default_batch_to_input(batch, inputs)
    return ExampleInputs.from_value(batch_to_input(batch))


def required_inputs(module: torch.nn.Module) -> int:
    """How many positional inputs ``module``'s forward requires (those without a default)."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(
        1
        for p in forward_signature(module).parameters.values()
        if p.kind in positional and p.default is inspect.Parameter.empty
    )


def batch_reader(module: torch.nn.Module) -> Callable[[Any], ExampleInputs] | None:
    """``batch -> inputs`` for a module whose forward requires several positional inputs (the first items
    of a tuple batch); ``None`` where the default reading serves (one input)."""
    count = required_inputs(module)
    return functools.partial(default_batch_to_input, inputs=count) if count > 1 else None


def check_call(module: torch.nn.Module, example: ExampleInputs, source: str) -> None:
    """Refuse, before any work, inputs ``module``'s forward cannot be called with.

    Raises:
        TypeError: naming the forward's signature, what ``source`` gave, and ``batch_to_input=``.
    """
    signature = forward_signature(module)
    try:
        signature.bind(*example.args, **example.kwargs)
    except TypeError as err:
        given = [f"{type(a).__name__}" for a in example.args] + [f"{k}=" for k in example.kwargs]
        raise TypeError(
            f"{type(module).__name__}.forward{signature} cannot be called with the inputs read off {source} "
            f"({', '.join(given) or 'nothing'}): {err}. Pass batch_to_input= returning the inputs of one call: "
            "a tensor, a tuple of positional inputs or a dict of keyword inputs"
        ) from None


def as_positional(module: torch.nn.Module, example: ExampleInputs) -> ExampleInputs:
    """``example`` with keyword inputs moved to their positions in ``module``'s forward signature.

    TorchScript tracing and ONNX export take positional inputs; a module may expose the
    signature it forwards to as ``input_signature`` (the eager flow's boundary does).
    """
    try:
        bound = forward_signature(module).bind(*example.args, **example.kwargs)
    except TypeError:
        return example
    return ExampleInputs(tuple(bound.args), dict(bound.kwargs))


def forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """The signature ``module`` is called with: its ``input_signature`` when it forwards to another
    module (the eager flow's boundary), else its ``forward``'s."""
    return getattr(module, "input_signature", None) or inspect.signature(module.forward)


def dynamic_shapes(
    module: torch.nn.Module, example: ExampleInputs, max_batch: int | None = None, max_sequence: int | None = None
) -> dict[str, Any] | tuple[Any, ...]:
    """``torch.export`` dynamic shapes for ``example``: the batch axis of every tensor input, and the
    sequence axis of integer inputs (token ids). Unbounded ones are left to export (``Dim.AUTO``);
    a runtime that plans its memory ahead (ExecuTorch) needs ``max_batch`` and ``max_sequence``."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch) if max_batch else Dim.AUTO
    sequence = Dim("sequence", min=1, max=max_sequence) if max_sequence else Dim.AUTO

    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        axes = {0: batch}
        if not value.is_floating_point() and value.dim() >= 2:
            axes[1] = sequence
        return axes

    signature = forward_signature(module)
    kinds = {name: p.kind for name, p in signature.parameters.items()}
    if inspect.Parameter.VAR_POSITIONAL in kinds.values():
        return tuple(spec(v) for v in example.args)
    shapes: dict[str, Any] = {}
    for name, value in signature.bind_partial(*example.args, **example.kwargs).arguments.items():
        if kinds[name] is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {key: spec(v) for key, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


@contextlib.contextmanager
def generation_cache_off(module: torch.nn.Module) -> Iterator[None]:
    """A Hugging Face model's key/value cache (``config.use_cache``, on by default for causal LMs) off for
    the block, and back as it was after: the cache is for generation, a captured program returns the
    model's outputs without it (``torch.export`` cannot return the cache object)."""
    configs: list[Any] = [
        m.config for m in module.modules() if getattr(getattr(m, "config", None), "use_cache", None) is True
    ]
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def export_program(
    model: torch.nn.Module, example: ExampleInputs, max_batch: int | None = None, max_sequence: int | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` ``module`` (in its current mode) with dynamic batch and sequence axes
    (:func:`dynamic_shapes`), from a batch of at least two so the batch axis is not fixed to 1."""
    if (example.batch_size or 0) < 2:  # a batch of one would make export specialize the batch axis
        example = example.with_batch_size(2)
    from lightning_quant.quantization.warnings import known_torch_warnings_silenced

    with known_torch_warnings_silenced(), generation_cache_off(model):
        return torch.export.export(
            model,
            example.args,
            example.kwargs or None,
            dynamic_shapes=dynamic_shapes(model, example, max_batch, max_sequence),
        )


def _bound_arguments(module: torch.nn.Module, example: ExampleInputs) -> dict[str, Any]:
    """``example``'s inputs by parameter name (``arg0``... where they do not fit the signature)."""
    try:
        return dict(forward_signature(module).bind_partial(*example.args, **example.kwargs).arguments)
    except TypeError:
        return {f"arg{i}": v for i, v in enumerate(example.args)} | dict(example.kwargs)


def describe_inputs(module: torch.nn.Module, example: ExampleInputs) -> str:
    """The inputs by parameter name, with shape and dtype: ``(x: [16, 1, 8, 8] float32, extra: ...)``.

    Two calls that differ here give the module different inputs (missing ones, other shapes
    or dtypes).
    """

    def what(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        return type(value).__name__

    arguments = _bound_arguments(module, example)
    return "(" + ", ".join(f"{name}: {what(value)}" for name, value in arguments.items()) + ")"


def input_kinds(module: torch.nn.Module, example: ExampleInputs) -> dict[str, str]:
    """Each input by parameter name and its kind (``"float32"``, ``"int64"``, ``"NoneType"``...): what
    must agree between the inputs a model was prepared with and the ones it is called with."""
    return {
        name: str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else type(value).__name__
        for name, value in _bound_arguments(module, example).items()
    }


#: floating-point input dtypes quantization observes as they are
FLOAT_INPUTS = (torch.float32,)


def check_example_inputs(module: torch.nn.Module, example: ExampleInputs, source: str, keyed_batch: bool) -> None:
    """Refuse, before any training, inputs the quantized module cannot be prepared for.

    Raises:
        ValueError: a floating-point input that is not float32, or (``keyed_batch``: the inputs
            are a mapping batch's keys) a key that is not an argument of ``module``'s forward.
    """
    for name, value in [*enumerate(example.args), *example.kwargs.items()]:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in FLOAT_INPUTS:
            raise ValueError(
                f"{source} gives input {name!r} as {str(value.dtype).removeprefix('torch.')}: int8 quantization "
                "observes float32 activations; convert the data to float32 (tensor.float()), or use a precision "
                'plugin (Trainer(precision="16-mixed")) rather than half-precision inputs'
            )
    signature = forward_signature(module)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if keyed_batch and example.kwargs and not takes_any:
        unknown = [key for key in example.kwargs if key not in signature.parameters]
        if unknown:
            raise ValueError(
                f"{source} is a mapping whose keys {unknown} are not arguments of "
                f"{type(module).__name__}.forward{signature}, so they cannot be passed to it: drop them from the "
                f"batch, or pass batch_to_input=lambda batch: {{k: batch[k] for k in {list(signature.parameters)}}}"
            )


#: keyword inputs a model takes for training or generation, not for a prediction: a loss's labels, the
#: switches of a key/value cache and of extra outputs. The int8 model and its files are called without them.
TRAINING_ONLY_INPUTS = frozenset(
    {
        "labels",
        "label",
        "start_positions",
        "end_positions",
        "next_sentence_label",
        "return_loss",
        "num_items_in_batch",
        "use_cache",
        "past_key_values",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
    }
)


def inference_inputs(signature: inspect.Signature, example: ExampleInputs) -> ExampleInputs:
    """``example`` without the inputs that only training or generation gives (:data:`TRAINING_ONLY_INPUTS`).

    An input is dropped only where the forward ``signature`` gives it a default, so the call stays valid:
    ``model(input_ids=..., labels=...)`` of a Hugging Face model becomes ``model(input_ids=...)``. Positional
    inputs bound to such a parameter are dropped too (with whatever follows them staying in place by name).
    """
    try:
        bound = signature.bind_partial(*example.args, **example.kwargs)
    except (TypeError, ValueError):
        return example
    parameters = signature.parameters
    dropped = {
        name
        for name in bound.arguments
        if name in TRAINING_ONLY_INPUTS and parameters[name].default is not inspect.Parameter.empty
    }
    for name, value in bound.arguments.items():
        if parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            dropped |= {f"**{key}" for key in value if key in TRAINING_ONLY_INPUTS}
    if not dropped:
        return example
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    positional = True
    for name, value in bound.arguments.items():
        kind = parameters[name].kind
        if name in dropped:
            positional = False  # what follows a dropped positional input goes by name
            continue
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update({k: v for k, v in value.items() if f"**{k}" not in dropped})
        elif kind is inspect.Parameter.KEYWORD_ONLY or not positional or name in example.kwargs:
            positional = positional and name not in example.kwargs
            kwargs[name] = value
        else:
            args.append(value)
    return ExampleInputs(tuple(args), kwargs)


def target_of(batch: Any, inputs: int = 1) -> Any:
    """The target of a batch: the item of a tuple/list after its ``inputs`` inputs (the second, for a model of
    one input), or ``labels``/``label``/``y``/``target`` of a mapping."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in ("labels", "label", "y", "target") if k in batch), None)
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > inputs:
        return batch[inputs]
    return None


def batch_targets(batches: Sequence[Any], inputs: int = 1) -> torch.Tensor | None:
    """Every batch's target concatenated on CPU, or ``None`` when a batch has no tensor target."""
    targets = [target_of(b, inputs) for b in batches]
    if not targets or not all(isinstance(t, torch.Tensor) for t in targets):
        return None
    return torch.cat([t.cpu().reshape(-1) if t.dim() == 0 else t.cpu() for t in targets])
