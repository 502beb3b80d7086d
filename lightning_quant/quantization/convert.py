"""Convert a prepared model to int8 without touching the model that trains."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_quant.quantization import flows
from lightning_quant.quantization.engine import for_inference, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.options import Flow
from lightning_quant.quantization.recipe import attach, recipe_of
from lightning_quant.quantization.sharding import whole_copy
from lightning_quant.quantization.warnings import known_torch_warnings_silenced
from lightning_quant.utils.checks import parse_enum
from lightning_quant.utils.modules import within
from lightning_quant.utils.tensors import flat_tensors

log = logging.getLogger(__name__)


#: graphs one compiled forward may keep (one per batch size and input shape) before a call raises
RECOMPILE_LIMIT = 64


def compiled_runner(module: nn.Module) -> Callable[[ExampleInputs], Any]:
    """Run ``module`` the way a pt2e model is served: ``torch.compile`` with freezing (weights
    folded and int8 kernels chosen by Inductor), without gradients. Compiles at the first call.

    Deterministic-algorithms mode (which ``Trainer(deterministic=True)`` leaves on for the whole
    process) is lifted inside each call: under it Inductor's code for a small CNN ran 200x slower
    here, which is not how the model is served. The previous mode is restored after each call.

    Each batch size is one graph (``dynamic=False``, as Inductor's int8 kernels are chosen for a
    shape). Past dynamo's ``recompile_limit`` (8 graphs of one forward) torch would run the model
    eagerly without a word, and a timing would be of eager code under the compiled name: a call
    that compiles runs with the limit at :data:`RECOMPILE_LIMIT`, and going past it raises. The
    settings that matter only while compiling (freezing, the limit) are set only on a call that
    may compile: inputs of a shape, or a thread count, not seen before (dynamo recompiles on
    either), so that a served call does not pay for them (about 40 us). Freezing given as
    ``torch.compile``'s ``options`` instead fails on torch 2.13 (Inductor cannot fake-run
    ``onednn.qconv_prepack``).
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    compiled: list[Any] = []
    seen: set[tuple[Any, ...]] = set()  # the inputs' shapes and dtypes, and the thread count, of each graph

    def run(inputs: ExampleInputs) -> Any:
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        try:
            if not compiled:
                compiled.append(torch.compile(module, dynamic=False))
            key = (
                tuple((t.shape, t.dtype, t.device) for t in flat_tensors((inputs.args, inputs.kwargs))),
                torch.get_num_threads(),
            )
            with contextlib.ExitStack() as stack:
                if key not in seen:  # this call may compile a graph
                    stack.enter_context(inductor_config.patch(freezing=True))
                    limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
                    stack.enter_context(dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True))
                with torch.inference_mode(False), torch.no_grad(), known_torch_warnings_silenced():
                    out = inputs(compiled[0])
            seen.add(key)
            return out
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

    return run


def allow_int8_kernels_under_determinism() -> bool:
    """Let int8 models run in a process where deterministic algorithms are enforced.

    ``torch.use_deterministic_algorithms(True)`` (which ``Trainer(deterministic=True)`` sets for
    the whole process) makes torch's quantized Linear kernel raise ("quantized_resize_cpu_ does
    not have a deterministic implementation"). Switching to ``warn_only=True`` keeps every
    deterministic kernel in use and turns that refusal into a warning. Returns whether it switched.
    """
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        return False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return True


def unobserved(prepared: nn.Module) -> list[str]:
    """Names of observers in ``prepared`` that have never seen data (their range is still empty)."""
    names = []
    for name, module in flows.observers(prepared):
        min_val = getattr(module, "min_val", None)
        if isinstance(min_val, torch.Tensor):
            if min_val.numel() == 0 or bool(torch.isinf(min_val).any()):
                names.append(name)
    return names


def check_observed(prepared: nn.Module) -> None:
    """Raise before converting a model some of whose observers never saw data. Observers of modules
    a model may define without calling (``FloatFunctional`` adders of blocks without a residual) are
    only logged: they keep placeholder ranges, harmless for a module that does not run.

    Raises:
        RuntimeError: naming up to five such observers and the likely causes.
    """
    optional = flows.optional_observers(prepared)
    never = unobserved(prepared)
    idle = [name for name in never if within(name, optional)]
    missing = [name for name in never if name not in idle]
    if idle and not missing:
        log.warning(
            "%d FloatFunctional observer(s) never saw data, e.g. %s: their modules did not run on the calibration or "
            "training data and are converted with placeholder ranges; if forward can reach them, give data that does",
            len(idle),
            idle[:5],
        )
    if missing:
        raise RuntimeError(
            f"cannot convert to int8: {len(missing)} observer(s) never saw data, e.g. {missing[:5]}. "
            "Quantization must run on at least one batch first: check quant_start_epoch against max_epochs, "
            "the calibration data, or whether those layers are reached by forward"
        )


def convert_prepared(prepared: nn.Module, flow: Flow | str, keep_float: Sequence[str] = ()) -> nn.Module:
    """``prepared`` converted in place by its flow, with ``keep_float`` layers float (fx's conversion)."""
    keeper = flows.capable(flow, flows.KeepsFloat)
    if keep_float and keeper is not None:
        return keeper.convert_keeping_float(prepared, keep_float)
    return get_flow(flow).convert(prepared)


def convert_copy(prepared: nn.Module, flow: Flow | str, engine: str, keep_float: Sequence[str] = ()) -> nn.Module:
    """An int8 model converted from a CPU, eval-mode deep copy of ``prepared`` for ``engine``.

    ``prepared`` keeps its device, mode and weights, so training, ``fit`` again or
    ``test(ckpt_path=...)`` still work afterwards. Int8 weights are packed for the engine
    selected during conversion, so run the result under :func:`quantized_engine` of the same engine.
    ``keep_float`` names layers converted to float instead, after preparation (flows that declare
    ``keeps_float``: fx).

    Raises:
        ValueError: ``keep_float`` with a flow whose conversion cannot leave layers float.
    """
    check_observed(prepared)
    keep_float = list(keep_float)
    flow = parse_enum(Flow, flow, "flow")
    if keep_float and flows.capable(flow, flows.KeepsFloat) is None:
        able = [spec.flow.value for spec in flows.SPECS.values() if spec.keeps_float]
        raise ValueError(
            f"keep_float={keep_float[:3]} needs flow={flows.spelled(able)} (whose conversion can leave layers float "
            f"after preparation), got flow={flow.value!r}: prepare with layers={{name: 'float'}} instead"
        )
    model = whole_copy(prepared).cpu().eval()  # (of an FSDP2-sharded model: its full state dict, gathered)
    recipe = recipe_of(prepared)
    with quantized_engine(engine):
        int8 = for_inference(convert_prepared(model, flow, keep_float))
    if recipe is not None:
        recipe = {**recipe, "engine": engine, **({"keep_float": keep_float} if keep_float else {})}
    return attach(int8, recipe)
