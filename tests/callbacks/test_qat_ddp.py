"""QAT under DDP on two CPU processes (a subprocess, as Lightning relaunches the script per rank)."""

from pathlib import Path

import pytest
import torch

from tests.helpers import launch_ranks, requires_torchao, visible_files

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_qat.py"


@pytest.mark.parametrize(
    ("flow", "file"), [("fx", "model_int8.pt"), pytest.param("pt2e", "model_int8.pt2", marks=requires_torchao)]
)
def test_qat_ddp_two_cpu_processes_end_with_identical_quantization_state(flow, file, tmp_path):
    launch_ranks(SCRIPT, tmp_path, flow)
    _check_ranks_agree(tmp_path, file)
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert any(k.endswith("scale") for k in rank0)
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in rank0.items() if k.endswith(".scale"))


@requires_torchao
def test_torchao_qat_ddp_two_cpu_processes_train_and_export_as_one(tmp_path):
    launch_ranks(SCRIPT, tmp_path, "torchao")
    _check_ranks_agree(tmp_path, "model_int8_state_dict.pt")
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert any(k.endswith("fake_quant_enabled") for k in rank0)


def _check_ranks_agree(tmp_path, file):
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # only global rank 0 writes the export
    assert (tmp_path / "rank0_files.txt").read_text() == f"model_int8.manifest.json\n{file}"
    assert (tmp_path / "rank1_files.txt").read_text() == ""
    # int8 validation and the report measure every rank's validation shard together, the same on both ranks
    m0, m1 = torch.load(tmp_path / "rank0_metrics.pt"), torch.load(tmp_path / "rank1_metrics.pt")
    union = (m0["correct"] + m1["correct"]) / (m0["total"] + m1["total"])
    assert (m0["total"], m1["total"]) == (24, 32)
    assert m0["val_int8"] == m1["val_int8"] == pytest.approx(union)
    assert m0["report_int8"] == m1["report_int8"] == pytest.approx(union)
    # only rank 0, which writes the report, times the model (ranks timing at once would time each other)
    assert "1" in m0["report_timed"] and m1["report_timed"] == []
    # a torchao model has no observed ranges to plot: its ranges come from each tensor at run time
    plots = ["sqnr.png"] if file.endswith("_state_dict.pt") else ["ranges.png", "sqnr.png"]
    assert visible_files(tmp_path / "report") == sorted(["report.json", "report.manifest.json", "report.md", *plots])
