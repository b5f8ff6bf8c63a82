"""The column contract of every CSV the pipeline reads or writes, and the name of every file.

This module is the single place that says which columns exist, what type they
have, what they mean, which stage writes them and which stages read them. The
README's column table is generated from it (:func:`markdown_table`), and
:func:`coerce_frame` casts a freshly read CSV to these types, so a stage never
has to guess whether ``patient_id`` is ``"17"`` or ``17``.

It is also the one home of the file names of a run directory (:class:`RunDir`):
every script, the driver and the tests derive their paths from it.

Row numbering: frames produced by the loaders carry, as their index (named
``csv_row``), the 1-based line number of each row in the CSV it came from
(the header is line 1, the first data row is line 2), so every error can name
``<file>:<row>``. The index is never written to the CSVs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

AGE_BOUNDS: tuple[float, float] = (8.0, 15.0)
AGE_GROUP_NAMES: tuple[str, ...] = ("0-7 y", "8-14 y", "15-19 y")
# Ages above this are taken as a unit error (months, days) rather than a patient.
MAX_AGE: float = 25.0
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
ROW_INDEX_NAME = "csv_row"

STAGE0 = "dataset.csv (GRAZPEDWRI-DX or phantom.py)"
STAGE1 = "age_split_testset.py"
STAGE2 = "generate_age_trainval_split.py"
STAGE3 = "train_age_classifier.py"
STAGE4 = "train_fracture_per_agegroup.py"
STAGE5 = "evaluate.py"
ALL_STAGES = f"{STAGE2}, {STAGE3}, {STAGE4}, {STAGE5}"


@dataclass(frozen=True)
class Column:
    """One column of a pipeline CSV."""

    name: str
    dtype: str  # "str" | "int" | "float"
    meaning: str
    producer: str
    consumers: str


CANONICAL: tuple[str, ...] = ("image_path", "patient_id", "age", "age_group", "fracture")
FLAG_COLUMNS: tuple[str, ...] = (
    "initial_exam", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal",
)
SOURCE_COLUMNS: tuple[str, ...] = (
    "filestem", "study_number", "timehash", "gender", "laterality", "projection",
    "initial_exam", "ao_classification", "cast", "diagnosis_uncertain", "osteopenia",
    "fracture_visible", "metal", "pixel_spacing", "device_manufacturer",
)
# Stage 3's columns with the default bounds' three groups; prediction_columns(n) for n groups.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "age_group_label", "age_group_prob_0", "age_group_prob_1", "age_group_prob_2",
)
# The columns GRAZPEDWRI-DX's dataset.csv has, in its order.
GRAZPEDWRI_COLUMNS: tuple[str, ...] = (
    "filestem", "patient_id", "study_number", "timehash", "gender", "age", "laterality",
    "projection", "initial_exam", "ao_classification", "cast", "diagnosis_uncertain",
    "osteopenia", "fracture_visible", "metal", "pixel_spacing", "device_manufacturer",
)
# Exclusion filters apply_exclusions accepts: rows with the flag set are dropped.
EXCLUDABLE: tuple[str, ...] = ("metal", "cast", "diagnosis_uncertain", "osteopenia")
REJECTED_COLUMNS: tuple[str, ...] = ("source_file", "source_row", "reason")

_src = f"{STAGE1} (from the source CSV)"
COLUMNS: tuple[Column, ...] = (
    Column("image_path", "str", "absolute path of the image file (PNG, JPEG or DICOM)", _src, ALL_STAGES),
    Column("patient_id", "str", "patient identifier; all splits are grouped by it (surrounding whitespace "
           "is stripped; case and leading zeros count)", _src, ALL_STAGES),
    Column("age", "float", "age at the examination, years (0-25 accepted)", _src, ALL_STAGES),
    Column("age_group", "int",
           "TRUE age group from `age`: 0 if age < 8, 1 if 8 <= age < 15, 2 if age >= 15 (bounds configurable)",
           STAGE1, ALL_STAGES),
    Column("fracture", "int", "label: 1 = fracture visible on this image, 0 = not (`fracture_visible == 1`)",
           _src, f"{STAGE4}, {STAGE5}"),
    Column("split", "str", "train / val / test (`pool` in age_pool.csv before stage 2)",
           f"{STAGE1}, {STAGE2}", f"{STAGE3}, {STAGE4}, {STAGE5}"),
    Column("filestem", "str", "GRAZPEDWRI-DX file name without `.png`", _src, "reports"),
    Column("study_number", "int", "study number of the patient", _src, "reports"),
    Column("timehash", "int", "anonymised acquisition time", _src, "reports"),
    Column("gender", "str", "M / F / O", _src, "reports"),
    Column("laterality", "str", "L / R wrist", _src, "reports"),
    Column("projection", "int", "1 = AP/PA, 2 = lateral, 3 = oblique", _src, "reports"),
    Column("initial_exam", "int", "1 = initial examination, 0 = follow-up", _src, "reports"),
    Column("ao_classification", "str", "AO/OTA fracture code(s); may be set when the fracture is not visible",
           _src, "reports"),
    Column("cast", "int", "1 = plaster cast on the image (strong fracture shortcut)", _src, f"{STAGE5} (with/without cast)"),
    Column("diagnosis_uncertain", "int", "1 = radiologist unsure", _src, "exclusion filter"),
    Column("osteopenia", "int", "1 = osteopenia", _src, "exclusion filter"),
    Column("fracture_visible", "int", "source label flag (1 / empty in dataset.csv, here 1 / 0)", _src, "reports"),
    Column("metal", "int", "1 = metal implant on the image (excluded by default)", _src, "exclusion filter"),
    Column("pixel_spacing", "float", "mm per pixel", _src, "reports"),
    Column("device_manufacturer", "str", "X-ray device manufacturer", _src, "reports"),
    Column("age_group_label", "int", "PREDICTED age group (argmax of the age classifier)", STAGE3, f"{STAGE4}, {STAGE5}"),
    Column("age_group_prob_0", "float", "predicted probability of age group 0", STAGE3, STAGE5),
    Column("age_group_prob_1", "float", "predicted probability of age group 1", STAGE3, STAGE5),
    Column("age_group_prob_2", "float", "predicted probability of age group 2", STAGE3, STAGE5),
    Column("source_file", "str", "CSV the rejected row came from (rejected_rows.csv only)", "every stage", "people"),
    Column("source_row", "int", "1-based line of the rejected row in that CSV, header = 1", "every stage", "people"),
    Column("reason", "str", "why the row was rejected (rejected_rows.csv only)", "every stage", "people"),
)
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}

SPLIT_CSV_COLUMNS: tuple[str, ...] = CANONICAL + ("split",) + SOURCE_COLUMNS

# --------------------------------------------------------------------------- file names
# The files of a run directory (``--out-dir``); :class:`RunDir` joins them to one.
TEST_CSV = "age_test.csv"
POOL_CSV = "age_pool.csv"
TRAIN_CSV = "age_train_tmp.csv"
VAL_CSV = "age_val_tmp.csv"
REJECTED_CSV = "rejected_rows.csv"
TEST_MANIFEST = "age_test_split.json"
TRAINVAL_MANIFEST = "age_trainval_split.json"
RUN_STATE = "run_state.json"
METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "test_predictions.csv"
REPORT_DIR = "report"
REPORT_MD = "report.md"
CACHE_DIR = "image.cache"
MODELS_DIR = "saved_agegroup_models"
PHANTOM_DIR = "phantom"
# A dataset folder: GRAZPEDWRI-DX's metadata file (and the phantom's) and its images.
DATASET_CSV = "dataset.csv"
IMAGES_DIR = "images"
# Checkpoints (in the models folder) are named by a stem: the age classifier's, or the
# fracture models' prefix plus a role (agegroup0..2, pooled, pooled_continued). Each stem
# also names the model's other files (:func:`model_files`).
AGE_MODEL = "age_classifier"
FRACTURE_MODEL = "fracture_classifier"
POOLED_ROLE = "pooled"
CONTROL_ROLE = "pooled_continued"
THRESHOLDS_JSON = "thresholds.json"
CALIBRATION_JSON = "calibration.json"
# Written by export.py: the self-describing copy of a run's models.
EXPORT_DIR = "export"
SYSTEM_JSON = "system.json"
MODEL_CARD_MD = "MODEL_CARD.md"
# One TensorBoard log folder per model (by checkpoint stem) under this folder.
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_SUFFIX = ".pt"
LAST_SUFFIX = "_last.pt"
HISTORY_SUFFIX = "_metrics.csv"
CONFIG_SUFFIX = "_config.json"


def group_role(group: int) -> str:
    """The role (checkpoint stem suffix) of age group ``group``'s fracture model."""
    return f"agegroup{group}"


def fracture_model(role: str) -> str:
    """The stem of a fracture model: ``fracture_classifier_<role>``."""
    return f"{FRACTURE_MODEL}_{role}"


def seed_suffix(seed: int) -> str:
    """What a further training seed's model files add to the stem (the first seed's files keep
    the plain names, which predict.py and the user-facing docs use)."""
    return f"_seed{seed}"


def model_files(stem: str) -> dict[str, str]:
    """The names of one model's files: best checkpoint, resumable state, per-epoch metrics, config."""
    return {"best": stem + CHECKPOINT_SUFFIX, "last": stem + LAST_SUFFIX, "history": stem + HISTORY_SUFFIX,
            "config": stem + CONFIG_SUFFIX}


@dataclass(frozen=True)
class RunDir:
    """Every path of one run, derived from its output directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    test_csv = property(lambda self: self.root / TEST_CSV)
    pool_csv = property(lambda self: self.root / POOL_CSV)
    train_csv = property(lambda self: self.root / TRAIN_CSV)
    val_csv = property(lambda self: self.root / VAL_CSV)
    rejected_csv = property(lambda self: self.root / REJECTED_CSV)
    test_manifest = property(lambda self: self.root / TEST_MANIFEST)
    trainval_manifest = property(lambda self: self.root / TRAINVAL_MANIFEST)
    run_state = property(lambda self: self.root / RUN_STATE)
    metrics_json = property(lambda self: self.root / METRICS_JSON)
    predictions_csv = property(lambda self: self.root / PREDICTIONS_CSV)
    report_dir = property(lambda self: self.root / REPORT_DIR)
    cache_dir = property(lambda self: self.root / CACHE_DIR)
    models_dir = property(lambda self: self.root / MODELS_DIR)
    phantom_dir = property(lambda self: self.root / PHANTOM_DIR)
    export_dir = property(lambda self: self.root / EXPORT_DIR)
    tensorboard_dir = property(lambda self: self.root / TENSORBOARD_DIR)
    split_csvs = property(lambda self: (self.train_csv, self.val_csv, self.test_csv))

    def config(self, script: str) -> Path:
        """The effective-config JSON a script writes into the run directory."""
        return self.root / (script + CONFIG_SUFFIX)


# The folders of a run directory the pipeline writes into (besides the directory itself);
# only these are searched for orphaned temporary files, so a run in "." never walks
# unrelated trees.
RUN_SUBDIRS: tuple[str, ...] = (MODELS_DIR, REPORT_DIR, CACHE_DIR, PHANTOM_DIR, EXPORT_DIR)

# Which CSV holds which columns; "+ ..." means "and whatever the previous stage had".
CSV_FILES: dict[str, tuple[str, str]] = {
    TEST_CSV: (STAGE1, "canonical + split + source columns; stage 3 adds the prediction columns"),
    POOL_CSV: (STAGE1, "patients not in the test set; input of stage 2"),
    TRAIN_CSV: (STAGE2, f"as {TEST_CSV}"),
    VAL_CSV: (STAGE2, f"as {TEST_CSV}"),
    REJECTED_CSV: ("every stage with --skip-bad (stages 3-5: images that cannot be decoded)",
                   "source_file, source_row, reason + the row's columns"),
}


def column(name: str) -> Column:
    """The contract of one column (KeyError if the pipeline does not know it)."""
    return BY_NAME[name]


def num_age_groups(bounds: Sequence[float]) -> int:
    return len(bounds) + 1


def prediction_columns(n_groups: int) -> tuple[str, ...]:
    """The columns stage 3 writes for ``n_groups`` age groups: the label, then one probability each."""
    return ("age_group_label",) + tuple(f"age_group_prob_{g}" for g in range(n_groups))


def _contract(name: str) -> Column | None:
    """The contract of column ``name``; the probability of an age group beyond the default
    three shares group 0's."""
    if name not in BY_NAME and re.fullmatch(r"age_group_prob_\d+", name):
        return BY_NAME["age_group_prob_0"]
    return BY_NAME.get(name)


def _check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    b = tuple(float(x) for x in bounds)
    if not b or any(hi <= lo for lo, hi in zip(b, b[1:])):
        raise ValueError(f"age bounds must be strictly increasing, got {bounds!r}")
    return b


def age_to_group(age: float | Sequence[float] | np.ndarray | pd.Series,
                 bounds: Sequence[float] = AGE_BOUNDS) -> int | np.ndarray:
    """Age group(s) from age(s) in years: group g holds ``bounds[g-1] <= age < bounds[g]``.

    With the default bounds: 0 for age < 8, 1 for 8 <= age < 15, 2 for age >= 15.
    A scalar in gives an ``int``; an array in gives an ``int64`` array. Missing
    ages raise ``ValueError`` (they are bad input, not a group).
    """
    b = _check_bounds(bounds)
    scalar = np.ndim(age) == 0
    arr = np.asarray(age, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("age_to_group: missing (NaN) age")
    groups = np.digitize(arr, b, right=False).astype(np.int64)
    return int(groups) if scalar else groups


def age_group_names(bounds: Sequence[float] = AGE_BOUNDS) -> tuple[str, ...]:
    """Readable names of the groups; ``AGE_GROUP_NAMES`` for the default bounds."""
    b = _check_bounds(bounds)
    if b == AGE_BOUNDS:
        return AGE_GROUP_NAMES

    def fmt(x: float) -> str:
        return f"{x:g}"

    names = [f"<{fmt(b[0])} y"]
    names += [f"{fmt(lo)}-<{fmt(hi)} y" for lo, hi in zip(b, b[1:])]
    names.append(f">={fmt(b[-1])} y")
    return tuple(names)


def ordered_columns(columns: Iterable[str]) -> list[str]:
    """Known columns in contract order first, unknown (user) columns after, in their order."""
    cols = list(columns)
    known = [c.name for c in COLUMNS if c.name in cols]
    return known + [c for c in cols if c not in BY_NAME]


def _to_str(s: pd.Series) -> pd.Series:
    def one(v: object) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, float) and v.is_integer():
            return str(int(v))  # a numeric id read as 17.0 is the id "17"
        return str(v)

    out = s.astype(object).where(s.notna(), "")
    return out.map(one).astype(object)


def patient_ids(values: Iterable[object]) -> pd.Series:
    """Patient ids as the pipeline compares them: text with surrounding whitespace removed.

    ``"P1 "`` and ``"P1"`` are one patient (a stray space from a spreadsheet must not split
    a child into two patients, one of whom could land in the test set and the other in
    training). Case and leading zeros are significant: ``"007"`` and ``"7"``, ``"A1"`` and
    ``"a1"`` are different patients, since a hospital's ids may legitimately differ only
    there; :func:`lookalike_patient_ids` finds such pairs so that stage 1 can point them out.
    A numeric id read as ``17.0`` is the id ``"17"``.
    """
    s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    return _to_str(s).str.strip()


def lookalike_patient_ids(ids: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of distinct ids that differ only in case or leading zeros, sorted."""
    groups: dict[str, set[str]] = {}
    for pid in set(ids):
        key = re.sub(r"(?<!\d)0+(?=\d)", "", pid).casefold()
        groups.setdefault(key, set()).add(pid)
    return sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)


def coerce_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Cast the known columns of ``df`` to their contract dtypes (returns a copy).

    ``patient_id`` -> :func:`patient_ids` (text, surrounding whitespace removed);
    ``str`` -> Python strings (missing -> ""), ``float`` -> float64 (unparsable ->
    NaN), ``int`` -> int64, or pandas nullable ``Int64`` when values are missing.
    Integer columns holding non-integral numbers (e.g. a label of 0.5) are left as
    float so that :func:`tables.validate_frame` can name the bad row
    instead of the cast silently rounding it.
    """
    out = df.copy()
    for name in out.columns:
        col = _contract(name)
        if col is None:
            continue
        s = out[name]
        if name == "patient_id":
            out[name] = patient_ids(s)
        elif col.dtype == "str":
            out[name] = _to_str(s)
        elif col.dtype == "float":
            out[name] = pd.to_numeric(s, errors="coerce").astype("float64")
        else:
            num = pd.to_numeric(s, errors="coerce").astype("float64")
            finite = num.dropna()
            if not finite.empty and not np.all(np.equal(np.mod(finite.to_numpy(), 1), 0)):
                out[name] = num
            elif num.isna().any():
                out[name] = num.astype("Int64")
            else:
                out[name] = num.astype("int64")
    return out


def markdown_table() -> str:
    """The column contract as a Markdown table (pasted into the README)."""
    lines = ["| column | type | meaning | written by | read by |", "| --- | --- | --- | --- | --- |"]
    for c in COLUMNS:
        lines.append(f"| `{c.name}` | {c.dtype} | {c.meaning} | {c.producer} | {c.consumers} |")
    lines += ["", "| file | written by | columns |", "| --- | --- | --- |"]
    for fname, (producer, what) in CSV_FILES.items():
        lines.append(f"| `{fname}` | {producer} | {what} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table())
