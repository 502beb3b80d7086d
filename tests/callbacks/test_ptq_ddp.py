"""PTQ under DDP on two CPU processes: one int8 model, the one the union of the shards gives, on every rank."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant import QuantizationConfig
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.quantization.ptq import convert_calibrated, prepare_and_calibrate
from tests.helpers import TinyNet, launch_ranks
from tests.scripts.ddp_ptq import shard

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_ptq.py"


def run_ranks(tmp_path: Path, case: str) -> tuple[dict, dict]:
    launch_ranks(SCRIPT, tmp_path, case)
    return torch.load(tmp_path / "rank0.pt", weights_only=False), torch.load(tmp_path / "rank1.pt", weights_only=False)


def single_process(float_state: dict, observer: str):
    """One process calibrated on both ranks' batches (4 each, as calibration_batches=4 per rank)."""
    net = TinyNet()
    net.load_state_dict(float_state)
    batches = [b for rank in (0, 1) for b in list(DataLoader(shard(rank), batch_size=16))[:4]]
    config = QuantizationConfig(observer=observer, per_channel=False)
    prepared = prepare_and_calibrate(net, batches, config, calibration_batches=8, progress=False)
    return prepared, convert_calibrated(prepared, config)


def _probe_output(int8: torch.nn.Module) -> torch.Tensor:
    probe = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad(), quantized_engine("x86"):
        return int8(probe)


def _same_everywhere(rank0: dict, rank1: dict) -> None:
    assert rank0["observers"].keys() == rank1["observers"].keys()
    for name, state in rank0["observers"].items():
        for key, value in state.items():
            assert torch.equal(value, rank1["observers"][name][key]), f"{name}.{key} differs between ranks"
    assert torch.equal(rank0["int8_out"], rank1["int8_out"])
    # one set of files, written by rank 0, there for both ranks when fit returns
    assert rank0["files"] == rank1["files"] == ["model_int8.manifest.json", "model_int8.pt"]
    assert rank0["export_paths"] == rank1["export_paths"] and list(rank0["export_paths"]) == ["torchscript"]


def test_ptq_minmax_under_ddp_equals_one_process_on_the_union_of_shards(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, "minmax")
    _same_everywhere(rank0, rank1)
    prepared, int8 = single_process(rank0["float"], "minmax")
    single = {n: m.state_dict() for n, m in prepared.named_modules() if n.startswith("activation_post_process")}
    assert single.keys() == rank0["observers"].keys()
    for name, state in single.items():
        for key in ("min_val", "max_val"):
            assert torch.equal(rank0["observers"][name][key], state[key]), f"{name}.{key}"
    # the input observer saw rank 1's 4x wider data: its range is not rank 0's alone
    first = rank0["observers"]["activation_post_process_0"]
    assert float(first["max_val"] - first["min_val"]) > 2.5 * float(
        shard(0).tensors[0].max() - shard(0).tensors[0].min()
    )
    assert torch.equal(rank0["int8_out"], _probe_output(int8))


def test_ptq_histogram_under_ddp_is_within_one_step_of_one_process(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, "histogram")
    _same_everywhere(rank0, rank1)
    prepared, _ = single_process(rank0["float"], "histogram")
    for name, observer in prepared.named_modules():
        if not name.startswith("activation_post_process"):
            continue
        merged = copy.deepcopy(observer)
        merged.load_state_dict(rank0["observers"][name])
        assert float(merged.min_val) == float(observer.min_val) and float(merged.max_val) == float(observer.max_val)
        (scale_d, zero_d), (scale_s, zero_s) = merged.calculate_qparams(), observer.calculate_qparams()
        step = max(float(scale_d), float(scale_s))
        for q in (merged.quant_min, merged.quant_max):  # the ends of the representable range
            assert abs(float((q - zero_d) * scale_d) - float((q - zero_s) * scale_s)) <= step, name


def test_ptq_sensitivity_search_under_ddp_chooses_the_same_layers_on_every_rank(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, "search")
    assert rank0["skipped"] == rank1["skipped"] and rank0["skipped"] is not None
    _same_everywhere(rank0, rank1)


@pytest.mark.parametrize("callback", ["QuantizationAwareTraining", "PostTrainingQuantization"])
def test_child_process_ddp_is_refused_in_setup(callback):
    """ddp_fork runs fit in processes forked from this one: each refuses in setup, before any step, and the
    launcher hands the error back here (ddp_spawn and ddp_notebook start their processes the same way)."""
    import lightning_quant
    from tests.helpers import BoringClassifier, quiet_trainer

    trainer = quiet_trainer(callbacks=[getattr(lightning_quant, callback)()], strategy="ddp_fork", devices=2)
    model = BoringClassifier()
    with pytest.raises(Exception, match=rf"{callback} does not support DDP that starts its processes from this one"):
        trainer.fit(model)
    assert trainer.global_step == 0
