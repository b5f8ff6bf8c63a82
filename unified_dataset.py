"""Reading datasets and images: loaders, validation, the image cache, transforms, the Dataset.

Every stage reads data through this module, so a dataset is parsed, checked and
normalised in exactly one way.

Row numbers in errors
    Loaders return frames whose index (named ``csv_row``) is the 1-based row
    number of each row in the CSV it was read from: the header is row 1, the
    first data row is row 2, as a spreadsheet shows it. ``df.attrs["source"]``
    holds that CSV's path. Filtering keeps both, so a row that fails anywhere
    later (validation, a DataLoader worker) is reported as
    ``<csv file>:<row>: <reason>``. A frame built in memory without these
    falls back to ``<DataFrame>`` and its own index labels.

Intensity normalisation (:func:`read_image`)
    Pixels are read at their stored precision (16-bit PNGs through
    ``cv2.IMREAD_UNCHANGED``; DICOM through its modality and VOI LUTs), then each
    image is mapped to float32 [0, 1] by its own 0.5th and 99.5th percentiles.
    Radiographs from different devices and formats have unrelated absolute
    scales (12-bit data in a 16-bit container, 8-bit JPEGs, DICOM values after a
    rescale), so a fixed divisor would give each source a different contrast; a
    per-image window puts them on one scale, and using percentiles instead of the
    minimum and maximum keeps a few extreme pixels (burned-in markers, metal,
    collimator black) from compressing the anatomy into a narrow band. Only the
    outer 0.5 % tails saturate; the rest of the 16-bit range is kept at full
    precision (never reduced to 8 bits).
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import math
import os
import re
import signal
import stat
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

# albumentations checks PyPI for a newer release on import; the pipeline never reaches
# the network at run time (offline hospitals, CI), so that check is switched off.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset
from tqdm import tqdm

import columns
from errors import DataError
from io_utils import atomic_write, default_workers, write_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Where every stage sets bad rows aside with --skip-bad (in its --out-dir).
# The remedy an error names where the running command has --skip-bad ({them}: it/them).
SKIP_BAD_REMEDY = f"--skip-bad sets {{them}} aside in {columns.REJECTED_CSV}"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
PCT_LOW, PCT_HIGH = 0.5, 99.5
# The decode checks refuse images smaller than this on a side (or of one value): no
# radiograph is, and a thumbnail or placeholder would only be upscaled into noise.
MIN_IMAGE_SIDE = 32
# Percentiles from at most this many pixels: a strided subsample estimates them
# to well under one grey level and keeps full-resolution images fast.
_PCT_MAX_SAMPLES = 1 << 18


def bad_rows_error(source: Any, problems: Mapping[Any, str], order: Iterable[Any], what: str = "bad rows",
                   remedy: str | None = SKIP_BAD_REMEDY) -> DataError:
    """The one-line error for a set of bad rows: the first in ``order``, how many more, and
    ``remedy`` (a flag the running command accepts; ``None`` where it has none)."""
    row = next(r for r in order if r in problems)
    extra = [f"+{len(problems) - 1} more {what}"] if len(problems) > 1 else []
    if remedy:
        extra.append(remedy.format(them="them" if len(problems) > 1 else "it"))
    return DataError.at(source, row, problems[row] + (f" ({'; '.join(extra)})" if extra else ""))


# --------------------------------------------------------------------------- threads

def run_threaded(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                 on_result: Callable[[int, Any], None], chunksize: int = 1) -> None:
    """Call ``fn(item)`` for every item on ``workers`` threads and ``on_result(index, result)``
    in the calling thread, in completion order. An exception of ``fn`` propagates.

    Work is handed out a few chunks at a time, and however this returns (an exception, a
    Ctrl-C) the running chunks are finished and the pending ones dropped first: a thread
    still inside OpenCV while the interpreter shuts down aborts the process ("terminate
    called without an active exception", SIGABRT) instead of the Ctrl-C's exit status 130.
    The Ctrl-C itself is only noted while the threads run and raised here once they have
    stopped: a KeyboardInterrupt raised inside ``threading.Condition.wait`` can leave its
    lock released and turn into "RuntimeError: release unlocked lock".
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            on_result(i, fn(item))
        return
    chunks = iter([range(s, min(s + chunksize, len(items))) for s in range(0, len(items), chunksize)])

    def run_chunk(idx: range) -> list[tuple[int, Any]]:
        return [(i, fn(items[i])) for i in idx]

    interrupted = threading.Event()
    # only the main thread can take signals, and only Python's own Ctrl-C handler is replaced
    own_handler = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    pool = ThreadPoolExecutor(max_workers=workers)
    pending = {pool.submit(run_chunk, c) for c in itertools.islice(chunks, 2 * workers)}
    try:
        while pending and not interrupted.is_set():
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            for fut in done:
                for i, res in fut.result():
                    on_result(i, res)
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.add(pool.submit(run_chunk, nxt))
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        if own_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted.is_set():
        raise KeyboardInterrupt


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


def load_generic(csv_path: str | os.PathLike, image_col: str = "image_path", patient_col: str = "patient_id",
                 age_col: str = "age", label_col: str = "fracture",
                 image_root: str | os.PathLike | None = None,
                 age_bounds: Sequence[float] = columns.AGE_BOUNDS) -> pd.DataFrame:
    """Load a user's own CSV through a column mapping.

    ``image_col`` holds image paths, absolute or relative to ``image_root``
    (default: the CSV's folder); ``label_col`` is the fracture label, 0 or 1.
    Other columns are carried through unchanged.
    """
    csv_path = Path(csv_path)
    raw = _read_csv(csv_path)
    mapping = {image_col: "image_path", patient_col: "patient_id", age_col: "age", label_col: "fracture"}
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
                 image_col: str = "image_path", patient_col: str = "patient_id", age_col: str = "age",
                 label_col: str = "fracture", age_bounds: Sequence[float] = columns.AGE_BOUNDS) -> pd.DataFrame:
    """Load either format; ``fmt="auto"`` recognises GRAZPEDWRI-DX by its header."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError.at(csv_path, None, "CSV file not found")
    if fmt == "auto":
        fmt = detect_format(csv_path)
    if fmt == "grazpedwri":
        return load_grazpedwri(csv_path, image_root, age_bounds=age_bounds)
    if fmt == "generic":
        return load_generic(csv_path, image_col, patient_col, age_col, label_col, image_root, age_bounds)
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
        df = validate_frame(df, path, check_images=False, remedy=None)
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


def _tail_has(path: Path, marker: bytes, tail: int = 64) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - tail))
        return marker in fh.read()


def file_kind(mode: int) -> str:
    """What a ``stat`` mode is, in words (``regular file``, ``FIFO``, ...)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def degenerate_image(arr: np.ndarray) -> str | None:
    """Why a decoded image cannot be a radiograph (too small, or one value), or ``None``."""
    h, w = arr.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        return f"image too small ({w}x{h} px; at least {MIN_IMAGE_SIDE} px a side)"
    lo, hi = np.nanmin(arr), np.nanmax(arr)
    if not hi > lo:
        return f"constant image (every pixel {float(lo):g})"
    return None


def check_image_file(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Why an image file is unusable, or ``None`` if it looks fine.

    Cheap checks always (exists, a regular file (a FIFO would block a reader), not
    empty, PNG/JPEG/DICOM header, PNG ``IEND`` or JPEG end-of-image marker present, so
    truncated downloads are caught); ``decode=True`` also decodes the whole image and
    refuses degenerate ones (:func:`degenerate_image`: under ``MIN_IMAGE_SIDE`` px on a
    side, or constant). DICOM files are always decoded.
    """
    return _check_image(path, decode)[0]


def _check_image(path: str | os.PathLike, decode: bool) -> tuple[str | None, np.ndarray | None]:
    """:func:`check_image_file`'s reason, and the decoded image when it was decoded."""
    p = Path(path)
    if not str(path):
        return "no image path", None
    if not p.exists():
        return f"image file not found: {p}", None
    if not p.is_file():
        return f"image path is not a regular file ({file_kind(p.stat().st_mode)}): {p}", None
    if p.stat().st_size == 0:
        return f"zero-byte image file: {p}", None
    arr = None
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
        kind = _sniff(head, p)
        if kind == "png" and not _tail_has(p, b"IEND"):
            return f"truncated PNG (no IEND chunk): {p}", None
        if kind == "jpeg" and not _tail_has(p, b"\xff\xd9"):
            return f"truncated JPEG (no end-of-image marker): {p}", None
        if kind is None and p.suffix.lower() in IMAGE_EXTENSIONS:
            return f"not a {p.suffix.lstrip('.').upper()} file (unrecognised header): {p}", None
        if decode or kind == "dicom":
            arr = read_raw(p)
            why = degenerate_image(arr)
            if why is not None:
                return f"{why}: {p}", arr
    except DataError as exc:
        return str(exc), None
    except OSError as exc:
        return f"cannot read image file: {p}: {exc.strerror or exc}", None
    return None, arr


def _pixel_digest(arr: np.ndarray) -> str:
    """Identity of an image's pixels (shape, type and values), whatever file holds them."""
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


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


def validate_frame(df: pd.DataFrame, source: Any = None, check_images: bool = True, skip_bad: bool = False,
                   rejected_csv: str | os.PathLike | None = None, age_bounds: Sequence[float] | None = None,
                   decode: bool = False, append_rejected: bool = False, num_workers: int | None = None,
                   remedy: str | None = SKIP_BAD_REMEDY) -> pd.DataFrame:
    """Check a canonical frame; raise on the first bad row, or set bad rows aside.

    Checked: required columns; image path and patient id present; age present
    and within 0..25 years; ``fracture`` and flag columns 0/1; no image twice:
    by path, resolved (symlinks) when ``check_images``, and by decoded pixels with
    ``decode`` (under one patient the later rows are the duplicates; under two
    patients every row of that image is bad, naming the other); with
    ``check_images`` the files (missing, not a regular file, zero bytes, not an
    image, truncated; ``decode`` decodes them all and refuses degenerate ones).
    ``age_group`` is (re)computed from ``age`` when ``age_bounds`` is given or
    the column is missing; otherwise an existing one is kept and only checked
    to be an integer >= 0 (a split CSV records the bounds it was made with).

    Without ``skip_bad`` the first bad row raises ``DataError("<source>:<row>:
    <reason> (+N more ...; <remedy>)")``; ``remedy`` names the running command's
    flag (``None``: it has none). With it, bad rows go to ``rejected_csv``
    (columns ``source_file, source_row, reason`` + the row) and the rest is
    returned. ``df.attrs["n_rejected"]`` says how many were set aside;
    ``df.attrs["image_check"]`` how the files were checked and how long it took
    (also printed), on ``num_workers`` threads (default: one per core).
    """
    source = source if source is not None else df.attrs.get("source", "<DataFrame>")
    _require_columns(df, ("image_path", "patient_id", "age", "fracture"), source)
    df = columns.coerce_frame(df)
    problems = _value_problems(df, check_group=age_bounds is None)
    image_check = _file_problems(df, problems, source, check_images, decode, num_workers)
    n_bad = len(problems)
    if n_bad and not skip_bad:
        raise bad_rows_error(source, problems, df.index, remedy=remedy)
    is_bad = df.index.isin(list(problems))
    good = df.loc[~is_bad]
    if n_bad:
        if rejected_csv is not None:
            bad = df.loc[is_bad]
            record_rejected(bad, [problems[r] for r in bad.index], source, rejected_csv, append=append_rejected)
        where = f" -> {rejected_csv}" if rejected_csv is not None else ""
        print(f"{source}: set aside {n_bad} bad row(s) of {len(df)} (--skip-bad){where}")
    if good.empty:
        raise DataError.at(source, None, "no usable rows left" + (f" ({n_bad} rejected)" if n_bad else ""))
    good = good.copy()
    if age_bounds is not None or "age_group" not in good.columns:
        good["age_group"] = columns.age_to_group(good["age"].to_numpy(), age_bounds or columns.AGE_BOUNDS)
    for name in ("age_group", "fracture") + columns.FLAG_COLUMNS:
        if name in good.columns:
            good[name] = pd.to_numeric(good[name]).astype("int64")
    good = good[columns.ordered_columns(good.columns)]
    good.index.name = columns.ROW_INDEX_NAME
    good.attrs.update(source=str(source), n_rejected=n_bad, image_check=image_check)
    return good


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


def _file_problems(df: pd.DataFrame, problems: dict[Any, str], source: Any, check_images: bool, decode: bool,
                   num_workers: int | None) -> dict[str, Any]:
    """Add to ``problems`` the rows whose image is another row's (one image, one row) and,
    with ``check_images``, whose file is unusable; returns how the files were checked."""
    paths = df["image_path"].astype(str)
    pids = df["patient_id"]
    named = paths[paths.str.strip() != ""]
    # One image, one row: a symlink, a hard link, or another spelling of the path is the same
    # file. Looking at the filesystem only when the images are looked at.
    same_file = named.map(_file_identity if check_images else os.path.normpath)
    for row, reason in _duplicate_problems(same_file, paths, pids, "the same file as").items():
        problems.setdefault(row, reason)
    if not check_images:
        return {"mode": "none"}
    todo = [(r, p) for r, p in zip(df.index, paths) if r not in problems]
    reasons, digests, image_check = check_image_files([p for _, p in todo], decode=decode, num_workers=num_workers)
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
    return write_csv(bad, rejected_csv)


def check_image_files(paths: Sequence[str], decode: bool = False, num_workers: int | None = None
                      ) -> tuple[list[str | None], list[str | None], dict[str, Any]]:
    """:func:`check_image_file` for every path, on threads. Returns the reasons in order
    (``None``: fine); with ``decode`` the pixel digest of every good image (else ``None``s),
    so that copies of one image under two names can be found; and
    ``{"mode", "files", "threads", "seconds"}``.

    Decoding takes milliseconds per full-size image and releases the GIL, so it gets a
    thread per core; the cheap checks are a few system calls per file, where more than
    one thread per 256 files only adds overhead.
    """
    workers = num_workers or default_workers()
    if not decode:
        workers = max(1, min(workers, len(paths) // 256 + 1))

    def one(path: str) -> tuple[str | None, str | None]:
        reason, arr = _check_image(path, decode)
        return reason, (_pixel_digest(arr) if decode and reason is None and arr is not None else None)

    results: list[tuple[str | None, str | None]] = [(None, None)] * len(paths)
    start = time.perf_counter()
    run_threaded(one, paths, workers, results.__setitem__, chunksize=1 if decode else 64)
    info = {"mode": "decode" if decode else "cheap", "files": len(paths), "threads": workers,
            "seconds": round(time.perf_counter() - start, 3)}
    return [r for r, _ in results], [d for _, d in results], info


# --------------------------------------------------------------------------- images

def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file found in a folder is one of ours to read: an image extension, or no
    extension and DICOM's ``DICM`` magic (DICOM files often have no extension). A FIFO or
    other non-regular file is never opened here (a reader would wait forever); named like an
    image, it counts, so the image check can refuse it by name."""
    p = Path(path)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if p.suffix or not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            return _sniff(fh.read(132), p) == "dicom"
    except OSError:
        return False


def _sniff(head: bytes, path: Path) -> str | None:
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[128:132] == b"DICM" or (path.suffix.lower() in (".dcm", ".dicom") and len(head) > 0):
        # DICOM files without the preamble exist; pydicom decides whether it can read them.
        return "dicom"
    return None


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken or compressed files
        raise DataError.at(path, None, f"cannot read DICOM pixels ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        arr = arr[0]  # multi-frame: the first frame
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY)
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds, index=0).astype(np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # MONOCHROME1 stores bone dark; flip so that, as in PNGs, bone is bright.
        arr = arr.max() + arr.min() - arr
    return arr


def _png_damage(data: bytes) -> str | None:
    """Why a PNG's chunk layout is damaged (a chunk running past the end, a critical chunk
    whose CRC does not match, e.g. a damaged IDAT behind an intact IEND), or ``None``.
    Ancillary chunks (lower-case first letter) are not CRC-checked: decoders skip them."""
    view, pos = memoryview(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        end = pos + 8 + int.from_bytes(data[pos:pos + 4], "big")
        if end + 4 > len(data):
            return f"the chunk at byte {pos} runs past the end of the file"
        kind = bytes(data[pos + 4:pos + 8])
        if kind[:1].isupper() and zlib.crc32(view[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return f"CRC error in the {kind.decode('latin-1')!r} chunk at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end + 4
    return "no IEND chunk where the chunks end"


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """The image as stored, one channel: uint8/uint16 for PNG/JPEG (colour -> gray at
    the same bit depth), float64 for DICOM after modality LUT, VOI LUT/window and
    MONOCHROME1 inversion. Raises :class:`DataError` naming the file."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
        if not stat.S_ISREG(mode):  # reading a FIFO or a device would block or never end
            raise DataError.at(p, None, f"not a regular file ({file_kind(mode)})")
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError.at(p, None, "image file not found") from None
    except OSError as exc:
        raise DataError.at(p, None, f"cannot read image file: {exc.strerror or exc}") from None
    if not data:
        raise DataError.at(p, None, "zero-byte image file")
    kind = _sniff(data[:132], p)
    if kind == "dicom":
        return _read_dicom(p)
    if kind == "png" and b"IEND" not in data[-64:]:
        raise DataError.at(p, None, "truncated PNG (no IEND chunk)")
    if kind == "png" and (damage := _png_damage(data)):
        # before OpenCV, whose libpng would print its own lines to stderr and then fail
        raise DataError.at(p, None, f"cannot decode image: corrupt PNG ({damage})")
    if kind == "jpeg" and b"\xff\xd9" not in data[-64:]:
        raise DataError.at(p, None, "truncated JPEG (no end-of-image marker)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError.at(p, None, "cannot decode image (corrupt or unsupported format)")
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 2:  # gray + alpha
            img = img[:, :, 0]
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    return img


def normalize_intensity(arr: np.ndarray, low: float = PCT_LOW, high: float = PCT_HIGH) -> np.ndarray:
    """Map an image to float32 [0, 1] by its own ``low``/``high`` percentiles (see module doc)."""
    a = np.asarray(arr, dtype=np.float32)
    step = max(1, int(math.sqrt(a.size / _PCT_MAX_SAMPLES)))
    sample = a[::step, ::step] if a.ndim == 2 else a.ravel()[::step * step]
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:  # near-constant image: fall back to the full range
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, np.float32)
    out = (a - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Any supported image as float32 HxW in [0, 1] (8/16-bit PNG, JPEG, DICOM).

    Decoded at stored precision (``cv2.IMREAD_UNCHANGED``, never an 8-bit RGB
    conversion, which would saturate 16-bit data), then normalised per image
    between its 0.5th and 99.5th percentiles; see the module docstring for why.
    """
    return normalize_intensity(read_raw(path))


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``h`` x ``w`` image lies in its ``size`` x ``size`` letterbox:
    ``(top, left, height, width)`` (scale ``size / max(h, w)``, centred)."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to fit ``size`` x ``size`` keeping the aspect ratio, centred, zero-padded."""
    h, w = img.shape[:2]
    top, left, nh, nw = letterbox_geometry(h, w, size)
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    resized = cv2.resize(img, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else img
    out = np.zeros((size, size), dtype=img.dtype)
    out[top:top + nh, left:left + nw] = resized
    return out


def unletterbox(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`letterbox` for a map over the letterboxed square (a Grad-CAM,
    say): the padding cropped off and the rest resized to the original ``(h, w)``, float32."""
    h, w = int(shape[0]), int(shape[1])
    top, left, nh, nw = letterbox_geometry(h, w, arr.shape[0])
    inner = np.ascontiguousarray(arr[top:top + nh, left:left + nw], dtype=np.float32)
    return cv2.resize(inner, (w, h), interpolation=cv2.INTER_LINEAR)


def load_resized(path: str | os.PathLike, img_size: int) -> np.ndarray:
    """``read_image`` + ``letterbox``, quantised to uint16 (exactly what the cache stores)."""
    img = letterbox(read_image(path), img_size)
    return np.round(img * 65535.0).astype(np.uint16)


def _save_npy(tmp: Path, arr: np.ndarray) -> None:
    with open(tmp, "wb") as fh:  # a file object, so np.save does not append ".npy" to the temp name
        np.save(fh, arr, allow_pickle=False)


class ImageCache:
    """Decoded, normalised and letterboxed images on disk, so later epochs skip PNG decoding.

    Layout: ``<cache_dir>/<img_size>px/<k[:2]>/<k>.npy`` where ``k`` is the SHA-1
    of (cache format version, resolved image path, ``img_size``, the file's
    ``mtime_ns``, size in bytes, ``ctime_ns`` and inode). Each entry is a uint16 ``img_size`` x
    ``img_size`` array (the [0, 1] image times 65535). Replacing or touching an
    image changes its key, so a stale entry is never read; old entries are
    simply left behind (delete the folder to reclaim space). Entries are
    written atomically, so parallel workers and interrupted runs are safe.
    """

    VERSION = 1
    # Entries also kept in RAM by the process that owns the dataset, up to this many bytes:
    # from the second epoch on, an image then costs neither a path hash nor a file read
    # (15-20% of a training step for the demo's small model on the CPU). 84 MB hold the
    # demo's 4,600 images at 96 px; a real dataset at 384 px mostly stays on disk.
    MEMORY_BYTES = 1 << 30

    def __init__(self, cache_dir: str | os.PathLike, img_size: int) -> None:
        self.cache_dir = Path(cache_dir)
        self.img_size = int(img_size)
        self.root = self.cache_dir / f"{self.img_size}px"
        self._memory: dict[str, np.ndarray] = {}
        self._memory_left = self.MEMORY_BYTES

    def entry_path(self, path: str | os.PathLike) -> Path:
        p = Path(path).resolve()
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DataError.at(p, None, "image file not found") from None
        # mtime and size alone miss a replacement that restores them (cp -p, rsync -t). The
        # inode change time cannot be set from user space and moves on every rewrite, and a
        # file replaced by rename has a new inode: both come with the same stat call, free.
        key = f"{self.VERSION}|{p}|{self.img_size}|{st.st_mtime_ns}|{st.st_size}|{st.st_ctime_ns}|{st.st_ino}"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def _load(self, entry: Path) -> np.ndarray | None:
        try:
            arr = np.load(entry, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None  # absent, or unreadable: rebuilt below
        if arr.shape != (self.img_size, self.img_size) or arr.dtype != np.uint16:
            return None
        return arr

    def get(self, path: str | os.PathLike) -> np.ndarray:
        """uint16 ``img_size`` x ``img_size`` image (read-only), from memory, the cache or
        decoded and stored. Within one process each image is read from disk once."""
        key = os.fspath(path)
        arr = self._memory.get(key)
        if arr is None:
            arr, _ = self._get(path)
            self._remember(key, arr)
        return arr

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker receives the cache without the images held in RAM.
        return {**self.__dict__, "_memory": {}, "_memory_left": self.MEMORY_BYTES}

    def _remember(self, key: str, arr: np.ndarray) -> None:
        # Not in DataLoader workers: each holds its own copy of the dataset, so memory would
        # multiply by their number, and workers that are not persistent end with the epoch.
        if arr.nbytes > self._memory_left or torch.utils.data.get_worker_info() is not None:
            return
        arr.setflags(write=False)
        self._memory[key] = arr
        self._memory_left -= arr.nbytes

    def _get(self, path: str | os.PathLike) -> tuple[np.ndarray, bool]:
        entry = self.entry_path(path)
        arr = self._load(entry)
        if arr is not None:
            return arr, False
        arr = load_resized(path, self.img_size)
        atomic_write(entry, lambda tmp: _save_npy(tmp, arr), fsync=False)  # re-derivable
        return arr, True

    def warm(self, paths: Iterable[str | os.PathLike], num_workers: int | None = None,
             progress: bool = True) -> dict[str, Any]:
        """Fill the cache for ``paths`` (threads, default one per core: OpenCV decodes
        outside the GIL). Returns ``{"total", "decoded", "cached", "failed"}``; ``failed``
        maps the position of every image that cannot be decoded to its one-line reason
        (:func:`check_decodable` turns these into CSV rows)."""
        return _decode_each(list(paths), lambda p: self._get(p)[1], num_workers, progress,
                            f"cache {self.img_size}px")


def _decode_each(paths: Sequence[str | os.PathLike], one: Callable[[Any], bool], num_workers: int | None,
                 progress: bool, desc: str) -> dict[str, Any]:
    """Run ``one`` (decode a path; True if it was decoded rather than read from the cache) on
    every path, collecting the images that fail instead of stopping at the first."""
    failed: dict[int, str] = {}
    decoded = 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)

    def safe(p: str | os.PathLike) -> bool | str:
        try:
            return one(p)
        except DataError as exc:
            return str(exc)
        except OSError:
            raise  # the cache's disk (full, read-only), not this image
        except Exception as exc:  # any decoder failure is this image's
            return f"{p}: cannot decode image ({type(exc).__name__}: {exc})"

    def done(i: int, res: bool | str) -> None:
        nonlocal decoded
        if isinstance(res, str):
            failed[i] = res
        else:
            decoded += int(res)
        bar.update()

    try:
        run_threaded(safe, paths, num_workers or default_workers(), done)
    finally:
        bar.close()
    return {"total": len(paths), "decoded": decoded, "cached": len(paths) - decoded - len(failed),
            "failed": failed}


def check_decodable(df: pd.DataFrame, img_size: int, cache_dir: str | os.PathLike | None = None, *,
                    skip_bad: bool = False, rejected_csv: str | os.PathLike | None = None,
                    num_workers: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Decode every image of ``df`` once, before any DataLoader worker meets it.

    With ``cache_dir`` this is the cache warm-up at ``img_size`` (later epochs read the
    cache); without, the images are decoded and dropped. Either way every image is
    decoded, so a file that passed the cheap checks but is corrupt inside (a damaged IDAT
    chunk behind an intact IEND) is found here, with all the others like it.

    Without ``skip_bad`` the first one in row order raises ``DataError("<csv>:<row>:
    <reason> (+N more undecodable images; --skip-bad ...)")``. With it they are appended
    to ``rejected_csv`` (no row twice) and ``df`` is returned without them; the CSV
    itself is not changed. ``attrs["n_undecodable"]`` says how many were left out.
    """
    source = df.attrs.get("source", "<DataFrame>")
    paths = df["image_path"].astype(str).tolist()
    if cache_dir is not None:
        stats = ImageCache(cache_dir, img_size).warm(paths, num_workers=num_workers, progress=progress)
    else:
        stats = _decode_each(paths, lambda p: load_resized(p, img_size) is not None, num_workers, progress,
                             f"decode {img_size}px")
    problems = {df.index[i]: reason for i, reason in stats["failed"].items()}
    if problems and not skip_bad:
        raise bad_rows_error(source, problems, df.index, what="undecodable images")
    kept = df.loc[~df.index.isin(list(problems))]
    kept.attrs.update(df.attrs)
    kept.attrs["n_undecodable"] = len(problems)
    if problems:
        if rejected_csv is not None:
            bad = df.loc[df.index.isin(list(problems))]
            record_rejected(bad, [problems[r] for r in bad.index], source, rejected_csv)
        where = f" -> {rejected_csv}" if rejected_csv is not None else ""
        print(f"{source}: set aside {len(problems)} undecodable image(s) of {len(df)} (--skip-bad){where}",
              flush=True)
        if kept.empty:
            raise DataError.at(source, None, f"no decodable images left ({len(problems)} rejected)")
    return kept


# --------------------------------------------------------------------------- transforms + Dataset

def build_transforms(img_size: int, train: bool, mean: float, std: float) -> A.Compose:
    """Albumentations pipeline for one-channel radiographs already letterboxed to ``img_size``.

    Input: float32 HxW in [0, 1] (anything else is letterboxed to ``img_size`` first,
    a no-op for images from :class:`WristDataset`). Output: float32 tensor
    [1, H, W], ``(x - mean) / std``.
    Train: small affine (scale ±10 %, shift ±5 %, rotation ±10°), horizontal flip
    (left and right wrists mirror each other), brightness/contrast and gamma
    (exposure differences), slight Gaussian noise and blur. No colour or
    elastic transforms: they have no radiographic counterpart. Eval: normalise only.
    """
    size = [A.LongestMaxSize(max_size=img_size, interpolation=cv2.INTER_AREA),
            A.PadIfNeeded(img_size, img_size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0)]
    post = [A.Normalize(mean=float(mean), std=float(std), max_pixel_value=1.0), ToTensorV2()]
    if not train:
        return A.Compose(size + post)
    aug = [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.GaussNoise(std_range=(0.005, 0.03), p=0.2),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.8), p=0.1),
    ]
    return A.Compose(size + aug + post)


class WristDataset(Dataset):
    """One dataset for every stage: canonical frame rows -> (tensor [1,H,W], int label).

    ``target_col``: ``age_group``, ``age_group_label`` or ``fracture``; ``None``
    gives label -1 (inference). ``transform``: from :func:`build_transforms`
    (``None``: the [0, 1] image as a tensor). With ``cache_dir`` images come
    from an :class:`ImageCache`; without it they are decoded each time (both
    give identical pixels). Any failure while loading a sample is raised as a
    one-line ``DataError("<csv>:<row>: <reason>")``, where ``<csv>`` and
    ``<row>`` are ``df.attrs["source"]`` and the ``csv_row`` index.
    """

    def __init__(self, df: pd.DataFrame, target_col: str | None, transform: Any, img_size: int,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.source = str(df.attrs.get("source", "<DataFrame>"))
        if "image_path" not in df.columns:
            raise DataError.at(self.source, 1, "missing required column 'image_path'")
        self.rows = [int(r) if isinstance(r, (int, np.integer)) else r for r in df.index]
        self.paths = df["image_path"].astype(str).tolist()
        self.target_col = target_col
        if target_col is None:
            self.labels = [-1] * len(df)
        else:
            if target_col not in df.columns:
                raise DataError.at(self.source, 1, f"missing target column {target_col!r}")
            vals = pd.to_numeric(df[target_col], errors="coerce").astype("float64").to_numpy()
            bad = np.isnan(vals) | (vals < 0) | (np.mod(np.nan_to_num(vals), 1) != 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError.at(self.source, self.rows[i],
                                   f"label {target_col!r} must be an integer >= 0, got {df[target_col].iloc[i]!r}")
            self.labels = [int(v) for v in vals]
        self.transform = transform
        self.img_size = int(img_size)
        self.cache = ImageCache(cache_dir, img_size) if cache_dir is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> np.ndarray:
        """Sample ``i`` as float32 HxW in [0, 1], letterboxed to ``img_size``."""
        if self.cache is not None:
            arr = self.cache.get(self.paths[i])
        else:
            arr = load_resized(self.paths[i], self.img_size)
        return arr.astype(np.float32) * np.float32(1.0 / 65535.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            img = self.load_image(i)
            if self.transform is None:
                x = torch.from_numpy(img)[None]
            else:
                x = self.transform(image=img)["image"]
        except DataError as exc:
            raise DataError.at(self.source, self.rows[i], str(exc)) from None
        except Exception as exc:  # anything else still becomes one line naming the row
            raise DataError.at(self.source, self.rows[i],
                               f"{self.paths[i]}: {type(exc).__name__}: {exc}") from None
        return x, self.labels[i]

    def get_labels(self) -> list[int]:
        """Labels in order (torchsampler's ImbalancedDatasetSampler calls this)."""
        return list(self.labels)
