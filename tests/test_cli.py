"""The scripts as users run them: --help, and bad input reported in one line."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import columns

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
    df = pd.read_csv(tiny_phantom / columns.DATASET_CSV, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    df.loc[3, "age"] = "-2"  # data row 4 = line 5 of the file (header is line 1)
    bad = tmp_path / columns.DATASET_CSV
    df.to_csv(bad, index=False, encoding="utf-8-sig")
    proc = _run("age_split_testset.py", "--data-csv", str(bad), "--image-root", str(tiny_phantom),
                "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {bad}:5: age")
    assert lines[0].endswith("is negative (--skip-bad sets it aside in rejected_rows.csv)")


@pytest.mark.parametrize("variant", ["fp32+turbo", "bf16@0"])
def test_bad_benchmark_variant_is_one_line(variant: str, tmp_path: Path):
    proc = _run("benchmark.py", "--device", "cpu", "--sections", "train", "--variants", variant,
                "--out", str(tmp_path / "b.json"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith("error: --variants:") and repr(variant.split("+")[-1].split("@")[-1]) in proc.stderr
    assert not (tmp_path / "b.json").exists()


def _assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_bad_option_fails_before_any_work_in_one_line(tmp_path: Path):
    proc = _run("predict.py", "scan.png", "--batch-size", "0")
    _assert_one_line_error(proc, "error: predict.py: argument --batch-size: must be an integer >= 1, got 0")
    assert proc.stdout == ""  # refused while parsing: no config printed, nothing started


def _run_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, script: str,
                    *argv: str) -> tuple[int, str, str]:
    """errors.run(main, parser) of ``script`` with ``argv``, as its ``__main__`` block calls it."""
    import importlib

    import errors

    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exc:
        errors.run(module.main, module.get_args_parser())
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("argv, words", [
    (["predict.py", "scan.png", "--output", "{tmp}"], "argument --output: {tmp} is a folder"),
    (["predict.py", "scan.png", "--threshold", "1.5"], "argument --threshold: must be a number in [0, 1], got 1.5"),
    (["age_split_testset.py", "--age-bounds", "15", "8"], "argument --age-bounds: must be strictly increasing"),
    (["age_split_testset.py", "--test-frac", "0"], "argument --test-frac: must be a fraction in (0, 0.5], got 0"),
    (["generate_age_trainval_split.py", "--val-frac", "0.7"], "argument --val-frac: must be a fraction in (0, 0.5]"),
    (["train_fracture_per_agegroup.py", "--lr", "nan"], "argument --lr: must be a number > 0, got 'nan'"),
    (["train_age_classifier.py", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["run_all_training.py", "--epochs", "-3"], "argument --epochs: must be an integer >= 1, got -3"),
])
def test_bad_options_are_refused_while_parsing(argv: list[str], words: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    code, out, err = _run_in_process(monkeypatch, capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 1 and out == ""
    assert err.startswith(f"error: {argv[0]}: {words.format(tmp=tmp_path)}") and err.count("\n") == 1, err


def test_predict_malformed_thresholds_json_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture):
    bad = tmp_path / columns.THRESHOLDS_JSON
    bad.write_text('{"thresholds": {"hard": 0.3,}}')
    out = tmp_path / "pred.csv"
    code, _, err = _run_in_process(monkeypatch, capsys, "predict.py", str(tmp_path / "scan.png"),
                                   "--thresholds", str(bad), "--output", str(out))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {bad}: not valid JSON (line 1, column 29"), err
    assert not out.exists()
    code, _, err = _run_in_process(monkeypatch, capsys, "predict.py", str(tmp_path / "scan.png"),
                                   "--thresholds", str(tmp_path / "missing.json"))
    assert code == 1 and err == f"error: {tmp_path / 'missing.json'}: thresholds file not found (--thresholds)\n"


def test_predict_refuses_a_fifo_without_hanging(tmp_path: Path):
    folder = tmp_path / "scans"
    folder.mkdir()
    os.mkfifo(folder / "scan.png")  # no writer: opening it for reading would block forever
    os.mkfifo(folder / "scan")  # extension-less files are sniffed for DICOM: must not be opened
    proc = _run("predict.py", str(folder), "--output", str(tmp_path / "pred.csv"))
    _assert_one_line_error(proc, str(folder / "scan.png"), "not a regular file (FIFO)")


def test_predict_refuses_a_decompression_bomb_in_one_line_or_skips_it(tmp_path: Path):
    import cv2
    import numpy as np

    import predict
    from conftest import write_png_bomb

    folder = tmp_path / "scans"
    folder.mkdir()
    bomb = write_png_bomb(folder / "bomb.png")
    proc = _run("predict.py", str(folder), "--output", str(tmp_path / "pred.csv"))
    _assert_one_line_error(proc, str(bomb), "image too large to decode (50000x50000 px")
    good = folder / "good.png"
    cv2.imwrite(str(good), np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    kept, skipped = predict.check_readable([bomb, good], skip_bad=True)
    assert kept == [good] and len(skipped) == 1 and str(bomb) in skipped[0] and "too large" in skipped[0]


# --------------------------------------------------------------------------- the driver's data options
STAGE_MODULES = {1: "age_split_testset", 2: "generate_age_trainval_split", 3: "train_age_classifier",
                 4: "train_fracture_per_agegroup", 5: "evaluate"}
# Stage options that are the driver's own business (every path derives from its --out-dir;
# its --force means more). Every other option of stages 1 and 2, and every "data" option of
# stages 3-5, must reach the stage through the driver.
DRIVER_OWN = {1: {"--out-dir", "--force"}, 2: {"--out-dir", "--pool-csv", "--test-csv", "--force"}}


def _sample(action) -> tuple[list[str], object]:
    """Command-line tokens for ``action`` that differ from its default, and the parsed value."""
    if action.nargs == 0:
        return [], not action.default
    if action.choices:
        pick = [c for c in action.choices if c != action.default and c not in (action.default or [])][0]
        return [str(pick)], [pick] if action.nargs in ("*", "+") else pick
    if action.nargs in ("*", "+"):
        return ["7", "14.5"], [7.0, 14.5]
    typ = action.type or str
    for text in ("7", "0.3", "/elsewhere/x"):  # the first that the option's type accepts
        try:
            value = typ(text)
        except (ValueError, argparse.ArgumentTypeError):
            continue
        if value != action.default:
            return [text], value
    raise AssertionError(f"no sample value for {action.option_strings[0]}")


def _stage_options(stage: int, parser) -> list:
    if stage in DRIVER_OWN:
        return [a for a in parser._actions
                if a.option_strings and a.dest != "help" and a.option_strings[0] not in DRIVER_OWN[stage]]
    group = next(g for g in parser._action_groups if g.title == "data")
    return list(group._group_actions)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_driver_forwards_every_data_option(stage: int, tmp_path: Path):
    import importlib

    import run_all_training

    parser = importlib.import_module(STAGE_MODULES[stage]).get_args_parser()
    driver = run_all_training.get_args_parser()
    driver_data = {s for a in next(g for g in driver._action_groups if g.title == "data")._group_actions
                   for s in a.option_strings}
    options = _stage_options(stage, parser)
    assert options, "the stage has no data options to forward"
    for action in options:
        flag = action.option_strings[0]
        assert flag in driver_data, f"stage {stage}'s {flag} is not among the driver's data options"
        tokens, value = _sample(action)
        args = driver.parse_args([flag, *tokens])
        argv = run_all_training._stage_argvs(args, tmp_path, "demo")[stage]
        got = getattr(parser.parse_args(argv), action.dest)
        assert got == value, (flag, argv, got, value)
        # given to the driver, it reaches exactly the stages that take it
        for other, module in STAGE_MODULES.items():
            takes = any(flag in a.option_strings
                        for a in _stage_options(other, importlib.import_module(module).get_args_parser()))
            assert (flag in run_all_training._stage_argvs(args, tmp_path, "demo")[other]) == takes, (flag, other)


def test_driver_help_groups_the_data_options():
    proc = _run("run_all_training.py", "--help")
    data = proc.stdout.split("\ndata:\n", 1)[1].split("\n\n", 1)[0]
    for flag in ("--skip-bad", "--exclude", "--format", "--image-col", "--test-frac", "--val-frac",
                 "--age-bounds", "--no-image-check", "--decode-check", "--split-seed"):
        assert f"  {flag}" in data, flag


@pytest.mark.parametrize("module", ["run_all_training", *STAGE_MODULES.values()])
def test_the_suggested_remedy_is_an_option_of_every_command_that_suggests_it(module: str):
    import importlib

    import tables

    flag = tables.SKIP_BAD_REMEDY.split()[0]
    assert importlib.import_module(module).get_args_parser().parse_args([flag]).skip_bad is True
