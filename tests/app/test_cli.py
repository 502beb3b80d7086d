"""The callbacks from a LightningCLI YAML (trainer.callbacks with class_path)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_lightning_cli_yaml_runs_qat_and_distillation(tmp_path):
    config = (ROOT / "examples" / "lightning_cli" / "qat_digits.yaml").read_text()
    config = config.replace("default_root_dir: outputs/lightning_cli", f"default_root_dir: {tmp_path}")
    config = config.replace("max_epochs: 4", "max_epochs: 2").replace(
        "freeze_observers_epoch: 3", "freeze_observers_epoch: null"
    )
    (tmp_path / "cli.yaml").write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_quant.app.cli", "fit", "--config", str(tmp_path / "cli.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[KD] teacher: a frozen float copy of 'net'" in result.stderr + result.stdout
    exported = next(tmp_path.glob("lightning_logs/version_0/quantized/model_int8.pt"))
    scripted = torch.jit.load(str(exported))
    torch.backends.quantized.engine = "x86"
    assert scripted(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert next(tmp_path.glob("lightning_logs/version_0/quantized/model_int8.ptl")).stat().st_size > 1000
