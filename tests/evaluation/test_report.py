"""The report's numbers agree with independent computations and name a broken layer."""

import pytest
import torch

from lightning_quant.evaluation.metrics import state_dict_bytes
from lightning_quant.quantization.inputs import ExampleInputs
from tests.helpers import files_under, visible_files


# ---------------------------------------------------------------- the full report
def _mlp_setup(break_fc2: bool):
    import copy as _copy

    from lightning_quant.quantization import QuantizationConfig, convert_copy, get_flow
    from tests.evaluation.test_analysis import MLP

    torch.manual_seed(0)
    model = MLP().eval()
    if break_fc2:
        with torch.no_grad():
            model.fc1.weight[0] = 0.0
            model.fc1.bias[0] = -1.0
            model.fc2.weight[0, 0] = 1000 * model.fc2.weight.abs().max()
    x = torch.randn(64, 1, 6, 6)
    y = model(x).argmax(-1)
    config = QuantizationConfig(per_channel=False, observer="minmax")
    prepared = get_flow("fx").prepare(_copy.deepcopy(model), config, ExampleInputs((x,)), qat=False)
    prepared(x)
    return model, prepared, convert_copy(prepared, "fx", "x86"), x, y


def test_report_numbers_agree_with_independent_computations(tmp_path):
    from lightning_quant.evaluation.report import build_report, write_report
    from lightning_quant.quantization.convert import quantized_engine
    from lightning_quant.quantization.outputs import sqnr_db

    model, prepared, int8, x, y = _mlp_setup(break_fc2=False)
    exported = tmp_path / "model.pt"
    exported.write_bytes(b"x" * 1234)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    report = build_report(
        fp32_model=model,
        reference=model,
        int8_model=int8,
        batches=batches,
        example=ExampleInputs((x[:4],)),
        engine="x86",
        prepared=prepared,
        export_paths={"torchscript": str(exported)},
        batch_sizes=(1, 8),
        targets=y,
        repeats=3,
    )
    with torch.no_grad(), quantized_engine("x86"):
        float_out, int8_out = model(x), int8(x)
    assert report["metric"]["float"] == pytest.approx(1.0)  # labels are the float model's own predictions
    assert report["metric"]["int8"] == pytest.approx(float((int8_out.argmax(-1) == y).float().mean()))
    assert report["output_sqnr_db"] == pytest.approx(sqnr_db(float_out, int8_out), rel=1e-4)
    assert report["sizes"]["files"] == {"torchscript": 1234}
    assert report["sizes"]["int8_state_dict"] == state_dict_bytes(int8)
    assert set(report["latency_ms"]["int8"]) == {"1", "8"}
    assert [l["name"] for l in report["layers"]] == ["fc1", "fc2", "fc3"] and report["warnings"] == []
    paths = write_report(report, tmp_path / "report")
    assert visible_files(tmp_path / "report") == [
        "ranges.png",
        "report.json",
        "report.manifest.json",
        "report.md",
        "sqnr.png",
    ]
    import json

    assert json.loads(paths["json"].read_text())["output_sqnr_db"] == pytest.approx(report["output_sqnr_db"])
    assert "| fc2" in paths["md"].read_text()


def test_report_warns_and_names_the_broken_layer():
    from lightning_quant.evaluation.report import build_report, report_markdown

    model, prepared, int8, x, y = _mlp_setup(break_fc2=True)
    report = build_report(
        fp32_model=model,
        reference=model,
        int8_model=int8,
        batches=[(x, y)],
        example=ExampleInputs((x[:4],)),
        engine="x86",
        prepared=prepared,
        batch_sizes=(1,),
        targets=y,
        threshold=0.01,
        next_steps=["per_channel=True"],
        repeats=3,
    )
    assert report["worst_layers"][0] == "fc2"
    assert report["metric"]["loss"] > 0.01
    assert report["warnings"][0].startswith("int8 loses") and "worst layers: fc2" in report["warnings"][0]
    assert report["next_steps"] == ["per_channel=True"]
    assert "**Warning:**" in report_markdown(report) and "1. per_channel=True" in report_markdown(report)


def test_full_disk_while_writing_the_report_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    import errno

    from lightning_quant.evaluation.report import build_report, write_report
    from lightning_quant.utils import files

    model, prepared, int8, x, y = _mlp_setup(break_fc2=False)
    report = build_report(
        fp32_model=model,
        reference=prepared,
        int8_model=int8,
        batches=[(x, y)],
        example=ExampleInputs((x,)),
        engine="x86",
        prepared=prepared,
        targets=y,
        repeats=2,
    )
    first = write_report(report, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in visible_files(tmp_path)}
    assert sorted(before) == ["ranges.png", "report.json", "report.manifest.json", "report.md", "sqnr.png"]
    assert all(len(data) > 100 for data in before.values())
    hidden = files_under(tmp_path)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write", full)
    with pytest.raises(OSError, match="No space left on device"):
        write_report({**report, "output_sqnr_db": -1.0}, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in visible_files(tmp_path)} == before  # no 0-byte sqnr.png
    assert files_under(tmp_path) == hidden  # and nothing of the failed set left behind
    assert set(first) == {"json", "md", "sqnr_png", "ranges_png"}


def test_the_report_says_why_int8_is_slower_from_its_graph():
    """The int8 graph's crossings are counted (FX: a float op between two int8 Linear layers costs a
    dequantize and a quantize), and a batch size where int8 is slower is explained with them."""
    from lightning_quant import quantize
    from lightning_quant.evaluation.report import slower_than_float
    from lightning_quant.quantization import flows
    from tests.helpers import Erf

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Erf(), torch.nn.Linear(8, 2)).eval()
    int8 = quantize(model, [torch.randn(16, 8) for _ in range(2)], progress=False)
    graph = flows.boundaries(int8)
    assert graph == {"quantize": 2, "dequantize": 2, "float_ops": {"erf": 1}}
    report = {
        "latency_ms": {"fp32": {"1": 0.02, "32": 0.5}, "int8": {"1": 0.05, "32": 0.2}},
        "int8_graph": graph,
        "layers": [{"precision": "int8"}, {"precision": "int8"}],
    }
    assert slower_than_float(report) == (
        "int8 is slower than float at batch 1 (0.05 ms vs 0.02 ms): its graph quantizes 2 times and dequantizes 2 "
        "times around 2 int8 layer(s), each a pass over an activation, and runs in float between them: erf x1; int8 "
        "pays where layers are large and run back to back. Keep the layers around those float ops float "
        "(layers={name: 'float'}), or let the search aim at latency (quantize(..., search=Search(latency=True)))"
    )
    report["latency_ms"]["int8"]["1"] = 0.01
    assert slower_than_float(report) == ""
    dynamic = {**report, "int8_graph": {}, "latency_ms": {"fp32": {"1": 0.02}, "int8": {"1": 0.05}}}
    assert "quantizes its activations inside each layer at run time" in slower_than_float(dynamic)


def test_the_slower_than_float_warning_names_the_written_file_to_serve_instead():
    """Where the in-process int8 model is slower than float and a written file is not, the warning names that file
    with its speed; where no file is faster either, it says so."""
    from lightning_quant.evaluation.report import slower_than_float

    latency = {
        "fp32": {"1": 0.305, "32": 1.80},
        "int8": {"1": 0.638, "32": 3.02},
        "files": {"torchscript": {"1": 0.20, "32": 2.40}, "onnx": {"1": 0.25, "32": 2.10}},
    }
    report = {"latency_ms": latency, "int8_graph": {}, "layers": []}
    warning = slower_than_float(report)
    assert warning.startswith("int8 is slower than float at batch 1 (0.638 ms vs 0.305 ms), batch 32 (3.02 ms vs 1.8")
    assert warning.endswith(
        ". At batch 1 serve the torchscript file instead (0.2 ms, 1.52x faster than float); at batch 32 no written "
        "file is faster than float either (the fastest, onnx, 1.17x slower than float)"
    )
    del latency["files"]
    assert "serve the" not in slower_than_float(report) and "written file" not in slower_than_float(report)
