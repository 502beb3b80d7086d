"""The wheel carries the app's configs: installed from it, `lightning-quant` runs from an empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "lightning_quant").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert listed == found | {"lightning_quant.app.conf"}


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_wheel_installed_in_a_fresh_virtualenv_runs_the_default_experiment(tmp_path):
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        tmp_path,
    )
    (wheel,) = dist.glob("lightning_quant-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    # the dependencies (torch, lightning, hydra...) come from this interpreter's site-packages,
    # added after the new environment's own, so the package itself can only come from the wheel
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)

    where = _run([str(python), "-c", "import lightning_quant; print(lightning_quant.__file__)"], tmp_path).stdout
    assert Path(where.strip()).is_relative_to(site)

    empty = tmp_path / "run"
    empty.mkdir()
    result = _run(
        [
            str(venv / "bin" / "lightning-quant"),
            "trainer.max_epochs=3",
            "trainer.enable_progress_bar=false",
            "benchmark.repeats=3",
            "benchmark.warmup=1",
        ],
        empty,
    )
    assert "| accuracy (test)" in result.stdout and "| latency batch 32 (ms)" in result.stdout
    (metrics_file,) = empty.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "ok" and metrics["float_acc"] >= 0.9
    assert metrics["int8_acc"] >= metrics["float_acc"] - 0.02
    assert sorted(metrics["export_paths"]) == ["torchscript"]  # export "default" on x86
    assert all(
        Path(p).is_relative_to(empty) and Path(p).stat().st_size > 10_000 for p in metrics["export_paths"].values()
    )
