"""Multirun sweeps end with one results table: unit checks, then real sweeps in subprocesses."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_quant.app.sweep import common_overrides, pareto_front, results_rows, write_results

ROOT = Path(__file__).resolve().parents[2]


def _run(name, acc, ms, overrides, status="ok", **extra):
    return {
        "run": name,
        "status": status,
        "float_acc": 0.99,
        "int8_acc": acc,
        "int8_ms_b1": ms,
        "fp32_bytes": 400,
        "int8_bytes": 100,
        "fp32_ms_b32": 2.0,
        "int8_ms_b32": 0.5,
        "overrides": overrides,
        **extra,
    }


def test_pareto_front_and_sorting():
    runs = [
        _run("0", 0.95, 1.0, ["a=1"]),
        _run("1", 0.97, 2.0, ["a=2"]),
        _run("2", 0.96, 3.0, ["a=3"]),
        _run("3", 0.97, 1.5, ["a=4"]),
        {"run": "4", "status": "failed", "error": "ValueError: bad\nthing", "overrides": ["a=5"]},
    ]
    assert pareto_front(runs, "int8_acc", "int8_ms_b1") == {"0", "3"}
    rows = results_rows(runs)
    assert [r["run"] for r in rows] == ["1", "3", "2", "0", "4"]
    assert [r["pareto"] for r in rows] == ["", "*", "", "*", ""]
    assert (
        rows[-1]["error"] == "ValueError: bad thing" and rows[0]["size_ratio"] == 4.0 and rows[0]["speedup_b32"] == 4.0
    )


def test_common_overrides_are_left_out_of_rows():
    runs = [
        _run("0", 0.9, 1.0, ["quant=qat", "trainer.max_epochs=3"]),
        _run("1", 0.9, 1.0, ["quant=ptq", "trainer.max_epochs=3"]),
    ]
    assert common_overrides(runs) == ["trainer.max_epochs=3"]
    assert [r["overrides"] for r in results_rows(runs)] == ["quant=qat", "quant=ptq"]


def test_write_results_files(tmp_path):
    for i, acc in enumerate((0.9, 0.95)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(_run(str(i), acc, 1.0 + i, [f"x={i}"])))
    table = write_results(tmp_path)
    assert table.splitlines()[2].startswith("| 1   | x=1")
    with open(tmp_path / "results.csv") as handle:
        assert [row["run"] for row in csv.DictReader(handle)] == ["1", "0"]
    assert (tmp_path / "results.md").read_text().startswith("| run")


def test_the_table_says_a_slower_int8_model_is_slower_and_the_csv_keeps_the_ratio(tmp_path):
    (tmp_path / "0").mkdir()
    slower = _run("0", 0.9, 1.0, ["x=0"], fp32_ms_b32=0.305, int8_ms_b32=0.638)
    (tmp_path / "0" / "metrics.json").write_text(json.dumps(slower))
    table = write_results(tmp_path)
    assert "| 2.09x slower |" in table and "faster" not in table
    with open(tmp_path / "results.csv") as handle:
        assert float(next(csv.DictReader(handle))["speedup_b32"]) == pytest.approx(0.305 / 0.638)


def sweep(tmp_path: Path, *overrides: str, succeeds: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "lightning_quant.app",
        "-m",
        f"hydra.sweep.dir={tmp_path}",
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=3",
        "quant.export=[]",
        *overrides,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert (result.returncode == 0) == succeeds, result.stderr[-4000:]
    return result


def _table_rows(stdout: str) -> list[list[str]]:
    lines = stdout[stdout.index("Sweep results") :].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:] if line.startswith("| ")]


@pytest.mark.slow  # 90 s, four app runs; a multirun's table is also checked by the joblib, Optuna, failed-run sweeps
def test_multirun_of_backends_and_modes_prints_one_table_of_four_rows(tmp_path):
    result = sweep(tmp_path, "quant=qat,ptq", "backend=x86,qnnpack")
    rows = _table_rows(result.stdout)
    assert sorted(r[1] for r in rows) == [
        "quant=ptq backend=qnnpack",
        "quant=ptq backend=x86",
        "quant=qat backend=qnnpack",
        "quant=qat backend=x86",
    ]
    assert all(r[2] == "ok" and float(r[4]) >= 0.9 for r in rows)
    accuracies = [float(r[4]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert any(r[10] == "*" for r in rows)
    with open(tmp_path / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_multirun_keeps_a_failed_run_in_the_table(tmp_path):
    result = sweep(tmp_path, "quant.schedule.quant_start_epoch=1,9")
    rows = {r[1]: r for r in _table_rows(result.stdout)}
    assert rows["quant.schedule.quant_start_epoch=1"][2] == "ok"
    failed = rows["quant.schedule.quant_start_epoch=9"]
    assert failed[2] == "failed" and failed[11].startswith("ValueError: freeze_observers_epoch must be after")


def test_joblib_launcher_multirun(tmp_path):
    result = sweep(tmp_path, "hydra/launcher=parallel", "quant=qat,ptq")
    assert sorted(r[1] for r in _table_rows(result.stdout)) == ["quant=ptq", "quant=qat"]
    assert "Joblib" in result.stderr + result.stdout


def test_optuna_sweep_of_two_trials(tmp_path):
    result = sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert 0.9 <= best["best_value"] <= 1.0
    assert set(best["best_params"]) == {
        "quant.schedule.freeze_bn_epoch",
        "quant.schedule.freeze_observers_epoch",
        "quant.recipe.observer",
        "quant.recipe.per_channel",
        "model.lr",
    }
    assert len(_table_rows(result.stdout)) == 2


def test_multirun_in_which_every_run_failed_exits_non_zero(tmp_path):
    # quant_start_epoch=8, 9: not before max_epochs=3, so each run fails in setup
    result = sweep(tmp_path, "quant.schedule.quant_start_epoch=8,9", succeeds=False)
    assert "every run of the sweep failed (2)" in result.stderr
    rows = _table_rows(result.stdout)
    assert [r[2] for r in rows] == ["failed", "failed"]
