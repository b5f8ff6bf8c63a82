"""The design's settings as written down, not as the code derives them.

Stage 4 trains the fracture models with class-balanced sampling and focal loss (alpha 0.25,
gamma 2); the demo preset uses AdamW lr 2e-3 with a cosine schedule, the paper preset lr 1e-5
with ReduceLROnPlateau. The expected values below are those literals: a preset edited by
mistake, or a trainer that records something else, fails here. The fixed test set's
identity must notice an edited fracture label.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pytest

import columns
import generate_age_trainval_split
import presets
import splits
import train_fracture_per_agegroup
from errors import DataError
from models import load_checkpoint

DESIGN = {"sampler": "balanced", "loss": "focal", "focal_alpha": 0.25, "focal_gamma": 2.0}
SCHEDULE = {"demo": {"lr": 2e-3, "scheduler": "cosine"}, "paper": {"lr": 1e-5, "scheduler": "plateau"}}


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_fracture_stage_settings_of_each_preset(preset: str):
    cfg = presets.resolve_config(argparse.Namespace(preset=preset, config=None), "fracture")
    for key, value in {**DESIGN, **SCHEDULE[preset]}.items():
        assert getattr(cfg, key) == value, key


def test_stage4_checkpoints_record_the_design_settings(fresh_splits: Path):
    res = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "1", "--quiet", "--groups", "1",
         "--group-column", "age_group", "--init-from-pooled"]))
    assert set(res["models"]) == {"pooled", "agegroup1"}
    for name, model in res["models"].items():
        cfg = load_checkpoint(model["checkpoint"])["config"]
        assert cfg["preset"] == "demo"
        for key, value in {**DESIGN, **SCHEDULE["demo"]}.items():
            assert cfg[key] == value, (name, key)


def test_an_edited_label_in_the_test_csv_is_named(fresh_splits: Path):
    path = fresh_splits / columns.TEST_CSV
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.loc[3, "fracture"] = "0" if df.loc[3, "fracture"] == "1" else "1"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        splits.check_splits({str(path): pd.read_csv(path)}, path)
    assert "the fixed test set changed since stage 1 drew it" in str(err.value)
    assert "rows edited" in str(err.value) and "fracture" in str(err.value)
    with pytest.raises(DataError, match="rows edited"):
        generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(
            ["--out-dir", str(fresh_splits)]))
