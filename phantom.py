"""Synthetic pediatric wrist radiographs in the GRAZPEDWRI-DX layout (the demo dataset).

The phantom lets the whole pipeline run without the 16 GB real download: it writes a
``dataset.csv`` with exactly the columns, file naming, UTF-8 byte-order mark, CRLF line
ends and ``1``/empty flags of the real GRAZPEDWRI-DX metadata, plus one 16-bit
grayscale PNG per row, so the same loader path is exercised as on the real data.

Metadata follow the figures measured from the real ``dataset.csv`` (see
``../shared/grazpedwri-dx/README.md``): patients per year of age, studies per patient
and AP/lateral images per study (about 3.3 images per patient), a patient-level
fracture probability that falls with age (image-level rate about 0.82 / 0.67 / 0.44 for
the age groups < 8, 8-14, >= 15 years), follow-up studies with casts (a cast goes with a
fracture about 96 % of the time), metal, osteopenia and uncertain diagnoses, and
fractures that are not visible on one projection (``ao_classification`` set,
``fracture_visible`` empty).

Images imitate the cues a radiologist (and a model) uses:
- age: overall bone size in the field of view, the number and size of ossified carpal
  bones, the distal radial and ulnar epiphyses (the ulnar one absent in young
  children), wide open growth plates in young children, narrowing then fused at 15+;
- fractures: torus/buckle bulges of the distal radial metaphysis (mostly young),
  cortical break lines with or without displacement, physeal (Salter-Harris II)
  fractures with epiphyseal shift (mostly older), ulnar styloid fragments, callus on
  follow-ups; size and contrast vary, and a fracture stays a small part of the image;
- nuisance: exposure, gamma, noise, blur, rotation with black corners, laterality
  flip, collimation shutters, an L/R marker, skin folds, growth-arrest lines, casts
  (a broad radio-opaque sleeve) and metal (K-wires or a plate with screws).

Inputs: none (everything is drawn from ``--seed``).
Outputs: ``<out-dir>/dataset.csv``, ``<out-dir>/images/<filestem>.png`` (uint16) and
``<out-dir>/montage.png`` (4x4 labelled 8-bit thumbnails to look at).

Example::

    python phantom.py --out-dir data/phantom --n-patients 1500 --img-size 128 --seed 0
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

import columns
import phantom_drawing
from io_utils import atomic_write, default_workers

# The demo's default: about 5,000 images at 128 px generate in under 20 s on 2 CPU cores,
# enough for every age group to train on (the smallest, >= 15 y, gets about 700 images).
DEFAULT_N_PATIENTS = 1500
DEFAULT_IMG_SIZE = 128
MONTAGE_PNG = "montage.png"  # a grid of example images beside dataset.csv
# How hard the phantom is. Skeletal maturity: girls run ahead by MATURITY_GIRLS years and
# children scatter by MATURITY_SD years around their age (the images' own knobs are in
# phantom_drawing: body size, lesion size and contrast).
MATURITY_GIRLS = 0.6
MATURITY_SD = 0.4

# Figures measured from the real dataset.csv (20,327 images, 6,091 patients).
# Patients per whole year of age (age at first study), 0..19.
_PATIENTS_PER_YEAR = np.array(
    [14, 95, 82, 117, 196, 228, 283, 329, 426, 507, 629, 679, 622, 562, 435, 383, 295, 189, 19, 1],
    dtype=float,
)
# Probability that such a patient has a fracture (an AO code), per whole year of age:
# calibrated so that the image-level rate of visible fractures per year of age matches
# the real one (0.89 at 6 y, 0.65 at 10 y, 0.50 at 15 y, 0.28 at 17 y; 0.82 / 0.67 / 0.44
# by age group), given the extra follow-up studies of fractured wrists.
_FRACTURE_PATIENT_RATE = np.array(
    [0.60, 0.50, 0.41, 0.61, 0.78, 0.85, 0.89, 0.82, 0.73, 0.61, 0.53, 0.54, 0.53, 0.51,
     0.53, 0.39, 0.31, 0.15, 0.19, 0.0]
)
# Number of studies (exams) per patient, 1..9, for fracture and non-fracture patients.
_STUDIES_FRACTURE = np.array([1786, 626, 463, 328, 195, 100, 28, 17, 10], dtype=float)
_STUDIES_NO_FRACTURE = np.array([2207, 277, 42, 3, 4, 4, 0, 0, 2], dtype=float)
# Projections within one study (1 = AP/PA, 2 = lateral, 3 = oblique) and their shares.
_STUDY_LAYOUTS = ((1, 2), (2,), (1,), (1, 1, 2, 2), (1, 1), (1, 3), (2, 2), (2, 3))
_STUDY_LAYOUT_P = np.array([9137, 697, 570, 88, 60, 52, 43, 22], dtype=float)
# P(fracture visible on this projection | patient has a fracture), by projection 1/2/3.
_VISIBLE_P = {1: 0.915, 2: 0.976, 3: 0.986}


# ----------------------------------------------------------------------------- metadata

def _draw_lesion(rng: np.random.Generator, age: float) -> dict[str, Any]:
    """A patient's fracture: kind, AO code, site and severity (kept for all their images)."""
    if age < 8:
        p = (0.62, 0.28, 0.10)
    elif age < 15:
        p = (0.30, 0.35, 0.35)
    elif age < 16.5:
        p = (0.12, 0.58, 0.30)
    else:  # physes closed: no physeal fractures
        p = (0.12, 0.88, 0.0)
    kind = ("buckle", "break", "physeal")[rng.choice(3, p=p)]
    ulna = None
    if rng.random() < (0.45 if age >= 9 else 0.15):
        ulna = "styloid" if age >= 9 else "buckle"
    elif rng.random() < 0.2:
        ulna = "buckle"
    code = {"buckle": "23r-M/2.1", "break": "23r-M/3.1", "physeal": "23r-E/2.1"}[kind]
    if kind == "break" and rng.random() < 0.25:
        code = "23-M/3.1"
    if ulna == "styloid":
        code += "; 23u-E/7"
    elif ulna == "buckle":
        code += "; 23u-M/2.1"
    # Severity 0.3..1 (times phantom_drawing.LESION_GAIN when drawn): how large and contrasted the lesion is.
    return {
        "kind": kind,
        "ulna": ulna,
        "code": code,
        "severity": float(0.3 + 0.7 * rng.beta(2.0, 1.6)),
        "level": float(rng.uniform(0.45, 1.2)),  # distance from the physis, in radius widths
        "side": int(rng.choice([-1, 1, 0], p=[0.4, 0.4, 0.2])),  # ulnar, radial, both cortices
        "angle": float(rng.uniform(-25, 25)),
        "extent": float(rng.uniform(0.55, 1.0)),
    }


def _format_age(age: float) -> str:
    text = f"{age:.1f}"
    return text[:-2] if text.endswith(".0") else text


def draw_metadata(n_patients: int, seed: int = 0) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Draw the rows of dataset.csv and, per row, the hidden rendering parameters."""
    rng = np.random.default_rng([seed, 0x5EED])
    rows: list[dict[str, Any]] = []
    hidden: list[dict[str, Any]] = []
    used_stems: set[str] = set()
    year_p = _PATIENTS_PER_YEAR / _PATIENTS_PER_YEAR.sum()
    for pid in range(1, n_patients + 1):
        age0 = min(rng.choice(20, p=year_p) + rng.random(), 19.0)
        gender = rng.choice(["M", "F", "O"], p=[0.5922, 0.4077, 0.0001])
        year = int(min(math.floor(age0), 19))
        fractured = rng.random() < _FRACTURE_PATIENT_RATE[year]
        counts = _STUDIES_FRACTURE if fractured else _STUDIES_NO_FRACTURE
        n_studies = 1 + int(rng.choice(len(counts), p=counts / counts.sum()))
        lesion = _draw_lesion(rng, age0) if fractured else None
        side = "L" if rng.random() < 0.548 else "R"
        manufacturer, spacing = ("Agfa", "0.143") if rng.random() < 0.0055 else ("Siemens", "0.144")
        # Skeletal maturity runs ahead in girls and varies between children.
        maturity_offset = (MATURITY_GIRLS if gender == "F" else 0.0) + float(rng.normal(0.0, MATURITY_SD))
        anatomy_seed = int(rng.integers(2**31))
        age = age0
        timehash = int(rng.integers(72_000_000, 1_300_000_000))
        for study in range(1, n_studies + 1):
            if study > 1:
                # Follow-ups are weeks apart; a few patients come back years later.
                age += float(rng.uniform(1.0, 4.0)) if rng.random() < 0.03 else float(rng.exponential(0.06))
                age = min(age, 19.0)
                timehash += int(rng.integers(200_000, 3_000_000))
                if rng.random() < 0.05:
                    side = "L" if side == "R" else "R"
            age_r = round(age, 1)
            initial = study == 1
            healing = fractured and not initial
            cast = (not initial) and rng.random() < (0.72 if fractured else 0.06)
            metal_p = 0.0 if initial else (0.065 if fractured else 0.30)
            metal_p *= (0.45, 0.9, 2.3)[columns.age_to_group(age_r)]
            metal = rng.random() < metal_p
            osteopenia = (not initial) and rng.random() < (0.26 if fractured else 0.18)
            uncertain = rng.random() < (0.055 if initial else 0.005)
            layout = _STUDY_LAYOUTS[rng.choice(len(_STUDY_LAYOUTS), p=_STUDY_LAYOUT_P / _STUDY_LAYOUT_P.sum())]
            for projection in layout:
                timehash += int(rng.integers(15, 130))
                visible = fractured and rng.random() < _VISIBLE_P[projection]
                while True:
                    stem = (f"{pid:04d}_{timehash:010d}_{study:02d}_WRI-{side}{projection}_"
                            f"{gender}{int(math.floor(age_r)):03d}")
                    if stem not in used_stems:
                        break
                    timehash += 1
                used_stems.add(stem)
                rows.append({
                    "filestem": stem, "patient_id": pid, "study_number": study, "timehash": timehash,
                    "gender": gender, "age": _format_age(age_r), "laterality": side,
                    "projection": projection, "initial_exam": initial,
                    "ao_classification": lesion["code"] if lesion else "", "cast": cast,
                    "diagnosis_uncertain": uncertain, "osteopenia": osteopenia,
                    "fracture_visible": visible, "metal": metal, "pixel_spacing": spacing,
                    "device_manufacturer": manufacturer,
                })
                hidden.append({
                    "age": age_r, "maturity_offset": maturity_offset, "anatomy_seed": anatomy_seed,
                    "lesion": lesion if visible else None, "healing": healing,
                    "study": study, "image_seed": int(rng.integers(2**31)),
                })
    df = pd.DataFrame(rows, columns=list(columns.GRAZPEDWRI_COLUMNS))
    for col in columns.FLAG_COLUMNS:
        df[col] = np.where(df[col].astype(bool), "1", "")
    return df, hidden


def render_image(meta: dict[str, Any], hidden: dict[str, Any], img_size: int,
                 layers: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Render one radiograph as uint16 (H = img_size, W about 0.7 * H).

    ``meta`` is a dataset.csv row and ``hidden`` its rendering parameters, both as returned
    by :func:`draw_metadata`. If ``layers`` is a dict, the attenuation maps before exposure
    (``soft``, ``bone``, ``extra`` = cast and metal; unrotated, left wrist) are put into it,
    for inspection.
    """
    # Two random streams: the anatomy stream is the child's (the same bones on every image
    # of them), the image stream this exposure's. Each is drawn from in the order of the
    # calls below, and the layers are summed in that order too: reordering them changes
    # the pixels (tests/test_phantom.py holds golden digests).
    image_rng = np.random.default_rng(hidden["image_seed"])
    anatomy_rng = np.random.default_rng(hidden["anatomy_seed"])
    fracture = phantom_drawing.visible_fracture(hidden)
    wrist = phantom_drawing.wrist_geometry(meta, hidden, img_size, fracture, image_rng, anatomy_rng)
    canvas = phantom_drawing.Canvas(wrist.height, wrist.width)
    bone = np.zeros((wrist.height, wrist.width), np.float32)
    soft = np.zeros((wrist.height, wrist.width), np.float32)
    extra = np.zeros((wrist.height, wrist.width), np.float32)  # cast and metal, not textured like bone

    outline = phantom_drawing.forearm_outline(canvas, wrist, fracture)
    phantom_drawing.draw_soft_tissue(canvas, soft, outline)
    radius_layer, epiphysis_shift = phantom_drawing.radius_layer(canvas, wrist, fracture)
    bone += radius_layer
    phantom_drawing.draw_radial_epiphysis(canvas, bone, wrist, fracture, epiphysis_shift)
    phantom_drawing.cut_physeal_fragment(canvas, bone, wrist, fracture, radius_layer)
    phantom_drawing.draw_ulna(canvas, bone, wrist, fracture)
    phantom_drawing.draw_carpals(canvas, bone, wrist, anatomy_rng)
    phantom_drawing.draw_metacarpals(canvas, bone, wrist, anatomy_rng)
    if wrist.oblique:
        bone = phantom_drawing.shear_for_oblique(bone, wrist)
    phantom_drawing.draw_growth_arrest_line(canvas, bone, wrist, image_rng)
    phantom_drawing.draw_callus(canvas, bone, wrist, fracture, hidden["image_seed"])
    osteopenia_density = 0.72 if meta["osteopenia"] == "1" else 1.0  # thinner, less dense bone
    bone *= phantom_drawing.bone_texture(image_rng, wrist) * osteopenia_density
    if meta["cast"] == "1":
        phantom_drawing.draw_cast(canvas, extra, wrist, outline, image_rng)
    if meta["metal"] == "1":
        phantom_drawing.draw_metal(extra, wrist, image_rng)
    phantom_drawing.draw_skin_fold(soft, wrist, image_rng)
    if layers is not None:
        layers.update(soft=soft, bone=bone, extra=extra)

    image = phantom_drawing.expose(soft, bone, extra, wrist, image_rng)
    if meta["laterality"] == "R":  # the drawing is a left wrist
        image = image[:, ::-1]
    image = np.ascontiguousarray(image, dtype=np.float32)
    phantom_drawing.add_collimation(image, image_rng)
    image = phantom_drawing.add_side_marker(image, meta["laterality"], image_rng)
    image = phantom_drawing.rotate(image, image_rng)
    return (np.clip(image, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)


# ----------------------------------------------------------------------------- outputs

def _write_png(path: Path, image: np.ndarray, fsync: bool = True) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.tobytes()), fsync=fsync)


def _write_dataset_csv(df: pd.DataFrame, path: Path) -> None:
    # The real file: UTF-8 with BOM, CRLF line ends, flags "1" or empty.
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, encoding="utf-8-sig", lineterminator="\r\n"))


def write_montage(df: pd.DataFrame, image_dir: Path, path: Path, n: int = 4, cell_h: int = 200) -> Path:
    """A n x n grid of 8-bit thumbnails across the age range, labelled with age and fracture."""
    cell_w = int(cell_h * 0.75)
    order = df.assign(_age=df["age"].astype(float)).sort_values("_age", kind="stable")
    picks = order.iloc[np.linspace(0, len(order) - 1, min(n * n, len(order))).astype(int)]
    grid = np.zeros((n * cell_h, n * cell_w), np.uint8)
    for k, (_, row) in enumerate(picks.iterrows()):
        img = cv2.imread(str(image_dir / f"{row['filestem']}.png"), cv2.IMREAD_UNCHANGED)
        img8 = (img >> 8).astype(np.uint8)
        scale = min(cell_h / img8.shape[0], cell_w / img8.shape[1])
        thumb = cv2.resize(img8, (int(img8.shape[1] * scale), int(img8.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        r, c = divmod(k, n)
        oy = r * cell_h + (cell_h - thumb.shape[0]) // 2
        ox = c * cell_w + (cell_w - thumb.shape[1]) // 2
        grid[oy:oy + thumb.shape[0], ox:ox + thumb.shape[1]] = thumb
        label = f"{float(row['age']):.1f}y {'FX' if row['fracture_visible'] == '1' else 'no'}"
        label += (" C" if row["cast"] == "1" else "") + (" M" if row["metal"] == "1" else "")
        label += " lat" if int(row["projection"]) == 2 else ""
        cv2.rectangle(grid, (c * cell_w, r * cell_h), (c * cell_w + cell_w - 1, r * cell_h + 16), 0, -1)
        cv2.putText(grid, label, (c * cell_w + 3, r * cell_h + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", grid)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.tobytes()))


def _render_and_write(job: tuple[dict[str, Any], dict[str, Any], int, str]) -> None:
    meta, hidden, img_size, path = job
    # No fsync per image (as for the image cache): an image can be drawn again from the seed,
    # and a flush per file costs the demo seconds on a virtual disk. Only a power cut can
    # lose one, and stage 1's file check then names it; dataset.csv is still flushed.
    _write_png(Path(path), render_image(meta, hidden, img_size), fsync=False)


def _one_cv2_thread() -> None:
    # Pool workers already use every core; OpenCV's own threads would only compete with them.
    cv2.setNumThreads(1)


def generate_phantom(out_dir: str | os.PathLike, n_patients: int = DEFAULT_N_PATIENTS,
                     img_size: int = DEFAULT_IMG_SIZE, seed: int = 0, progress: bool = True,
                     workers: int | None = None) -> Path:
    """Write a phantom GRAZPEDWRI-DX dataset into ``out_dir``; return the path of dataset.csv.

    ``img_size`` is the long (vertical) side of every image in pixels; the width is about
    0.7 of it. The same ``seed`` gives identical CSV rows and pixels, with any number of
    ``workers`` (processes; default: one per core): every image draws from its own seeds.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if img_size < 32:
        raise ValueError(f"img_size must be >= 32, got {img_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    image_dir = out_dir / columns.IMAGES_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    df, hidden = draw_metadata(n_patients, seed)
    jobs = [(meta, hid, img_size, str(image_dir / f"{meta['filestem']}.png"))
            for meta, hid in zip(df.to_dict("records"), hidden)]
    workers = min(default_workers() if workers is None else workers, len(jobs))
    with tqdm(total=len(jobs), desc="phantom", unit="img", disable=not progress) as bar:
        if workers > 1:
            # spawn, not fork: the caller (a stage, a test) may already run OpenCV's or
            # torch's thread pools, and a forked child can inherit one of their locks held
            # and wait on it forever. The workers need nothing but this module and phantom_drawing.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_one_cv2_thread) as pool:
                for _ in pool.imap_unordered(_render_and_write, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                _render_and_write(job)
                bar.update()
    csv_path = out_dir / columns.DATASET_CSV
    _write_dataset_csv(df, csv_path)
    write_montage(df, image_dir, out_dir / MONTAGE_PNG)
    return csv_path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("data/phantom"), help="where to write dataset.csv and images/")
    parser.add_argument("--n-patients", type=int, default=DEFAULT_N_PATIENTS, help="number of patients (about 3.3 images each)")
    parser.add_argument("--img-size", type=int, default=DEFAULT_IMG_SIZE, help="long (vertical) image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that render images (the pixels do not depend on it) [default: one per core]")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    csv_path = generate_phantom(args.out_dir, args.n_patients, args.img_size, args.seed,
                                progress=not args.quiet, workers=args.workers)
    seconds = time.perf_counter() - start
    n_images = sum(1 for _ in open(csv_path, encoding="utf-8-sig")) - 1
    print(f"phantom: {n_images} images of {args.n_patients} patients in {seconds:.1f} s "
          f"({n_images / max(seconds, 1e-9):.0f} images/s) -> {csv_path}")
    return {"dataset_csv": str(csv_path), "image_dir": str(Path(args.out_dir) / columns.IMAGES_DIR),
            "montage": str(Path(args.out_dir) / MONTAGE_PNG), "n_images": n_images, "seconds": seconds}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
