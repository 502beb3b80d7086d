"""The calls' few arguments: recipes chosen by type, shorthands, the stacks' own objects, and the previous
release's keyword arguments mapped onto the same settings with a DeprecationWarning."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
from torch.ao.quantization import get_default_qconfig_mapping

import lightning_quant
from lightning_quant import (
    DynamicRecipe,
    EagerRecipe,
    FxRecipe,
    KnowledgeDistillation,
    PostTrainingQuantization,
    Pt2eRecipe,
    QATSchedule,
    QuantizationAwareTraining,
    QuantizationReport,
    Search,
    TorchaoRecipe,
    quantize,
    quantize_within_budget,
    recipe_for,
)
from lightning_quant.quantization.flows.recipes import as_recipe
from lightning_quant.quantization.options import Backend, Flow, Mode, Observer, Scheme
from tests.helpers import TinyNet, requires_torchao


@pytest.mark.parametrize(
    "call",
    [
        QuantizationAwareTraining.__init__,
        PostTrainingQuantization.__init__,
        quantize,
        KnowledgeDistillation.__init__,
        QuantizationReport.__init__,
    ],
    ids=lambda f: f.__qualname__,
)
def test_every_call_takes_at_most_ten_arguments(call):
    named = [p for p in inspect.signature(call).parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    assert len(named) <= 10, [p.name for p in named]


def test_each_recipe_resolves_to_its_flow_with_its_own_options():
    assert FxRecipe(backend="qnnpack").to_config().backend is Backend.QNNPACK
    assert FxRecipe(backend="qnnpack").to_config().per_channel is False
    assert EagerRecipe(modules_to_fuse=[["conv", "bn"]]).to_config().modules_to_fuse == (("conv", "bn"),)
    assert DynamicRecipe(dtype="float16").mode is Mode.DYNAMIC
    assert DynamicRecipe(module_types=["torch.nn.LSTM"]).module_types == (nn.LSTM,)
    assert {type(r).flow for r in (FxRecipe(), EagerRecipe(), DynamicRecipe())} == {Flow.FX, Flow.EAGER}


def test_a_recipe_refuses_what_its_stack_cannot_do_at_construction():
    with pytest.raises(ValueError, match=r"flow='fx' has no backend 'xnnpack'; the backends of each flow are fx: x86"):
        FxRecipe(backend="xnnpack")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'scheme'"):
        FxRecipe(scheme="int4_weight_only")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"observer must be one of \('moving_average', 'minmax', 'histogram'\)"):
        FxRecipe(observer="ema")
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        DynamicRecipe(dtype="int4")
    with pytest.raises(ValueError, match=r"FxRecipe \(flow='fx'\) has no \['scheme'\]; it takes \['backend', 'layers'"):
        recipe_for("fx", scheme="int4_weight_only")
    with pytest.raises(
        ValueError, match=r"flow='pt2e' has no mode='dynamic'; its post-training modes are \['static'\]"
    ):
        recipe_for("pt2e", mode="dynamic")


def test_a_recipe_reads_as_the_code_that_builds_it():
    assert (
        repr(FxRecipe(backend="qnnpack", layers={"fc": "float"}))
        == "FxRecipe(backend='qnnpack', layers={'fc': 'float'})"
    )
    assert repr(DynamicRecipe()) == "DynamicRecipe()"


def test_shorthands_and_a_qconfig_mapping_name_their_recipes():
    assert as_recipe("qnnpack") == FxRecipe(backend="qnnpack")
    assert isinstance(as_recipe("dynamic"), DynamicRecipe)
    mapping = get_default_qconfig_mapping("x86")
    assert as_recipe(mapping).qconfig_mapping is mapping
    with pytest.raises(ValueError, match=r"recipe='avx' is not a shorthand; the shorthands are \('x86', 'fbgemm'"):
        as_recipe("avx")
    with pytest.raises(TypeError, match=r"recipe must be a recipe \(FxRecipe, .*\), got int"):
        as_recipe(5)


@requires_torchao
def test_torchao_and_pt2e_shorthands_and_objects_name_their_recipes():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    native = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16))
    recipe = as_recipe(native)
    assert isinstance(recipe, TorchaoRecipe) and recipe.mode is Mode.WEIGHT_ONLY
    config = recipe.to_config()
    assert (config.flow, config.scheme, config.group_size, config.recipe) == (
        Flow.TORCHAO,
        Scheme.INT4_WEIGHT_ONLY,
        16,
        native,
    )
    with pytest.raises(ValueError, match=r"says its own granularity: leave group_size out"):
        TorchaoRecipe(config=native, group_size=32)
    assert as_recipe("int8_dyn_int4_weight").mode is Mode.DYNAMIC
    assert as_recipe("xnnpack").to_config().backend is Backend.XNNPACK
    assert as_recipe("xnnpack").to_config().flow is Flow.PT2E
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    with pytest.raises(ValueError, match=r"and \['observer'\], which the quantizer decides"):
        Pt2eRecipe(quantizer=X86InductorQuantizer(), observer="minmax")


def _config_fields(config) -> dict:
    return {k: v for k, v in vars(config).items() if k != "qconfig_mapping"}


def test_the_previous_releases_qat_arguments_map_onto_a_recipe_and_a_schedule_with_a_warning():
    with pytest.warns(DeprecationWarning) as caught:
        old = QuantizationAwareTraining(backend="qnnpack", observer="minmax", quant_start_epoch=2, freeze_bn_epoch=3)
    message = str(caught[0].message)
    assert (
        "write QuantizationAwareTraining(recipe=FxRecipe(backend='qnnpack', observer='minmax'), "
        "schedule=QATSchedule(quant_start_epoch=2, freeze_bn_epoch=3))" in message
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new form warns of nothing
        new = QuantizationAwareTraining(
            FxRecipe(backend="qnnpack", observer="minmax"), QATSchedule(quant_start_epoch=2, freeze_bn_epoch=3)
        )
    assert _config_fields(old.config) == _config_fields(new.config)
    assert old.schedule == new.schedule
    assert old.state_key == new.state_key


def test_the_previous_releases_post_training_arguments_map_onto_a_recipe_and_a_search():
    with pytest.warns(
        DeprecationWarning,
        match=r"write PostTrainingQuantization\(recipe=DynamicRecipe\(dtype='float16'\), "
        r"search=Search\(max_metric_drop=0.01\)\)",
    ):
        old = PostTrainingQuantization(mode="dynamic", dtype="float16", max_metric_drop=0.01)
    new = PostTrainingQuantization(DynamicRecipe(dtype="float16"), search=Search(max_metric_drop=0.01))
    assert (old.mode, old.dtype, old.module_types, old.max_metric_drop) == (
        new.mode,
        new.dtype,
        new.module_types,
        new.max_metric_drop,
    )
    assert _config_fields(old.config) == _config_fields(new.config)
    assert PostTrainingQuantization().config.observer is Observer.HISTOGRAM  # the post-training default holds
    assert QuantizationAwareTraining().config.observer is Observer.MOVING_AVERAGE


def test_quantize_takes_a_recipe_and_the_previous_releases_arguments_alike():
    model = TinyNet().eval()
    batches = [torch.randn(4, 1, 6, 6) for _ in range(4)]
    with pytest.warns(DeprecationWarning, match=r"write quantize\(recipe=FxRecipe\(observer='minmax'\)\)"):
        old = quantize(model, batches, observer="minmax", progress=False)
    new = quantize(model, batches, FxRecipe(observer="minmax"), progress=False)
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    int8, search = quantize_within_budget(model, batches, max_metric_drop=1.0, recipe="x86", progress=False)
    assert search.met


def test_a_recipe_beside_the_options_it_holds_is_refused():
    with pytest.raises(ValueError, match=r"got recipe=FxRecipe\(\) and \['backend'\], which the recipe holds"):
        QuantizationAwareTraining(FxRecipe(), backend="qnnpack")
    with pytest.raises(ValueError, match=r"got search= and \['max_metric_drop'\]: put \['max_metric_drop'\] in the"):
        PostTrainingQuantization(search=Search(eval_batches=4), max_metric_drop=0.1)
    with pytest.raises(TypeError, match=r"got unexpected keyword arguments \['quant_start'\]; it takes recipe, "):
        QuantizationAwareTraining(quant_start=2)


def test_search_checks_its_values():
    with pytest.raises(ValueError, match=r"Search.max_metric_drop must be a non-negative number or None, got -1"):
        Search(max_metric_drop=-1)
    with pytest.raises(TypeError, match=r"Search.precisions must be a sequence of precision names, got 'int8'"):
        Search(precisions="int8")  # type: ignore[arg-type]


def test_the_package_exports_the_recipes():
    for name in ("FxRecipe", "EagerRecipe", "Pt2eRecipe", "TorchaoRecipe", "DynamicRecipe", "Search", "recipe_for"):
        assert name in lightning_quant.__all__
