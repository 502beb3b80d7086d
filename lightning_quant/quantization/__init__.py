"""The quantization core the callbacks share: config -> qconfig -> flow prepare -> schedule -> convert."""

from lightning_quant.quantization.arguments import Search
from lightning_quant.quantization.calibrate import NonFiniteError
from lightning_quant.quantization.config import Backend, ExportTarget, Flow, Observer, QuantizationConfig, Scheme
from lightning_quant.quantization.convert import convert_copy, quantized_engine
from lightning_quant.quantization.flows import get_flow
from lightning_quant.quantization.flows.fake_quantize import CpuFakeQuantize, CpuFusedFakeQuantize
from lightning_quant.quantization.flows.fx import FxTracingError
from lightning_quant.quantization.flows.pt2e import Pt2eExportError, load_pt2
from lightning_quant.quantization.flows.recipes import (
    DynamicRecipe,
    EagerRecipe,
    FxRecipe,
    Pt2eRecipe,
    Recipe,
    TorchaoRecipe,
    recipe_for,
)
from lightning_quant.quantization.inputs import ExampleInputs
from lightning_quant.quantization.ptq import Mode, quantize, quantize_within_budget
from lightning_quant.quantization.saving import load_int8, save_int8
from lightning_quant.quantization.schedule import QATSchedule, quantization_disabled
from lightning_quant.quantization.search import SkipSearch

__all__ = [
    "Backend",
    "CpuFakeQuantize",
    "CpuFusedFakeQuantize",
    "DynamicRecipe",
    "EagerRecipe",
    "ExampleInputs",
    "ExportTarget",
    "Flow",
    "FxRecipe",
    "FxTracingError",
    "Mode",
    "NonFiniteError",
    "Observer",
    "Pt2eExportError",
    "Pt2eRecipe",
    "QATSchedule",
    "QuantizationConfig",
    "Recipe",
    "Scheme",
    "Search",
    "SkipSearch",
    "TorchaoRecipe",
    "convert_copy",
    "get_flow",
    "load_int8",
    "load_pt2",
    "quantization_disabled",
    "quantize",
    "quantize_within_budget",
    "quantized_engine",
    "recipe_for",
    "save_int8",
]
