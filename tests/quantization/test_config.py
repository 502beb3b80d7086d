import re

import pytest
import torch.nn as nn
from torch.ao.quantization import QConfigMapping

from lightning_quant.quantization.config import (
    Backend,
    ExportTarget,
    Flow,
    Observer,
    QuantizationConfig,
)
from tests.helpers import requires_executorch


def test_defaults_and_per_channel_by_backend():
    config = QuantizationConfig()
    assert (config.backend, config.flow, config.observer) == (Backend.X86, Flow.FX, Observer.MOVING_AVERAGE)
    assert config.per_channel is True and config.export == (ExportTarget.TORCHSCRIPT,)
    assert QuantizationConfig(backend="fbgemm").per_channel is True
    assert QuantizationConfig(backend="qnnpack").per_channel is False
    assert QuantizationConfig(backend="qnnpack", per_channel=True).per_channel is True


def test_hydra_containers_are_accepted():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"skip": ["head", "torch.nn.LSTM"], "export": ["torchscript", "mobile"], "fuse": [["a", "b"]]}
    )
    config = QuantizationConfig(flow="eager", skip=cfg.skip, export=cfg.export, modules_to_fuse=cfg.fuse)
    assert config.skip == ("head", "torch.nn.LSTM")
    assert config.export == (ExportTarget.TORCHSCRIPT, ExportTarget.MOBILE)
    assert config.modules_to_fuse == (("a", "b"),)


def test_single_strings_become_tuples():
    config = QuantizationConfig(export="mobile", skip="head")
    assert config.export == (ExportTarget.MOBILE,) and config.skip == ("head",)
    assert QuantizationConfig(export=None).export == ()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"backend": "tpu"},
            ValueError,
            r"backend must be one of \('x86', 'fbgemm', 'qnnpack', 'xnnpack'\), got 'tpu'",
        ),
        ({"flow": "pt2"}, ValueError, r"flow must be one of \('fx', 'eager', 'pt2e', 'torchao'\), got 'pt2'"),
        (
            {"backend": "xnnpack"},
            ValueError,
            r"flow='fx' has no backend 'xnnpack'; the backends of each flow are fx: x86, fbgemm, qnnpack; "
            r"eager: x86, fbgemm, qnnpack; pt2e: x86, xnnpack",
        ),
        ({"flow": "pt2e", "backend": "qnnpack"}, ValueError, r"flow='pt2e' has no backend 'qnnpack'; .* pt2e: x86"),
        (
            {"flow": "pt2e", "export": "torchscript"},
            ValueError,
            r"flow='pt2e' cannot export 'torchscript'; the export targets of each flow are .*pt2e: pt2, executorch",
        ),
        ({"export": "pt2"}, ValueError, r"flow='fx' cannot export 'pt2'"),
        (
            {"flow": "pt2e", "export": "executorch"},
            ValueError,
            r"export 'executorch' needs backend='xnnpack' \(its runtime's kernels\), got 'x86'",
        ),
        (
            {"flow": "pt2e", "qconfig_mapping": {"": None}},
            ValueError,
            r"qconfig_mapping is a torch.ao setting of flow=\"fx\"/\"eager\"; with flow=\"pt2e\" say per-layer",
        ),
        ({"observer": None}, ValueError, r"observer must be one of .*, got None"),
        ({"module": ""}, ValueError, r"module must be a dotted attribute path such as 'net' or None, got ''"),
        ({"per_channel": "yes"}, TypeError, r"per_channel must be True, False or None \(backend default\), got 'yes'"),
        ({"skip": 3}, TypeError, r"skip must be a sequence of module names or nn.Module types, got 3"),
        ({"skip": [3]}, TypeError, r"skip entries must be module names \(str\) or nn.Module subclasses, got 3"),
        ({"modules_to_fuse": "conv"}, TypeError, r"modules_to_fuse must be a sequence of groups of module names"),
        ({"flow": "eager", "modules_to_fuse": [["conv"]]}, TypeError, r"modules_to_fuse must be a sequence of groups"),
        (
            {"modules_to_fuse": [["conv", "bn"]]},
            ValueError,
            r"modules_to_fuse is for flow=\"eager\" only \(flow=\"fx\" fuses automatically\), got flow='fx'",
        ),
        (
            {"export": 5},
            TypeError,
            r"export must be 'default', a target or a sequence of \('torchscript', 'mobile', 'onnx', 'pt2', "
            r"'executorch', 'state_dict', 'safetensors', 'hf', 'aoti'\), got 5",
        ),
        ({"export": ["mobile", "mobile"]}, ValueError, r"export lists a target twice: \['mobile', 'mobile'\]"),
        ({"export_dir": 5}, TypeError, r"export_dir must be a path or None, got 5"),
    ],
)
def test_config_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationConfig(**kwargs)


def test_types_and_qconfig_mapping_pass_through():
    mapping = QConfigMapping()
    config = QuantizationConfig(skip=[nn.LSTM], qconfig_mapping=mapping)
    assert config.skip == (nn.LSTM,) and config.qconfig_mapping is mapping


def test_a_qconfig_mapping_of_another_type_is_refused_by_the_torch_ao_flows():
    from lightning_quant import QuantizationAwareTraining
    from lightning_quant.quantization.flows import get_flow

    config = QuantizationConfig(qconfig_mapping={"": None})
    for flow in ("fx", "eager"):
        with pytest.raises(TypeError, match="qconfig_mapping must be a torch.ao.quantization.QConfigMapping or None"):
            get_flow(flow).check(config)
    with pytest.raises(TypeError, match="qconfig_mapping must be a torch.ao.quantization.QConfigMapping or None"):
        QuantizationAwareTraining(qconfig_mapping={"": None})


@pytest.mark.parametrize(
    ("flow", "backend", "expected"),
    [
        ("fx", "x86", ("torchscript",)),
        ("eager", "qnnpack", ("torchscript", "mobile")),
        ("pt2e", "x86", ("pt2",)),
        pytest.param("pt2e", "xnnpack", ("pt2", "executorch"), marks=requires_executorch),
    ],
)
def test_default_exports_are_the_flows_server_file_and_the_phone_file_for_phone_backends(flow, backend, expected):
    config = QuantizationConfig(flow=flow, backend=backend)
    assert tuple(t.value for t in config.export) == expected
    assert QuantizationConfig(flow=flow, backend=backend, export="default").export == config.export


@pytest.mark.parametrize(
    ("kwargs", "package", "install"),
    [
        ({"flow": "pt2e"}, "torchao", "'lightning-quant[pt2e]'"),
        ({"flow": "pt2e", "backend": "xnnpack", "export": "pt2"}, "executorch", "'lightning-quant[executorch]'"),
    ],
)
def test_a_missing_optional_package_is_named_with_its_install_line(kwargs, package, install, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    message = f"needs the optional package '{package}': run `pip install {install}`"
    with pytest.raises(ModuleNotFoundError, match=re.escape(message)):
        QuantizationConfig(**kwargs)


def test_a_value_of_another_option_names_that_option():
    from lightning_quant import quantize

    with pytest.raises(
        ValueError, match=r"backend must be one of .* got 'torchao'; 'torchao' is a value of flow: flow='torchao'"
    ):
        quantize(nn.Linear(64, 8), mode="weight_only", backend="torchao")
    with pytest.raises(ValueError, match=r"flow must be one of .* got 'xnnpack'; 'xnnpack' is a value of backend"):
        QuantizationConfig(flow="xnnpack")
    with pytest.raises(ValueError, match=r"each export target must be one of .* got 'pt2e'; 'pt2e' is a value of flow"):
        QuantizationConfig(export="pt2e")
    with pytest.raises(ValueError, match=r"observer must be one of .* got 'x86'; 'x86' is a value of backend"):
        QuantizationConfig(observer="x86")
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'arm'\Z"):  # no option has it
        QuantizationConfig(backend="arm")
