"""save_int8 / load_int8: every flow's int8 model back from a file and the float model, bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lightning_quant import QuantizationAwareTraining, load_int8, quantize, save_int8
from lightning_quant.quantization import flows
from lightning_quant.quantization.convert import quantized_engine
from lightning_quant.utils.integrity import CorruptFileError, UnsafeFileError
from tests.helpers import BoringClassifier, TinyNet, quiet_trainer, random_images, requires_torchao

ROOT = Path(__file__).resolve().parents[2]


class TextNet(nn.Module):
    """An LSTM classifier: what dynamic mode is for."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return random_images(n, seed=seed).tensors[0]


def _calibration() -> list[torch.Tensor]:
    return [_images(16, seed) for seed in range(4)]


def _fresh_process_check(paths: list[Path], factory: str, x: torch.Tensor, ys: list, tmp_path: Path) -> None:
    """Load each of ``paths`` into ``factory()`` in one new interpreter and compare its output on ``x``
    with the matching ``ys``."""
    torch.save({"x": x, "ys": ys}, tmp_path / "expected.pt")
    module, name = factory.rsplit(".", 1)
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_quant import load_int8
        from lightning_quant.quantization.convert import quantized_engine
        from {module} import {name}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for path, y in zip({[str(p) for p in paths]!r}, expected["ys"]):
            model = load_int8({name}(), path)
            with quantized_engine("x86"):
                assert torch.equal(model(expected["x"]), y), path
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_static_int8_round_trip_is_bit_identical_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    x = _images(5, seed=9)
    paths, outputs = [], []
    for flow in ("fx", "eager"):
        int8 = quantize(TinyNet().eval(), _calibration(), flow=flow, progress=False)
        paths.append(save_int8(int8, tmp_path / f"tiny_{flow}_int8.pt"))
        with quantized_engine("x86"):
            outputs.append(int8(x))
    _fresh_process_check(paths, "tests.helpers.TinyNet", x, outputs, tmp_path)


def test_qat_int8_round_trip_rebuilds_the_same_structure(tmp_path):
    callback = QuantizationAwareTraining(export=None)
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(BoringClassifier())
    path = save_int8(callback.quantized_model, tmp_path / "qat_int8.pt")
    loaded = load_int8(TinyNet(), path)
    assert flows.int8_layers(loaded) == flows.int8_layers(callback.quantized_model)
    x = _images(6, seed=3)
    with quantized_engine("x86"):
        assert torch.equal(loaded(x), callback.quantized_model(x))


def test_int8_model_with_layers_kept_float_after_qat_round_trips(tmp_path):
    from lightning_quant.quantization.convert import convert_copy

    callback = QuantizationAwareTraining(export=None)
    model = BoringClassifier()
    quiet_trainer(callbacks=[callback], max_epochs=1).fit(model)
    int8 = convert_copy(model.net, "fx", "x86", keep_float=["head"])
    loaded = load_int8(TinyNet(), save_int8(int8, tmp_path / "kept_float.pt"))
    assert flows.int8_layers(loaded) == flows.int8_layers(int8) and flows.int8_layers(loaded)["head"] == "float"
    x = _images(6, seed=3)
    with quantized_engine("x86"):
        assert torch.equal(loaded(x), int8(x))


def test_dynamic_int8_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    int8 = quantize(TextNet().eval(), mode="dynamic", skip=["rnn"])
    path = save_int8(int8, tmp_path / "text_int8.pt")
    loaded = load_int8(TextNet(), path)
    x = torch.randn(4, 7, 6)
    with quantized_engine("x86"):
        assert torch.equal(loaded(x), int8(x))
    assert flows.int8_layers(loaded) == {"rnn": "float", "head": "int8"}


def test_save_int8_refuses_dynamic_lstm_weights_it_could_not_load_safely(tmp_path):
    int8 = quantize(TextNet().eval(), mode="dynamic")
    with pytest.raises(
        ValueError, match=r"hold torch's packed int8 weights as TorchScript objects .* export='torchscript'"
    ):
        save_int8(int8, tmp_path / "text_int8.pt")
    assert not (tmp_path / "text_int8.pt").exists()


def test_load_int8_reads_with_weights_only(tmp_path, monkeypatch):
    int8 = quantize(TinyNet().eval(), _calibration(), progress=False)
    path = save_int8(int8, tmp_path / "tiny_int8.pt")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    load_int8(TinyNet(), path)
    assert calls == [True]


def test_save_int8_refuses_what_it_cannot_rebuild(tmp_path):
    with pytest.raises(ValueError, match=r"save_int8 writes int8 models; TinyNet has no int8 layer"):
        save_int8(TinyNet(), tmp_path / "a.pt")
    int8 = quantize(TinyNet().eval(), _calibration(), progress=False)
    with pytest.raises(ValueError, match=r"safetensors holds plain tensors; torch.ao's int8 weights are quantized"):
        save_int8(int8, tmp_path / "a.safetensors")
    from torch.ao.quantization import get_default_qconfig_mapping

    custom = quantize(TinyNet().eval(), _calibration(), progress=False, qconfig_mapping=get_default_qconfig_mapping())
    with pytest.raises(ValueError, match=r"save_int8 cannot record how this model was made: .*custom qconfig_mapping"):
        save_int8(custom, tmp_path / "a.pt")
    assert not any(tmp_path.iterdir())  # nothing written


@requires_torchao
def test_save_int8_refuses_a_pt2e_model_naming_its_file(tmp_path):
    int8 = quantize(TinyNet().eval(), _calibration(), flow="pt2e", progress=False)
    with pytest.raises(ValueError, match=r"a pt2e int8 model is a program: write it with export='pt2'"):
        save_int8(int8, tmp_path / "a.pt")


def test_load_int8_refuses_a_float_model_of_another_shape(tmp_path):
    int8 = quantize(TinyNet().eval(), _calibration(), progress=False)
    path = save_int8(int8, tmp_path / "tiny_int8.pt")
    with pytest.raises(
        RuntimeError, match=r"size mismatch between the saved int8 weights and this float model: \['head"
    ):
        load_int8(TinyNet(num_classes=7), path)


# ---------------------------------------------------------------------- files from elsewhere
def _resave(path: Path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_load_int8_does_not_import_what_a_file_names(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "lq_side_effect.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nclass Block(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    int8 = quantize(TextNet().eval(), mode="dynamic", skip=["rnn"])
    path = save_int8(int8, tmp_path / "text_int8.pt")
    _resave(path, lambda p: p["lightning_quant_int8"]["module_types"].append("lq_side_effect.Block"))
    with pytest.raises(
        UnsafeFileError,
        match=r"unsafe to load: it names the module type 'lq_side_effect.Block', which is neither a type in TextNet "
        r"nor one of torch's; a file does not choose what gets imported. Nothing in it was run",
    ):
        load_int8(TextNet(), path)
    _resave(path, lambda p: p["lightning_quant_int8"].update(module_types=[], skip=["os.system"]))
    with pytest.raises(UnsafeFileError, match=r"it names the module type 'os.system'"):
        load_int8(TextNet(), path)
    assert not marker.exists() and "lq_side_effect" not in sys.modules


def test_load_int8_refuses_a_pickle_that_would_run_code(tmp_path):
    from tests.utils.test_integrity import bomb_bytes

    marker = tmp_path / "MARKER"
    (tmp_path / "bomb_int8.pt").write_bytes(bomb_bytes(marker))
    with pytest.raises(UnsafeFileError, match=r"bomb_int8.pt' is unsafe to load: the int8 weights file holds pickled"):
        load_int8(TinyNet(), tmp_path / "bomb_int8.pt")
    assert not marker.exists()


def test_load_int8_finds_a_flipped_byte_in_a_weight(tmp_path):
    from tests.utils.test_integrity import flip_inside

    int8 = quantize(TinyNet().eval(), _calibration(), progress=False)
    path = save_int8(int8, tmp_path / "tiny_int8.pt")
    with zipfile.ZipFile(path) as archive:  # the largest tensor storage: a weight
        storages = [info for info in archive.infolist() if info.filename.rsplit("/", 1)[-1].isdigit()]
        biggest = max(storages, key=lambda info: info.file_size).filename
    path.write_bytes(flip_inside(path.read_bytes(), biggest))
    with pytest.raises(CorruptFileError, match=rf"tiny_int8.pt' is damaged: its part '{biggest}' fails its CRC-32"):
        load_int8(TinyNet(), path)
    path.write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"tiny_int8.pt' is empty \(0 bytes\)"):
        load_int8(TinyNet(), path)


@requires_torchao
def test_torchao_safetensors_carry_a_checksum_that_load_int8_checks(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    int8 = quantize(model, mode="weight_only", flow="torchao")
    path = save_int8(int8, tmp_path / "mlp.safetensors")
    x = torch.randn(3, 64)
    assert torch.equal(load_int8(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), path)(x), int8(x))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"mlp.safetensors' is damaged: its tensors differ from the SHA-256"):
        load_int8(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), path)
