"""PostTrainingQuantization in a real Trainer: static and dynamic, at fit end and at validate end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_quant import PostTrainingQuantization, quantize
from lightning_quant.demos import Classifier, DigitsCNN, DigitsDataModule
from lightning_quant.evaluation.metrics import classification_accuracy
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.flows import int8_layers
from lightning_quant.quantization.flows import output_steps as int8_output_steps
from lightning_quant.quantization.outputs import mean_cosine
from tests.helpers import (
    FLOWS,
    BoringClassifier,
    Erf,
    TinyNet,
    boundary_cost,
    quiet_trainer,
    random_images,
    refused_before_training,
    requires_torchao,
)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "weights"}, ValueError, r"mode must be one of \('static', 'dynamic', 'weight_only'\), got 'weights'"),
        ({"calibration_batches": 0}, ValueError, r"calibration_batches must be a positive int, got 0"),
        ({"calibration_batches": -3}, ValueError, r"calibration_batches must be a positive int, got -3"),
        (
            {"calibration_data": "test"},
            ValueError,
            r"calibration_data must be one of \('train', 'val'\) or an iterable of batches, got 'test'",
        ),
        (
            {"calibration_data": 5},
            TypeError,
            r"calibration_data must be one of \('train', 'val'\) or an iterable of batches, got int",
        ),
        ({"dtype": "int4"}, ValueError, r"dtype must be one of \('qint8', 'float16'\), got 'int4'"),
        (
            {"module_types": ["torch.nn.Nope"]},
            ValueError,
            r"module_types entries must be nn.Module types or import paths like 'torch.nn.LSTM', got 'torch.nn.Nope'",
        ),
        ({"module_types": []}, ValueError, r"module_types must be a non-empty sequence of nn.Module types, got \[\]"),
        ({"progress": "no"}, TypeError, r"progress must be True or False, got 'no'"),
        ({"batch_to_input": 1}, TypeError, r"batch_to_input must be a callable or None, got 1"),
        (
            {"backend": "cuda"},
            ValueError,
            r"backend must be one of \('x86', 'fbgemm', 'qnnpack', 'xnnpack'\), got 'cuda'",
        ),
        ({"search_latency": "yes"}, TypeError, r"search_latency must be True or False, got 'yes'"),
        (
            {"search_latency": True, "mode": "dynamic"},
            ValueError,
            r"search_latency=True needs mode='static' and flow='fx' .*got mode='dynamic', flow='fx'",
        ),
    ],
)
def test_ptq_raises_on_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PostTrainingQuantization(**kwargs)


@pytest.mark.parametrize("flow", FLOWS)
def test_ptq_static_on_digits_within_one_point_of_float(flow, tmp_path):
    seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    model = Classifier(DigitsCNN(width=16), lr=3e-3)
    callback = PostTrainingQuantization(flow=flow, calibration_batches=16, export_dir=tmp_path, progress=False)
    quiet_trainer(callbacks=[callback], max_epochs=4, deterministic=True).fit(model, datamodule=dm)
    float_state = {k: v.clone() for k, v in model.net.state_dict().items()}
    test = list(dm.test_dataloader())
    float_acc = classification_accuracy(model.net, test)
    int8_acc = classification_accuracy(callback.quantized_model, test, engine="x86")
    assert float_acc >= 0.95
    assert int8_acc >= float_acc - 0.01
    # the trained float model is not modified
    assert type(model.net) is DigitsCNN
    assert all(torch.equal(float_state[k], v) for k, v in model.net.state_dict().items())
    (record,) = callback.export_records.values()  # the flow's server file: TorchScript runs the same kernels,
    step = max(int8_output_steps(callback.quantized_model))  # a compiled pt2 program fuses its float arithmetic
    assert record.max_abs_diff <= (0.0 if flow == "fx" else 4 * step)


def test_ptq_at_validate_end_from_a_checkpoint_without_training(tmp_path):
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trained = BoringClassifier()
    quiet_trainer(callbacks=[checkpoint], enable_checkpointing=True, max_epochs=2).fit(trained)

    fresh = BoringClassifier()
    callback = PostTrainingQuantization(calibration_batches=2, export=None, progress=False)
    trainer = quiet_trainer(callbacks=[callback])
    trainer.validate(fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert trainer.global_step == 0
    x = next(iter(fresh.val_dataloader()))[0]
    with torch.no_grad(), quantized_engine("x86"):
        expected, got = trained.net.eval()(x), callback.quantized_model(x)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max() + 0.05


def test_ptq_calibrates_on_the_requested_number_of_batches():
    seen = []

    class Counting(list):
        def __iter__(self):
            for item in super().__iter__():
                seen.append(1)
                yield item

    data = Counting([(torch.randn(4, 1, 6, 6), torch.zeros(4)) for _ in range(10)])
    callback = PostTrainingQuantization(calibration_data=data, calibration_batches=3, export=None, progress=False)
    quiet_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1).fit(BoringClassifier())
    assert len(seen) == 3


def test_ptq_val_calibration_source():
    model = BoringClassifier()
    callback = PostTrainingQuantization(calibration_data="val", calibration_batches=1, export=None, progress=False)
    quiet_trainer(callbacks=[callback], limit_train_batches=1).fit(model)
    first_val_batch = next(iter(model.val_dataloader()))
    expected = quantize(model.net, [first_val_batch], calibration_batches=1, progress=False)
    x = torch.randn(8, 1, 6, 6) * 3
    with torch.no_grad(), quantized_engine("x86"):
        assert torch.equal(callback.quantized_model(x), expected(x))


def test_ptq_refuses_empty_or_one_shot_calibration_data_before_training():
    with pytest.raises(ValueError, match=r"calibration_data is empty \(list of length 0\): give it representative"):
        PostTrainingQuantization(calibration_data=[])
    with pytest.raises(
        ValueError,
        match=r"calibration_data is an iterator \(generator\), which is empty once read: pass a list of batches or "
        r"a DataLoader",
    ):
        PostTrainingQuantization(calibration_data=(b for b in [torch.randn(2, 1, 6, 6)]))


class _NoTrainBatches(BoringClassifier):
    def train_dataloader(self):
        return DataLoader(random_images(0), batch_size=4)


def test_ptq_refuses_an_empty_train_dataloader_in_setup():
    model = _NoTrainBatches()
    model.example_input_array = torch.randn(2, 1, 6, 6)
    refused_before_training(
        model,
        ValueError,
        match=r"calibration_data='train' is empty \(DataLoader of length 0\): give it representative",
        callbacks=[PostTrainingQuantization(export=None, progress=False)],
    )


@pytest.mark.parametrize("options", [{"dtype": "float16"}, {"module_types": ["torch.nn.LSTM"]}])
def test_static_mode_refuses_dynamic_options_in_the_callback_and_in_quantize(options):
    message = r"\['(dtype|module_types)'\] are options of mode='dynamic', but mode='static'"
    with pytest.raises(ValueError, match=message):
        PostTrainingQuantization(mode="static", **options)
    with pytest.raises(ValueError, match=message):
        quantize(TinyNet().eval(), [torch.randn(4, 1, 6, 6)], mode="static", **options)


@requires_torchao
def test_dynamic_mode_is_refused_with_the_pt2e_flow():
    match = (
        r"mode='dynamic' \(activations quantized at run time\) runs on flow='fx'/'eager'/'torchao': set flow='fx'; "
        r"flow='pt2e' runs mode='static'"
    )
    with pytest.raises(ValueError, match=match):
        PostTrainingQuantization(mode="dynamic", flow="pt2e")
    with pytest.raises(ValueError, match=match):
        quantize(TinyNet(), mode="dynamic", flow="pt2e")


def test_ptq_refuses_an_export_dir_that_is_a_file_before_training(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    refused_before_training(
        BoringClassifier(),
        ValueError,
        match=r"export_dir='.*not_a_folder' is a file, not a folder",
        callbacks=[PostTrainingQuantization(export_dir=blocker, progress=False)],
    )


class _LSTMClassifier(BoringClassifier):
    def __init__(self):
        super().__init__(net=_LSTMNet())

    def _tokens(self, seed):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 20, (32, 7), generator=g)
        return torch.utils.data.DataLoader(list(zip(tokens, (tokens[:, 0] > 9).long())), batch_size=8)

    def train_dataloader(self):
        return self._tokens(0)

    def val_dataloader(self):
        return self._tokens(1)


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def test_ptq_dynamic_lstm_and_export(tmp_path):
    callback = PostTrainingQuantization(mode="dynamic", export_dir=tmp_path, progress=False)
    model = _LSTMClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    int8 = callback.quantized_model
    assert type(int8.lstm).__name__ == "LSTM" and "dynamic" in type(int8.lstm).__module__
    assert "dynamic" in type(int8.head).__module__
    tokens = next(iter(model.val_dataloader()))[0]
    with torch.no_grad():
        assert (int8(tokens) - model.net(tokens)).abs().max() < 0.05
    assert callback.export_records["torchscript"].max_abs_diff == 0.0


def test_ptq_static_raises_when_nothing_is_quantizable():
    callback = PostTrainingQuantization(skip=["features", "head"], export=None, progress=False)
    with pytest.raises(ValueError, match=r"nothing to quantize statically: no layer was converted to int8"):
        quiet_trainer(callbacks=[callback], limit_train_batches=1).fit(BoringClassifier())


@pytest.mark.parametrize("flow", FLOWS)
def test_ptq_max_metric_drop_keeps_the_broken_layer_float(flow):
    from tests.quantization.test_ptq import _broken_mlp_and_data

    model, batches = _broken_mlp_and_data()
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))

    class Fixed(BoringClassifier):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(dataset, batch_size=32)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(dataset, batch_size=32)

    module = Fixed(net=model, lr=0.0)
    callback = PostTrainingQuantization(
        flow=flow, per_channel=False, observer="minmax", max_metric_drop=0.02, export=None, progress=False
    )
    quiet_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1).fit(module)
    search = callback.skip_search
    assert search.met and search.skipped == ["fc2"] and search.full_int8 < 0.9
    assert min(callback.sensitivity, key=callback.sensitivity.get) == "fc2"
    assert int8_layers(callback.quantized_model) == {"fc1": "int8", "fc2": "float", "fc3": "int8"}
    from lightning_quant.evaluation.metrics import classification_accuracy

    assert classification_accuracy(callback.quantized_model, batches, engine="x86") >= 0.98


def test_ptq_max_metric_drop_argument_checks():
    with pytest.raises(ValueError, match=r"max_metric_drop must be a non-negative number or None, got -0.5"):
        PostTrainingQuantization(max_metric_drop=-0.5)
    with pytest.raises(ValueError, match=r"eval_batches must be a positive int, got 0"):
        PostTrainingQuantization(eval_batches=0)


def test_ptq_calibrates_on_the_call_the_step_makes():
    """The step adds an input of its own (``extra``): calibration feeds it, so its layer has ranges."""
    from tests.callbacks.test_qat import KeywordClassifier

    seed_everything(0)
    model = KeywordClassifier()
    ptq = PostTrainingQuantization(export=None, progress=False, calibration_batches=4)
    quiet_trainer(callbacks=[ptq], max_epochs=1).fit(model)
    assert sorted(ptq.example_inputs.kwargs) == ["extra", "img"]
    x = random_images(16, seed=5).tensors[0]
    extra = torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3))], dim=1)
    with torch.no_grad():
        float_out, int8_out = model.net(img=x, extra=extra), ptq.quantized_model(img=x, extra=extra)
    assert mean_cosine(float_out, int8_out) > 0.99


def test_ptq_dynamic_search_chooses_per_layer_precision_within_a_size_budget():
    from lightning_quant.evaluation import state_dict_bytes
    from lightning_quant.quantization.search import PrecisionSearch

    class WideNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(36, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
            self.head = nn.Linear(256, 4)

        def forward(self, x):
            return self.head(self.body(x))

    seed_everything(0)
    model = BoringClassifier(net=WideNet())
    float_bytes = state_dict_bytes(WideNet())
    callback = PostTrainingQuantization(
        mode="dynamic",
        max_size_bytes=float_bytes // 2,
        search_precisions=["int8", "fp16", "float"],
        export=None,
        eval_batches=2,
    )
    quiet_trainer(callbacks=[callback], limit_train_batches=2).fit(model)
    search = callback.skip_search
    assert isinstance(search, PrecisionSearch) and search.met
    assert state_dict_bytes(callback.quantized_model) == search.final_bytes <= float_bytes // 2
    precisions = {
        n: m._packed_params.dtype
        for n, m in callback.quantized_model.named_modules()
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
    }
    for name, precision in search.layers.items():  # every layer the search raised is what it says
        if precision == "fp16":
            assert precisions[name] == torch.float16
        else:
            assert type(callback.quantized_model.get_submodule(name)) is nn.Linear


def test_ptq_search_ladder_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"search_precisions must list precisions this mode runs.*\['int8', 'float'\]"):
        PostTrainingQuantization(search_precisions=["int8", "fp16", "float"])  # static mode has no fp16
    with pytest.raises(ValueError, match=r"max_size_bytes must be a positive int or None, got 0"):
        PostTrainingQuantization(max_size_bytes=0)


def test_ptq_fp16_with_a_qnnpack_export_is_refused_before_training():
    callback = PostTrainingQuantization(
        mode="dynamic", layers={"head": "fp16"}, export=("torchscript", "mobile"), progress=False
    )
    refused_before_training(
        BoringClassifier(),
        ValueError,
        match=r"fp16 weights \(dtype, layers or search_precisions\) cannot run on the \['qnnpack'\] engine "
        r"\(backend='x86', export=\['torchscript', 'mobile'\]\): qnnpack has no half-precision kernels",
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match=r"fp16 layers \['head'\] cannot run on the 'qnnpack' engine"):
        quantize(BoringClassifier().net, mode="dynamic", backend="qnnpack", layers={"head": "fp16"})


def test_ptq_search_latency_keeps_the_layers_that_save_time_float(monkeypatch):
    """The callback's search on a model whose layer-by-layer savings and whole-model latency are
    stood in for (real timings of tiny layers are noise): the two small layers float, the large int8."""
    from lightning_quant.quantization import ptq
    from lightning_quant.quantization.flows import fx

    monkeypatch.setattr(ptq, "latency_of", boundary_cost)
    monkeypatch.setattr(fx, "float_savings", lambda int8, floated, example, repeats=30: {"5": 0.4, "3": 0.2})
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 64), Erf(), nn.Linear(64, 4), Erf(), nn.Linear(4, 4))
    callback = PostTrainingQuantization(search_latency=True, calibration_batches=2, export=None)
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(BoringClassifier(net=net))
    assert callback.latency_search is not None and callback.latency_search.kept_float == ["5", "3"]
    assert int8_layers(callback.quantized_model) == {"1": "int8", "3": "float", "5": "float"}
