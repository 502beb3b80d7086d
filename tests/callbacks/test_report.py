"""QuantizationReport beside QAT and PTQ, in either order; int8 validation during QAT."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, QuantizationReport
from lightning_quant.demos import Classifier, DigitsCNN, DigitsDataModule
from lightning_quant.quantization.convert import quantized_engine
from tests.helpers import FLOWS, BoringClassifier, quiet_trainer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data": "train"}, r"data must be one of \('val', 'test'\) or an iterable of batches, got 'train'"),
        ({"max_batches": 0}, r"max_batches must be a positive int, got 0"),
        ({"threshold": -1}, r"threshold must be a non-negative number, got -1"),
        ({"batch_sizes": [0]}, r"batch_sizes must be a sequence of positive ints or None, got \[0\]"),
    ],
)
def test_report_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationReport(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data": 5}, r"data must be one of \('val', 'test'\) or an iterable of batches, got 5"),
        ({"report_dir": 5}, r"report_dir must be a path or None, got 5"),
    ],
)
def test_report_raises_on_wrong_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        QuantizationReport(**kwargs)


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("report_first", [True, False])
@pytest.mark.parametrize("quant", ["qat", "ptq"])
def test_report_after_quantization_in_either_order(quant, report_first, flow, tmp_path):
    seed_everything(0)
    callback = (
        QuantizationAwareTraining(flow=flow, export_dir=tmp_path)
        if quant == "qat"
        else PostTrainingQuantization(flow=flow, export_dir=tmp_path, progress=False)
    )
    report = QuantizationReport(max_batches=2)
    logger = CSVLogger(tmp_path, name="logs")
    quiet_trainer(
        callbacks=[report, callback] if report_first else [callback, report], max_epochs=2, logger=logger
    ).fit(BoringClassifier())
    assert sorted(p.name for p in tmp_path.glob("report*")) == ["report.json", "report.manifest.json", "report.md"]
    saved = json.loads((tmp_path / "report.json").read_text())
    server_file = "pt2" if flow == "pt2e" else "torchscript"
    assert saved["metric"]["name"] == "accuracy" and saved["sizes"]["files"][server_file] > 0
    assert set(saved["latency_ms"]["fp32"]) == {"1", "16"}  # 1 and the training batch size
    # the file a server runs is timed where it is served, and the fastest way to serve is named at each size
    assert set(saved["latency_ms"]["files"]) == {server_file}
    assert all(ms > 0 for ms in saved["latency_ms"]["files"][server_file].values())
    assert set(saved["serve"]) == {"1", "16"} and all(s.endswith("than fp32") for s in saved["serve"].values())
    assert "What to serve, on this machine:" in (tmp_path / "report.md").read_text()
    assert [l["name"] for l in saved["layers"]] == ["features.0", "head"]
    if quant == "qat":  # the fp32 reference is the float architecture kept before preparation
        assert saved["sizes"]["fp32_state_dict"] < 4 * saved["sizes"]["int8_state_dict"] + 2000
    logger.save()
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "report/output_sqnr_db" in metrics and "report/int8_metric" in metrics


@pytest.mark.parametrize("flow", FLOWS)
def test_qat_validate_int8_logs_the_int8_metric_of_the_modules_own_metric(flow):
    seed_everything(0)

    class Spy(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.values = getattr(self, "values", []) + [
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            ]

    dm = DigitsDataModule(batch_size=64, limit=600)
    model = Classifier(DigitsCNN(width=8))
    qat = QuantizationAwareTraining(flow=flow, quant_start_epoch=1, validate_int8=True, export=None)
    spy = Spy()
    quiet_trainer(callbacks=[qat, spy], max_epochs=2).fit(model, datamodule=dm)
    assert "val/acc_int8" not in spy.values[0]  # epoch 0: quantization had not started
    logged = spy.values[1]["val/acc_int8"]
    x = torch.cat([b[0] for b in dm.val_dataloader()])
    y = torch.cat([b[1] for b in dm.val_dataloader()])
    with torch.no_grad(), quantized_engine("x86"):
        expected = float((qat.quantized_model(x).argmax(-1) == y).float().mean())
    assert logged == pytest.approx(expected, abs=1e-6)
    assert "val/acc" in spy.values[1]


def test_qat_validate_int8_argument_check():
    with pytest.raises(TypeError, match=r"validate_int8 must be True or False, got 'yes'"):
        QuantizationAwareTraining(validate_int8="yes")
