"""Every config in every group composes and instantiates, in process, not only the default."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from lightning_quant import (
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationCallback,
)
from lightning_quant.app.main import build_callbacks, check_config
from tests.helpers import executorch_usable

CONF = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str, tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.run.dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)  # what a real run sets
    HydraConfig.instance().set_config(cfg)
    return cfg


def instantiate_all(cfg) -> dict:
    for key in ("data", "model", "trainer", "quant", "callbacks", "distillation"):
        check_config(cfg.get(key), key)
    quant, callbacks = build_callbacks(cfg)
    return {
        "data": instantiate(cfg.data),
        "model": instantiate(cfg.model),
        "trainer": instantiate(cfg.trainer, callbacks=callbacks),
        "quant": quant,
        "callbacks": callbacks,
    }


def test_every_group_has_its_options():
    assert options("quant") == ["dynamic", "none", "ptq", "qat", "qat_kd", "qat_steps", "weight_only"]
    assert options("backend") == ["fbgemm", "qnnpack", "x86", "xnnpack"]
    assert options("observer") == ["histogram", "minmax", "moving_average"]
    assert options("logger") == ["csv", "none", "tensorboard"]
    assert options("experiment") == [
        "digits_ptq",
        "digits_qat",
        "minilm_dynamic",
        "minilm_mixed",
        "minilm_torchao_qat",
        "mnist5k_qat_kd",
        "reviews_lstm_dynamic",
    ]
    assert options("hydra/launcher") == ["parallel", "slurm"]


@pytest.mark.parametrize("option", options("quant"))
def test_quant_configs(option, tmp_path):
    objects = instantiate_all(composed(f"quant={option}", tmp_path=tmp_path))
    expected = {
        "qat": QuantizationAwareTraining,
        "qat_kd": QuantizationAwareTraining,
        "qat_steps": QuantizationAwareTraining,
        "ptq": PostTrainingQuantization,
        "dynamic": PostTrainingQuantization,
        "weight_only": PostTrainingQuantization,
        "none": type(None),
    }[option]
    assert isinstance(objects["quant"], expected)
    assert any(isinstance(c, KnowledgeDistillation) for c in objects["callbacks"]) == (option == "qat_kd")
    if option == "dynamic":
        assert objects["quant"].mode.value == "dynamic"
    if option == "qat_steps":
        schedule = objects["quant"].schedule
        assert (schedule.unit, schedule.start, schedule.freeze_bn, schedule.freeze_observers) == ("step", 40, 120, 140)
    if option == "weight_only":
        assert (objects["quant"].mode.value, objects["quant"].config.scheme.value) == (
            "weight_only",
            "int8_weight_only",
        )
        assert [t.value for t in objects["quant"].config.export] == ["state_dict"]


@pytest.mark.parametrize("quant", ["qat", "ptq"])
@pytest.mark.parametrize("backend", options("backend"))
def test_backend_configs(backend, quant, tmp_path):
    flow = "pt2e" if backend == "xnnpack" else "fx"  # xnnpack is a backend of the pt2e flow only
    if flow == "pt2e":
        if not executorch_usable():
            pytest.skip("needs executorch: pip install 'lightning-quant[executorch]'")
    overrides = (f"quant={quant}", f"backend={backend}", f"quant.recipe.flow={flow}")
    callback = instantiate_all(composed(*overrides, tmp_path=tmp_path))["quant"]
    assert callback.config.backend.value == backend
    assert callback.config.per_channel is (backend != "qnnpack")
    phone = {"qnnpack": "mobile", "xnnpack": "executorch"}
    server = "pt2" if flow == "pt2e" else "torchscript"
    assert [t.value for t in callback.config.export] == [server, *([phone[backend]] if backend in phone else [])]


def test_xnnpack_with_the_fx_flow_names_the_pairs_that_exist(tmp_path):
    with pytest.raises(Exception, match=r"flow='fx' has no backend 'xnnpack'; the backends of each flow are"):
        instantiate_all(composed("backend=xnnpack", tmp_path=tmp_path))


@pytest.mark.parametrize("observer", options("observer"))
def test_observer_configs(observer, tmp_path):
    for quant in ("qat", "ptq"):
        callback = instantiate_all(composed(f"quant={quant}", f"observer={observer}", tmp_path=tmp_path))["quant"]
        assert callback.config.observer.value == observer


def test_quant_configs_keep_their_own_observer_by_default(tmp_path):
    assert instantiate_all(composed("quant=qat", tmp_path=tmp_path))["quant"].config.observer.value == "moving_average"
    assert instantiate_all(composed("quant=ptq", tmp_path=tmp_path))["quant"].config.observer.value == "histogram"


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs(logger, tmp_path):
    trainer = instantiate_all(composed(f"logger={logger}", tmp_path=tmp_path))["trainer"]
    names = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "none": None}
    assert (type(trainer.logger).__name__ if trainer.logger else None) == names[logger]


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_configs(callbacks, tmp_path):
    objects = instantiate_all(composed(f"callbacks={callbacks}", tmp_path=tmp_path))
    names = {type(c).__name__ for c in objects["callbacks"]}
    assert ("ModelCheckpoint" in names) == (callbacks == "default")


def test_an_experiment_sets_the_root_options_it_names(tmp_path):
    """An experiment's float_epochs and benchmark win over the defaults in config.yaml."""
    cfg = composed("experiment=minilm_torchao_qat", tmp_path=tmp_path)
    assert (cfg.float_epochs, cfg.benchmark.repeats, cfg.benchmark.warmup) == (2, 10, 2)
    assert composed(tmp_path=tmp_path).float_epochs == 0
    # and the command line wins over both
    assert composed("experiment=minilm_torchao_qat", "float_epochs=1", tmp_path=tmp_path).float_epochs == 1


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_configs(experiment, tmp_path):
    objects = instantiate_all(composed(f"experiment={experiment}", tmp_path=tmp_path))
    assert isinstance(objects["model"], pl.LightningModule)
    assert isinstance(objects["data"], pl.LightningDataModule)
    assert isinstance(objects["quant"], QuantizationCallback)


@pytest.mark.parametrize(
    ("data", "model"), [("digits", "digits_cnn"), ("mnist5k", "mnist_cnn"), ("reviews", "reviews_lstm")]
)
def test_data_and_model_configs(data, model, tmp_path):
    objects = instantiate_all(composed(f"data={data}", f"model={model}", "data.limit=300", tmp_path=tmp_path))
    datamodule, net = objects["data"], objects["model"].net
    datamodule.setup("fit")
    x, _ = next(iter(datamodule.train_dataloader()))
    assert net(x).shape[-1] == objects["model"].hparams.num_classes


def test_minilm_data_and_model_configs(tmp_path):
    objects = instantiate_all(
        composed("data=reviews_minilm", "model=minilm_classifier", "data.limit=64", tmp_path=tmp_path)
    )
    objects["data"].setup("fit")
    x, _ = next(iter(objects["data"].train_dataloader()))
    assert x.shape[1:] == (2, 48) and objects["model"].net(x[:4]).shape == (4, 2)


def test_hparams_search_config(tmp_path):
    cfg = composed("hparams_search=optuna", tmp_path=tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {
        "quant.schedule.freeze_bn_epoch",
        "quant.schedule.freeze_observers_epoch",
        "quant.recipe.observer",
        "quant.recipe.per_channel",
        "model.lr",
    }
    get_class(cfg.hydra.sweeper._target_)


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_launcher_configs(launcher, tmp_path):
    cfg = composed(f"hydra/launcher={launcher}", tmp_path=tmp_path)
    get_class(cfg.hydra.launcher._target_)
    if launcher == "slurm":
        assert cfg.hydra.launcher.cpus_per_task == 8 and cfg.hydra.launcher.timeout_min == 60
    else:
        assert cfg.hydra.launcher.n_jobs == 2


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("quant.schedule.freeze_bn_epok=3", r"Could not override 'quant.schedule.freeze_bn_epok'"),
        ("sead=3", r"Could not override 'sead'"),
        ("seed=abc", r"Error merging override seed=abc"),
    ],
)
def test_bad_keys_and_values_fail_at_compose(override, match, tmp_path):
    with pytest.raises(Exception, match=match) as error:
        composed(override, tmp_path=tmp_path)
    if override == "seed=abc":
        assert "Value 'abc' of type 'str' could not be converted to Integer" in str(error.value.__cause__)


def test_unknown_key_in_a_yaml_node_is_named(tmp_path):
    cfg = composed(tmp_path=tmp_path)
    OmegaConf.set_struct(cfg, False)
    cfg.quant.freeze_bn_epok = 3
    with pytest.raises(
        ValueError,
        match=r"quant.freeze_bn_epok is not an argument of "
        r"lightning_quant.QuantizationAwareTraining; it takes \['batch_to_input', 'convert_on_fit_end', ",
    ):
        check_config(cfg.quant, "quant")


def test_bad_value_fails_before_training_naming_the_argument(tmp_path):
    cfg = composed("quant.recipe.observer=ema", tmp_path=tmp_path)
    with pytest.raises(
        Exception, match=r"observer must be one of \('moving_average', 'minmax', 'histogram'\), got 'ema'"
    ):
        instantiate_all(cfg)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("trainer.max_epochs=abc", r"trainer.max_epochs must be an int, got 'abc'"),
        ("+trainer.limit_train_batches=-2", r"trainer.limit_train_batches must be a non-negative int"),
        ("benchmark.repeats=0", r"benchmark.repeats must be >= 1 and benchmark.warmup >= 0, got repeats=0"),
        ("benchmark.batch_sizes=[0]", r"benchmark.batch_sizes must be positive ints, got \[0\]"),
        (
            "objective.metric=int8_accuracy",
            r"objective.metric must be one of \['float_acc', 'int8_acc'.*got 'int8_accuracy'",
        ),
        ("float_epochs=-1", r"float_epochs must be >= 0 \(0: no float pre-training\), got -1"),
    ],
)
def test_run_values_are_checked_before_anything_runs(override, match, tmp_path):
    from lightning_quant.app.main import check_run_values

    cfg = composed(override, tmp_path=tmp_path)
    with pytest.raises(ValueError, match=match):
        check_run_values(cfg)
    check_run_values(composed(tmp_path=tmp_path))  # the defaults pass
