"""The scripts as users run them: --help, and bad input reported in one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("age_split_testset.py", "generate_age_trainval_split.py", "train_age_classifier.py",
           "train_fracture_per_agegroup.py", "run_all_training.py", "evaluate.py", "predict.py",
           "benchmark.py", "phantom.py")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--" in proc.stdout


def test_bad_row_is_one_line_naming_file_and_row(tiny_phantom: Path, tmp_path: Path):
    df = pd.read_csv(tiny_phantom / "dataset.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    df.loc[3, "age"] = "-2"  # data row 4 = line 5 of the file (header is line 1)
    bad = tmp_path / "dataset.csv"
    df.to_csv(bad, index=False, encoding="utf-8-sig")
    proc = _run("age_split_testset.py", "--data-csv", str(bad), "--image-root", str(tiny_phantom),
                "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {bad}:5: age") and lines[0].endswith("is negative")


@pytest.mark.parametrize("variant", ["fp32+turbo", "bf16@0"])
def test_bad_benchmark_variant_is_one_line(variant: str, tmp_path: Path):
    proc = _run("benchmark.py", "--device", "cpu", "--sections", "train", "--variants", variant,
                "--out", str(tmp_path / "b.json"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith("error: --variants:") and repr(variant.split("+")[-1].split("@")[-1]) in proc.stderr
    assert not (tmp_path / "b.json").exists()
