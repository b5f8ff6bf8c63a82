"""The CSV tables: loading a dataset or split CSV, validating its rows, exclusions, rejected rows.

Every stage reads its CSVs through this module, so a table is parsed, checked and
normalised in exactly one way; the image files behind the rows are checked by ``image_io``.

Row numbers in errors
    Loaders return frames whose index (named ``csv_row``) is the 1-based row
    number of each row in the CSV it was read from: the header is row 1, the
    first data row is row 2, as a spreadsheet shows it. ``df.attrs["source"]``
    holds that CSV's path. Filtering keeps both, so a row that fails anywhere
    later (validation, a DataLoader worker) is reported as
    ``<csv file>:<row>: <reason>``. A frame built in memory without these
    falls back to ``<DataFrame>`` and its own index labels.

Bad rows
    A command refuses the first bad row in one line naming file, row and the remedy,
    or with ``--skip-bad`` sets every bad row aside in ``rejected_rows.csv`` and goes on
    (:class:`BadRows`, :func:`set_aside`); the values, the files and the decoding are
    checked separately but set aside the same way.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

import columns
import distributed
import image_io
import io_utils
from errors import DataError

# Where every stage sets bad rows aside with --skip-bad (in its --out-dir).
# The remedy an error names where the running command has --skip-bad ({them}: it/them).
SKIP_BAD_REMEDY = f"--skip-bad sets {{them}} aside in {columns.REJECTED_CSV}"


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Which columns of a user's own CSV hold the image path, patient id, age and label."""
    image: str = "image_path"
    patient: str = "patient_id"
    age: str = "age"
    label: str = "fracture"


@dataclasses.dataclass(frozen=True)
class Checks:
    """How far :func:`validate_frame` looks at the image files: not at all, the cheap checks
    (``images``), or also decoding every one (``decode``), on ``num_workers`` threads."""
    images: bool = True
    decode: bool = False
    num_workers: int | None = None


@dataclasses.dataclass(frozen=True)
class BadRows:
    """What a command does with bad rows: refuse the first (naming ``remedy``, the running
    command's flag; ``None`` where it has none), or with ``skip`` (``--skip-bad``) record them
    in ``rejected_csv`` (after the rows already there, unless not ``append``) and go on."""
    skip: bool = False
    rejected_csv: str | os.PathLike | None = None
    append: bool = True
    remedy: str | None = SKIP_BAD_REMEDY


def bad_rows_error(source: Any, problems: Mapping[Any, str], order: Iterable[Any], what: str = "bad rows",
                   remedy: str | None = SKIP_BAD_REMEDY) -> DataError:
    """The one-line error for a set of bad rows: the first in ``order``, how many more, and
    ``remedy`` (a flag the running command accepts; ``None`` where it has none)."""
    row = next(r for r in order if r in problems)
    extra = [f"+{len(problems) - 1} more {what}"] if len(problems) > 1 else []
    if remedy:
        extra.append(remedy.format(them="them" if len(problems) > 1 else "it"))
    return DataError.at(source, row, problems[row] + (f" ({'; '.join(extra)})" if extra else ""))


# --------------------------------------------------------------------------- CSV loading

def _refuse_repeated_columns(path: Path) -> None:
    """pandas renames a repeated header (``fx``, ``fx.1``) and the first one would be used
    silently, whichever of two conflicting columns that is: refuse it, naming both."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = [c.strip() for c in next(csv.reader(f), [])]
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if name in seen:
            raise DataError.at(path, 1, f"column {name!r} appears twice (columns {seen[name]} and {i}); "
                                        "keep one of them")
        seen[name] = i


def _read_csv(path: Path) -> pd.DataFrame:
    """All cells as text (only empty cells missing), rows numbered as in the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError.at(path, None, "CSV file not found")
    if path.stat().st_size == 0:
        raise DataError.at(path, None, "CSV file is empty (zero bytes)")
    try:
        # "NA", "null", ... are real values here (e.g. an AO code), so only "" is missing.
        df = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        line = re.search(r"line (\d+)", str(exc))  # pandas counts lines from 1, header included
        raise DataError.at(path, line.group(1) if line else None, f"cannot parse CSV: {exc}") from None
    _refuse_repeated_columns(path)
    df.columns = [str(c).strip() for c in df.columns]
    df.index = pd.RangeIndex(2, len(df) + 2, name=columns.ROW_INDEX_NAME)
    df.attrs["source"] = str(path)
    return df


def _require_columns(df: pd.DataFrame, required: Iterable[str], source: Any) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError.at(source, 1, f"missing required column {missing[0]!r} "
                           f"(has: {', '.join(map(str, df.columns))})")


def _flag_values(s: pd.Series) -> pd.Series:
    """GRAZPEDWRI-DX flags: ``1`` or empty (= 0). Anything else is kept, so validation can name it."""
    num = pd.to_numeric(s, errors="coerce")
    text = s.astype(object)
    bad_text = text.notna() & num.isna()  # e.g. "yes": kept as NaN-with-reason below
    out = num.fillna(0.0).astype("float64")
    out[bad_text] = np.nan
    return out


def index_images(root: str | os.PathLike, extensions: Sequence[str] = (".png",)) -> dict[str, str]:
    """Map file stem -> absolute path for every image under ``root`` (one ``os.walk``).

    Sub-folders are searched too (the real download unpacks into
    ``images_part1`` .. ``images_part4``). Hidden folders are skipped. If one
    stem occurs twice, the first in sorted walk order wins and a note is printed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError.at(root, None, "image folder not found")
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, str] = {}
    dupes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            if stem in found:
                dupes += 1
                continue
            found[stem] = os.path.abspath(os.path.join(dirpath, name))
    if dupes:
        print(f"note: {root}: {dupes} image file name(s) occur in more than one sub-folder; "
              "the first one found is used")
    return found


def load_grazpedwri(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    age_bounds: Sequence[float] = columns.AGE_BOUNDS) -> pd.DataFrame:
    """Load GRAZPEDWRI-DX's ``dataset.csv`` as distributed (BOM, ``1``/empty flags).

    Images are looked up as ``<filestem>.png`` anywhere under ``image_root``
    (default: the CSV's folder). A row whose image is not found keeps the path
    where it was expected; :func:`validate_frame` reports it. Returns the
    canonical columns (``fracture = fracture_visible == 1``; ``age_group`` from
    ``age`` with ``age_bounds``, missing where the age is unusable) followed by
    the source columns.
    """
    csv_path = Path(csv_path)
    raw = _read_csv(csv_path)
    _require_columns(raw, ("filestem", "patient_id", "age", "fracture_visible"), csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    found = index_images(root)
    stems = raw["filestem"].fillna("").astype(str).str.strip()
    image_path = [found.get(s) or os.path.abspath(root / f"{s}.png") for s in stems]

    df = pd.DataFrame(index=raw.index)
    df["image_path"] = image_path
    df["patient_id"] = raw["patient_id"]
    df["age"] = pd.to_numeric(raw["age"], errors="coerce")
    for flag in columns.FLAG_COLUMNS:
        if flag in raw.columns:
            raw[flag] = _flag_values(raw[flag])
    df["fracture"] = raw["fracture_visible"]
    for name in columns.SOURCE_COLUMNS:
        if name in raw.columns:
            df[name] = raw[name]
    df["filestem"] = stems
    df = _finish(df, csv_path, age_bounds)
    return df


def load_generic(csv_path: str | os.PathLike, column_map: ColumnMap = ColumnMap(),
                 image_root: str | os.PathLike | None = None,
                 age_bounds: Sequence[float] = columns.AGE_BOUNDS) -> pd.DataFrame:
    """Load a user's own CSV through a column mapping.

    ``column_map.image`` holds image paths, absolute or relative to ``image_root``
    (default: the CSV's folder); ``column_map.label`` is the fracture label, 0 or 1.
    Other columns are carried through unchanged.
    """
    csv_path = Path(csv_path)
    raw = _read_csv(csv_path)
    mapping = {column_map.image: "image_path", column_map.patient: "patient_id", column_map.age: "age",
               column_map.label: "fracture"}
    _require_columns(raw, mapping, csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    # A user column that happens to carry a canonical name would clash with the mapped one.
    clash = [c for c in mapping.values() if c in raw.columns and c not in mapping]
    raw = raw.drop(columns=clash).rename(columns=mapping)
    raw["image_path"] = [os.path.abspath(root / p) if isinstance(p, str) and p.strip() else ""
                         for p in raw["image_path"]]
    raw["age"] = pd.to_numeric(raw["age"], errors="coerce")
    raw["fracture"] = pd.to_numeric(raw["fracture"], errors="coerce")
    for flag in columns.FLAG_COLUMNS:
        if flag in raw.columns:
            raw[flag] = _flag_values(raw[flag])
    return _finish(raw, csv_path, age_bounds)


def _finish(df: pd.DataFrame, source: Path, age_bounds: Sequence[float]) -> pd.DataFrame:
    age = df["age"].astype("float64")
    groups = pd.Series(pd.NA, index=df.index, dtype="Int64")
    ok = age.notna()
    if ok.any():
        groups[ok] = columns.age_to_group(age[ok].to_numpy(), age_bounds)
    df["age_group"] = groups
    df = columns.coerce_frame(df[columns.ordered_columns(df.columns)])
    df.index.name = columns.ROW_INDEX_NAME
    df.attrs["source"] = str(source)
    return df


def detect_format(csv_path: str | os.PathLike) -> str:
    """``grazpedwri`` if the header has GRAZPEDWRI-DX's columns, else ``generic``."""
    with open(csv_path, encoding="utf-8-sig") as fh:
        header = {h.strip() for h in fh.readline().split(",")}
    return "grazpedwri" if {"filestem", "fracture_visible", "patient_id", "age"} <= header else "generic"


def load_dataset(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, fmt: str = "auto",
                 column_map: ColumnMap = ColumnMap(),
                 age_bounds: Sequence[float] = columns.AGE_BOUNDS) -> pd.DataFrame:
    """Load either format; ``fmt="auto"`` recognises GRAZPEDWRI-DX by its header
    (``column_map`` applies to the generic format only)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError.at(csv_path, None, "CSV file not found")
    if fmt == "auto":
        fmt = detect_format(csv_path)
    if fmt == "grazpedwri":
        return load_grazpedwri(csv_path, image_root, age_bounds=age_bounds)
    if fmt == "generic":
        return load_generic(csv_path, column_map, image_root, age_bounds)
    raise ValueError(f"unknown dataset format {fmt!r} (auto, grazpedwri, generic)")


def read_split_csv(path: str | os.PathLike, validate: bool = True) -> pd.DataFrame:
    """Read a pipeline CSV (age_test.csv, age_pool.csv, ...) with the contract's dtypes.

    Checks that the canonical columns are there and that it has rows (an empty
    split is an error); with ``validate`` also the values (no image checks).
    """
    path = Path(path)
    df = _read_csv(path)
    _require_columns(df, columns.CANONICAL, path)
    if df.empty:
        raise DataError.at(path, None, "empty split: no data rows")
    df = columns.coerce_frame(df)
    df.index.name = columns.ROW_INDEX_NAME
    df.attrs["source"] = str(path)
    if validate:
        # written by stages 1-2, so nothing to skip here: a bad row means the file was edited
        df = validate_frame(df, path, Checks(images=False), BadRows(remedy=None))
    return df


# --------------------------------------------------------------------------- validation

def exclusion_mask(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in columns.EXCLUDABLE:
        raise ValueError(f"unknown exclusion {name!r}; choose from {', '.join(columns.EXCLUDABLE)}")
    if name not in df.columns:
        return pd.Series(False, index=df.index)
    return pd.to_numeric(df[name], errors="coerce").fillna(0).astype(float) == 1


def apply_exclusions(df: pd.DataFrame, exclude: Iterable[str] = ("metal",)) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Drop images with any of the ``exclude`` flags set; return the rest and counts.

    Default: only ``metal`` (implants hide the bone and are rare; keeping them
    would teach the model hardware, not fractures). ``cast`` and
    ``diagnosis_uncertain`` are optional: casts are common (28 %) and a strong
    fracture shortcut, so the evaluation reports metrics with and without them
    instead of dropping them by default. A flag column the data lacks excludes
    nothing and is listed under ``missing_columns``.
    """
    exclude = [e for e in exclude if e and e != "none"]
    counts: dict[str, Any] = {"rows_in": int(len(df)), "excluded": {}, "missing_columns": []}
    drop = pd.Series(False, index=df.index)
    for name in exclude:
        mask = exclusion_mask(df, name)
        if name not in df.columns:
            counts["missing_columns"].append(name)
        counts["excluded"][name] = int(mask.sum())
        drop |= mask
    counts["rows_excluded"] = int(drop.sum())
    out = df.loc[~drop]
    counts["rows_out"] = int(len(out))
    return out, counts


def _file_identity(path: str) -> str:
    """Device and inode of the file ``path`` names (symlinks followed), so that hard links to
    one file are one image; the resolved path when it cannot be looked up."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return f"inode {st.st_dev}:{st.st_ino}"


def _duplicate_problems(keys: pd.Series, paths: pd.Series, pids: pd.Series, how: str) -> dict[Any, str]:
    """Rows whose ``keys`` (row -> image identity) repeat, and why each is bad.

    Under one patient the repeat is a duplicate row (the later rows are flagged). Under
    two or more patients every row of the image is flagged: it cannot be known which
    patient is right, and keeping any of them could put one image in two splits.
    """
    out: dict[Any, str] = {}
    groups: dict[Any, list[Any]] = {}
    for row, key in keys[keys.duplicated(keep=False)].items():  # rows in frame order
        groups.setdefault(key, []).append(row)
    for rows in groups.values():

        def same(r: Any, o: Any) -> str:
            return "also in" if paths[r] == paths[o] else f"{how} {paths[o]} in"

        if pids[rows].nunique() == 1:
            for r in rows[1:]:
                out[r] = f"duplicate image row: {paths[r]} is {same(r, rows[0])} row {rows[0]}"
            continue
        for r in rows:
            o = next(x for x in rows if pids[x] != pids[r])
            out[r] = (f"image {paths[r]} of patient {pids[r]} is {same(r, o)} row {o} under patient {pids[o]}: "
                      "one image cannot belong to two patients; correct the patient ids")
    return out


def validate_frame(df: pd.DataFrame, source: Any = None, checks: Checks = Checks(), bad_rows: BadRows = BadRows(),
                   age_bounds: Sequence[float] | None = None) -> pd.DataFrame:
    """Check a canonical frame; raise on the first bad row, or set bad rows aside.

    Checked: required columns; image path and patient id present; age present
    and within 0..25 years; ``fracture`` and flag columns 0/1; no image twice:
    by path, resolved (symlinks) when ``checks.images``, and by decoded pixels with
    ``checks.decode`` (under one patient the later rows are the duplicates; under two
    patients every row of that image is bad, naming the other); with
    ``checks.images`` the files (missing, not a regular file, zero bytes, not an
    image, truncated; ``checks.decode`` decodes them all and refuses degenerate ones).
    ``age_group`` is (re)computed from ``age`` when ``age_bounds`` is given or
    the column is missing; otherwise an existing one is kept and only checked
    to be an integer >= 0 (a split CSV records the bounds it was made with).

    Bad rows are refused or set aside as ``bad_rows`` says (:func:`set_aside`).
    ``df.attrs["n_rejected"]`` says how many were set aside;
    ``df.attrs["image_check"]`` how the files were checked and how long it took
    (also printed), on ``checks.num_workers`` threads (default: one per core).
    """
    source = source if source is not None else df.attrs.get("source", "<DataFrame>")
    _require_columns(df, ("image_path", "patient_id", "age", "fracture"), source)
    df = columns.coerce_frame(df)
    problems = _value_problems(df, check_group=age_bounds is None)
    image_check = _file_problems(df, problems, source, checks)
    good = set_aside(df, problems, source, bad_rows, ("bad row", "usable rows")).copy()
    if age_bounds is not None or "age_group" not in good.columns:
        good["age_group"] = columns.age_to_group(good["age"].to_numpy(), age_bounds or columns.AGE_BOUNDS)
    for name in ("age_group", "fracture") + columns.FLAG_COLUMNS:
        if name in good.columns:
            good[name] = pd.to_numeric(good[name]).astype("int64")
    good = good[columns.ordered_columns(good.columns)]
    good.index.name = columns.ROW_INDEX_NAME
    good.attrs.update(source=str(source), n_rejected=len(problems), image_check=image_check)
    return good


def set_aside(df: pd.DataFrame, problems: Mapping[Any, str], source: Any, bad_rows: BadRows,
              nouns: tuple[str, str]) -> pd.DataFrame:
    """``df`` without the rows in ``problems`` (row -> reason), as ``bad_rows`` says: without
    ``bad_rows.skip`` the first bad row in frame order raises one line naming file, row,
    reason, how many more and the remedy; with it they are recorded in
    ``bad_rows.rejected_csv`` and left out. ``nouns``: what a bad row is and what must be
    left (``("undecodable image", "decodable images")``); none left is an error."""
    bad_noun, left = nouns
    if problems and not bad_rows.skip:
        raise bad_rows_error(source, problems, df.index, what=f"{bad_noun}s", remedy=bad_rows.remedy)
    is_bad = df.index.isin(list(problems))
    kept = df.loc[~is_bad]
    kept.attrs.update(df.attrs)
    if problems:
        if bad_rows.rejected_csv is not None:
            bad = df.loc[is_bad]
            record_rejected(bad, [problems[r] for r in bad.index], source, bad_rows.rejected_csv,
                            append=bad_rows.append)
        where = f" -> {bad_rows.rejected_csv}" if bad_rows.rejected_csv is not None else ""
        print(f"{source}: set aside {len(problems)} {bad_noun}(s) of {len(df)} (--skip-bad){where}", flush=True)
    if kept.empty:
        raise DataError.at(source, None, f"no {left} left" + (f" ({len(problems)} rejected)" if problems else ""))
    return kept


def _value_problems(df: pd.DataFrame, check_group: bool) -> dict[Any, str]:
    """Row -> the first thing wrong with its values (ids, age, label, flags, age group)."""
    problems: dict[Any, str] = {}

    def flag(mask: pd.Series, reason: Any) -> None:
        for row in df.index[mask.to_numpy()]:
            if row not in problems:
                problems[row] = reason(row) if callable(reason) else reason

    flag(df["image_path"].astype(str).str.strip() == "", "no image path")
    flag(df["patient_id"].astype(str).str.strip() == "", "patient_id missing")
    age = df["age"].astype("float64")
    flag(age.isna(), "age missing or not a number")
    flag(age < 0, lambda r: f"age {age[r]:g} is negative")
    flag(age > columns.MAX_AGE, lambda r: f"age {age[r]:g} is over {columns.MAX_AGE:g} years")
    frac = pd.to_numeric(df["fracture"], errors="coerce").astype("float64")
    flag(~frac.isin([0.0, 1.0]),
         lambda r: "label (fracture) missing or not a number" if pd.isna(frac[r])
         else f"label (fracture) must be 0 or 1, got {frac[r]:g}")
    for name in columns.FLAG_COLUMNS:
        if name in df.columns:
            vals = pd.to_numeric(df[name], errors="coerce").astype("float64")
            flag(~vals.isin([0.0, 1.0]), lambda r, n=name, v=vals: f"flag {n!r} must be 1 or empty, got "
                 + ("text" if pd.isna(v[r]) else f"{v[r]:g}"))
    if "age_group" in df.columns and check_group:
        ag = pd.to_numeric(df["age_group"], errors="coerce").astype("float64")
        flag(~(ag.notna() & (ag >= 0) & (np.mod(ag.fillna(0), 1) == 0)) & age.notna(),
             lambda r: f"age_group must be an integer >= 0, got {df.at[r, 'age_group']}")
    return problems


def _file_problems(df: pd.DataFrame, problems: dict[Any, str], source: Any, checks: Checks) -> dict[str, Any]:
    """Add to ``problems`` the rows whose image is another row's (one image, one row) and,
    with ``checks.images``, whose file is unusable; returns how the files were checked."""
    paths = df["image_path"].astype(str)
    pids = df["patient_id"]
    named = paths[paths.str.strip() != ""]
    # One image, one row: a symlink, a hard link, or another spelling of the path is the same
    # file. Looking at the filesystem only when the images are looked at.
    same_file = named.map(_file_identity if checks.images else os.path.normpath)
    for row, reason in _duplicate_problems(same_file, paths, pids, "the same file as").items():
        problems.setdefault(row, reason)
    if not checks.images:
        return {"mode": "none"}
    todo = [(r, p) for r, p in zip(df.index, paths) if r not in problems]
    reasons, digests, image_check = image_io.check_image_files([p for _, p in todo], decode=checks.decode,
                                                               num_workers=checks.num_workers)
    print(f"{source}: image check ({image_check['mode']}, {image_check['threads']} thread(s)): "
          f"{image_check['files']} files in {image_check['seconds']:.1f} s", flush=True)
    decoded = {}
    for (row, _), reason, digest in zip(todo, reasons, digests):
        if reason is not None:
            problems[row] = reason
        elif digest is not None:
            decoded[row] = digest
    # decoded: the same pixels under two file names (a copy, a re-encoding) are one image too
    if decoded:
        by_pixels = pd.Series(decoded).reindex([r for r in df.index if r in decoded])
        for row, reason in _duplicate_problems(by_pixels, paths, pids, "identical in pixels to").items():
            problems.setdefault(row, reason)
    return image_check


def record_rejected(bad: pd.DataFrame, reasons: Sequence[str], source: Any, rejected_csv: str | os.PathLike,
                    append: bool = True) -> Path:
    """Write ``bad`` (rows indexed by CSV row) with their ``reasons`` to ``rejected_csv``:
    columns ``source_file, source_row, reason`` + the row's own. With ``append`` the rows
    already there stay, and a row set aside again (same file, row and reason) is listed once."""
    bad = bad.copy()
    bad.insert(0, "reason", list(reasons))
    bad.insert(0, "source_row", bad.index)
    bad.insert(0, "source_file", str(source))
    bad = bad.astype(object).where(bad.notna(), "")
    if append and Path(rejected_csv).is_file():
        old = pd.read_csv(rejected_csv, dtype=str, keep_default_na=False)
        bad = pd.concat([old, bad.astype(str)], ignore_index=True).drop_duplicates(
            subset=["source_file", "source_row", "reason"], keep="last")
    return io_utils.write_csv(bad, rejected_csv)


def check_decodable(df: pd.DataFrame, img_size: int, cache_dir: str | os.PathLike | None = None,
                    bad_rows: BadRows = BadRows(), num_workers: int | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Decode every image of ``df`` once, before any DataLoader worker meets it.

    With ``cache_dir`` this is the cache warm-up at ``img_size`` (later epochs read the
    cache); without, the images are decoded and dropped (``image_io.decode_all``). Either
    way every image is decoded, so a file that passed the cheap checks but is corrupt
    inside (a damaged IDAT chunk behind an intact IEND) is found here, with all the others
    like it.

    Undecodable images are refused or set aside as ``bad_rows`` says (:func:`set_aside`:
    ``DataError("<csv>:<row>: <reason> (+N more undecodable images; --skip-bad ...)")``);
    the CSV itself is not changed. ``attrs["n_undecodable"]`` says how many were left out.
    """
    source = df.attrs.get("source", "<DataFrame>")
    stats = image_io.decode_all(df["image_path"].astype(str).tolist(), img_size, cache_dir,
                                num_workers=num_workers, progress=progress)
    problems = {df.index[i]: reason for i, reason in stats["failed"].items()}
    kept = set_aside(df, problems, source, bad_rows, ("undecodable image", "decodable images"))
    kept.attrs["n_undecodable"] = len(problems)
    return kept


def decode_pass(df: pd.DataFrame, img_size: int, *, cache_dir: str | Path | None, skip_bad: bool,
                rejected_csv: str | Path | None, progress: bool = False) -> pd.DataFrame:
    """:func:`check_decodable` before the first epoch or inference: rank 0 decodes
    (into the cache) and every rank gets the same rows back.

    Every image is decoded here anyway (the cache warm-up), so this is where a file that
    passed stage 1's cheap checks but cannot be decoded fails, in one line, rather than in
    a DataLoader worker hours into training.
    """
    kept = None
    if distributed.is_main():
        kept = check_decodable(df, img_size, cache_dir,
                               BadRows(skip=skip_bad, rejected_csv=rejected_csv), progress=progress)
    dropped = distributed.broadcast_object(
        [r for r in df.index if r not in kept.index] if kept is not None else None)
    if kept is None:
        kept = df.drop(index=dropped)
        kept.attrs.update(df.attrs)
    return kept
