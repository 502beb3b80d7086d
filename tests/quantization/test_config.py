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
        ({"backend": "tpu"}, ValueError, r"backend must be one of \('x86', 'fbgemm', 'qnnpack'\), got 'tpu'"),
        ({"flow": "pt2"}, ValueError, r"flow must be one of \('fx', 'eager'\), got 'pt2'"),
        ({"observer": None}, ValueError, r"observer must be one of .*, got None"),
        ({"module": ""}, ValueError, r"module must be a dotted attribute path such as 'net' or None, got ''"),
        ({"per_channel": "yes"}, TypeError, r"per_channel must be True, False or None \(backend default\), got 'yes'"),
        ({"skip": 3}, TypeError, r"skip must be a sequence of module names or nn.Module types, got 3"),
        ({"skip": [3]}, TypeError, r"skip entries must be module names \(str\) or nn.Module subclasses, got 3"),
        (
            {"qconfig_mapping": {"": None}},
            TypeError,
            r"qconfig_mapping must be a torch.ao.quantization.QConfigMapping or None, got dict",
        ),
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
            r"export must be a string or a sequence of \('torchscript', 'mobile', 'onnx'\), got 5",
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
