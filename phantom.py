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

from io_utils import atomic_write

CSV_COLUMNS = (
    "filestem", "patient_id", "study_number", "timehash", "gender", "age", "laterality",
    "projection", "initial_exam", "ao_classification", "cast", "diagnosis_uncertain",
    "osteopenia", "fracture_visible", "metal", "pixel_spacing", "device_manufacturer",
)
FLAG_COLUMNS = ("initial_exam", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal")

# The demo's default: about 5,000 images at 128 px generate in under 20 s on 2 CPU cores,
# enough for every age group to train on (the smallest, >= 15 y, gets about 700 images).
DEFAULT_N_PATIENTS = 1500
DEFAULT_IMG_SIZE = 128
ASPECT = 0.70  # width / height; real wrist images are portrait (494x727, 573x808)
# How hard the phantom is. Skeletal maturity: girls run ahead by MATURITY_GIRLS years and
# children scatter by MATURITY_SD years around their age; SIZE_SD scatters body size and
# zoom (log scale); LESION_GAIN scales the size and contrast of every fracture sign (a
# patient's severity, 0.3-1, times the gain, capped at LESION_CAP so that strong lesions
# stay anatomically plausible: a gain above 1 makes more lesions obvious, not bigger).
MATURITY_GIRLS = 0.6
MATURITY_SD = 0.4
SIZE_SD = 0.04
LESION_GAIN = 1.2
LESION_CAP = 1.5

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

# Carpal bones of a left wrist in AP view, radial side to the right (x grows radially):
# name, centre (dx, dy) and half axes (ax, ay) in units of the scale U, angle (deg),
# and the typical age (years, boys) at which the ossification centre appears.
_CARPALS_AP = (
    ("capitate", 0.02, -0.50, 0.100, 0.150, 5, 0.2),
    ("hamate", -0.17, -0.46, 0.085, 0.125, -10, 0.4),
    ("triquetrum", -0.24, -0.26, 0.075, 0.065, -20, 2.5),
    ("lunate", -0.05, -0.25, 0.090, 0.075, 0, 3.5),
    ("trapezium", 0.30, -0.46, 0.075, 0.085, 20, 5.0),
    ("trapezoid", 0.18, -0.56, 0.060, 0.075, 10, 5.5),
    ("scaphoid", 0.17, -0.28, 0.120, 0.065, -40, 5.5),
    ("pisiform", -0.26, -0.33, 0.042, 0.048, 0, 10.0),
)
# Lateral view: carpals superimposed in a column above the radius (x grows volarly).
_CARPALS_LAT = (
    ("capitate", -0.01, -0.47, 0.085, 0.15, 0, 0.2),
    ("hamate", 0.03, -0.44, 0.08, 0.12, 10, 0.4),
    ("triquetrum", -0.06, -0.24, 0.07, 0.065, 0, 2.5),
    ("lunate", 0.0, -0.22, 0.095, 0.07, 0, 3.5),
    ("trapezium", 0.12, -0.47, 0.07, 0.08, 25, 5.0),
    ("trapezoid", 0.07, -0.55, 0.055, 0.07, 10, 5.5),
    ("scaphoid", 0.08, -0.27, 0.11, 0.06, -55, 5.5),
    ("pisiform", 0.16, -0.25, 0.045, 0.05, 0, 10.0),
)
# Metacarpal bases: (dx, dy of the base, direction in degrees from vertical, half width).
_METACARPALS_AP = ((0.36, -0.62, 34, 0.055), (0.19, -0.70, 9, 0.055), (0.04, -0.72, 0, 0.058),
                   (-0.11, -0.68, -8, 0.048), (-0.24, -0.62, -17, 0.045))
_METACARPALS_LAT = ((0.20, -0.62, 35, 0.055), (0.05, -0.70, 2, 0.06), (0.01, -0.72, 0, 0.06),
                    (-0.03, -0.69, -2, 0.055), (-0.06, -0.65, -4, 0.05))


# ----------------------------------------------------------------------------- metadata

def _age_group(age: float) -> int:
    return 0 if age < 8 else (1 if age < 15 else 2)


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
    # Severity 0.3..1 (times LESION_GAIN when drawn): how large and contrasted the lesion is.
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
            metal_p *= (0.45, 0.9, 2.3)[_age_group(age_r)]
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
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    for col in FLAG_COLUMNS:
        df[col] = np.where(df[col].astype(bool), "1", "")
    return df, hidden


# ----------------------------------------------------------------------------- drawing

def _shell(r2: np.ndarray, inner: float, marrow: float) -> np.ndarray:
    """Projected thickness of a bone with a cortical shell (edges brighter than the middle).

    ``r2`` is the squared normalised distance from the axis; ``inner`` the normalised inner
    radius of the cortex; ``marrow`` the relative density of the trabecular core.
    """
    outer = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    core = np.sqrt(np.clip(inner * inner - r2, 0.0, None))
    return outer - (1.0 - marrow) * core


class _Canvas:
    """Float attenuation layers of one image and the drawing primitives on them."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.y = np.arange(h, dtype=np.float32)[:, None]
        self.x = np.arange(w, dtype=np.float32)[None, :]

    def _box(self, cx: float, cy: float, rx: float, ry: float) -> tuple[int, int, int, int] | None:
        x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, self.w)
        y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, self.h)
        if x0 >= x1 or y0 >= y1:
            return None
        return x0, x1, y0, y1

    def blob(self, layer: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float,
             density: float, power: float = 2.0, inner: float = 0.82, marrow: float = 0.55) -> None:
        """A rotated superellipse bone (carpal, epiphysis) with a cortical rim."""
        ax, ay = max(ax, 0.6), max(ay, 0.6)
        r = max(ax, ay) * 1.5
        box = self._box(cx, cy, r, r)
        if box is None:
            return
        x0, x1, y0, y1 = box
        dx = self.x[:, x0:x1] - cx
        dy = self.y[y0:y1] - cy
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        u = np.abs((dx * c + dy * s) / ax)
        v = np.abs((-dx * s + dy * c) / ay)
        rp = (u ** power + v ** power) ** (2.0 / power) if power != 2.0 else u * u + v * v
        thick = math.sqrt(ax * ay)
        layer[y0:y1, x0:x1] += density * thick * _shell(rp, inner, marrow)

    def tube(self, layer: np.ndarray, bx: float, by: float, angle: float, length: float,
             half: float, density: float, inner: float = 0.7, marrow: float = 0.35) -> None:
        """A straight tubular bone from a rounded base (bx, by) towards ``angle`` (deg from up)."""
        dxn, dyn = math.sin(math.radians(angle)), -math.cos(math.radians(angle))
        ex, ey = bx + dxn * length, by + dyn * length
        box = self._box((bx + ex) / 2, (by + ey) / 2, abs(ex - bx) / 2 + 2 * half, abs(ey - by) / 2 + 2 * half)
        if box is None:
            return
        x0, x1, y0, y1 = box
        px = self.x[:, x0:x1] - bx
        py = self.y[y0:y1] - by
        t = px * dxn + py * dyn
        d = px * dyn - py * dxn
        # The base is a little wider than the shaft and rounded.
        widen = 1.0 + 0.35 * np.exp(-np.clip(t, 0, None) / (1.2 * half))
        r2 = (d / (half * widen)) ** 2 + (np.clip(-t, 0, None) / (0.9 * half)) ** 2
        r2 = np.where(t > length, 2.0, r2)
        layer[y0:y1, x0:x1] += density * half * _shell(r2, inner, marrow)

    def long_bone(self, layer: np.ndarray, top: float, centre: np.ndarray, left: np.ndarray,
                  right: np.ndarray, density: float, inner: float = 0.8, marrow: float = 0.2) -> None:
        """A vertical long bone from row ``top`` down to the bottom edge.

        ``centre``, ``left`` and ``right`` are per-row arrays (length h): the axis and the
        half widths on the ulnar (left) and radial (right) side, so a cortex can bulge alone.
        """
        y0 = max(int(math.ceil(top)), 0)
        if y0 >= self.h:
            return
        c = centre[y0:, None]
        dx = self.x - c
        half = np.where(dx < 0, left[y0:, None], right[y0:, None])
        thick = 0.5 * (left[y0:, None] + right[y0:, None])
        # The distal end is a flat cap with rounded corners (a superellipse), not a square.
        cap = np.clip((top + 0.45 * thick - self.y[y0:]) / (0.45 * thick), 0.0, None)
        r2 = np.sqrt((dx / half) ** 4 + cap ** 4)
        layer[y0:] += density * thick * _shell(r2, inner, marrow)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean unit-ish noise with features of about ``cell`` pixels."""
    gh, gw = max(int(h / cell) + 2, 2), max(int(w / cell) + 2, 2)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _growth(ba: float) -> float:
    """Relative linear size of the wrist bones at bone age ``ba`` (1 from 17.5 years)."""
    return 0.25 + 0.75 * min(max(ba, 0.0) / 17.5, 1.0) ** 0.8


def render_image(meta: dict[str, Any], hidden: dict[str, Any], img_size: int,
                 layers: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Render one radiograph as uint16 (H = img_size, W about 0.7 * H).

    ``meta`` is a dataset.csv row and ``hidden`` its rendering parameters, both as returned
    by :func:`draw_metadata`. If ``layers`` is a dict, the attenuation maps before exposure
    (``soft``, ``bone``, ``extra`` = cast and metal; unrotated, left wrist) are put into it,
    for inspection.
    """
    rng = np.random.default_rng(hidden["image_seed"])
    arng = np.random.default_rng(hidden["anatomy_seed"])  # same child, same anatomy
    h = int(img_size)
    w = max(int(round(h * ASPECT * float(np.exp(arng.normal(0, 0.03))))), 8)
    cv = _Canvas(h, w)
    age = float(hidden["age"])
    ba = max(age + hidden["maturity_offset"], 0.1)  # bone age
    lateral = int(meta["projection"]) == 2
    oblique = int(meta["projection"]) == 3
    size_jit = float(np.exp(arng.normal(0, SIZE_SD) + rng.normal(0, 0.6 * SIZE_SD)))  # body size, zoom
    U = w * _growth(ba) * size_jit
    x0 = w * (0.5 + rng.normal(0, 0.035))
    yp = h * (0.50 + rng.normal(0, 0.035))
    ys = cv.y[:, 0]

    bone = np.zeros((h, w), np.float32)
    soft = np.zeros((h, w), np.float32)
    extra = np.zeros((h, w), np.float32)  # cast and metal, not textured like bone

    # Soft tissue: forearm cylinder widening into the hand.
    hand = 1.0 / (1.0 + np.exp((ys - (yp - 0.45 * U)) / (0.08 * U)))
    fw = w * (0.22 + 0.33 * _growth(ba) * size_jit) * (0.85 if lateral else 1.0)
    half_t = fw * (1.0 + 0.18 * hand)
    lesion = hidden["lesion"]
    if lesion is not None:
        # Soft-tissue swelling over an acute fracture (less on follow-ups), a real indirect sign.
        swell = min(LESION_GAIN * lesion["severity"], LESION_CAP) * (0.03 if hidden["healing"] else 0.07)
        half_t = half_t * (1.0 + swell * np.exp(-((ys - (yp + 0.35 * U)) / (0.45 * U)) ** 2))
    ct = x0 + (0.04 * U if lateral else 0.0) * hand
    soft += half_t[:, None] * np.sqrt(np.clip(1 - ((cv.x - ct[:, None]) / half_t[:, None]) ** 2, 0, None))

    # Growth plate: wide in young children, narrowing, fused between about 15 and 17.
    fuse = min(max((ba - 14.7) / 1.6, 0.0), 1.0)
    gap = U * (0.085 - 0.06 * min(ba / 14.0, 1.0)) * (1.0 - fuse)
    kind = lesion["kind"] if lesion else None
    sev = min(lesion["severity"] * LESION_GAIN, LESION_CAP) if lesion else 0.0
    if kind == "physeal":
        gap *= 1.0 + 2.0 * sev

    # Radius.
    rs = 0.135 * U * float(np.exp(arng.normal(0, 0.04)))
    xr = x0 + (0.0 if lateral else 0.21 * U)
    top_r = yp + gap / 2
    dist = np.clip(ys - top_r, 0, None)
    flare = np.exp(-dist / (0.4 * U))
    centre = xr + (0.03 * U * flare if not lateral else 0.0)
    left = rs * (1.0 + 0.55 * flare)
    right = rs * (1.0 + (0.55 if not lateral else 0.3) * flare)
    radius_layer = np.zeros((h, w), np.float32)
    yf = top_r + (lesion["level"] if lesion else 0.5) * 2 * rs
    if kind == "buckle":
        # A rounded bulge of the cortex, longer towards the physis than towards the shaft.
        reach = np.where(ys < yf, 0.4 * rs, 0.22 * rs)
        bump = sev * 0.45 * rs * np.exp(-((ys - yf) / reach) ** 2)
        # A torus runs round the bone: one cortex bulges most, the other less.
        left = left + bump * (1.0 if lesion["side"] <= 0 or lateral else 0.4)
        right = right + bump * (1.0 if lesion["side"] >= 0 else 0.4)
    shift = np.zeros(h, np.float32)
    distal_shift = 0.0
    if kind == "break" and lesion["extent"] > 0.6:
        # The more complete the break, the more the distal fragment is displaced.
        distal_shift = sev * 0.6 * rs * (lesion["extent"] - 0.5) * 2 * (1 if lesion["angle"] >= 0 else -1)
    if kind in ("break", "buckle"):
        # Angulation of the distal fragment, best seen on the lateral view (dorsal tilt).
        tilt = (0.2 if lateral else 0.07) * sev
        shift = np.where(ys < yf, distal_shift + (yf - ys) * tilt * (1 if lesion["side"] >= 0 else -1), 0.0)
        distal_shift = float(shift[max(int(yp), 0)]) if 0 <= int(yp) < h else distal_shift
    cv.long_bone(radius_layer, top_r, centre + shift, left, right, density=1.0)
    if kind == "buckle":
        # Compressed trabeculae: a dense band across the metaphysis.
        band = np.exp(-((cv.y - yf) / (0.12 * rs + 0.4)) ** 2) * (np.abs(cv.x - xr) < 1.2 * rs)
        radius_layer += 1.2 * sev * rs * band
    if kind == "break":
        t = math.tan(math.radians(lesion["angle"]))
        dline = (cv.y - yf) - t * (cv.x - xr)
        width = max(0.2 * rs * (0.6 + sev), h / 85)
        across = (cv.x - (xr - 1.5 * rs)) / (3.0 * rs)
        if lesion["side"] > 0:
            across = 1.0 - across
        mask = np.exp(-(dline / width) ** 2) * (across < lesion["extent"])
        radius_layer *= 1.0 - min(0.6 + 0.4 * sev, 0.97) * mask
    bone += radius_layer

    # Radial epiphysis (appears around 1 year), shifted in a physeal fracture.
    if ba > 0.9:
        mat = min((ba - 0.9) / 11.0, 1.0)
        top_w = rs * 1.55
        ax = top_w * (0.35 + 0.65 * mat) * (0.85 if lateral else 1.0)
        ay = 0.45 * U * 0.12 * (0.5 + 0.7 * mat)
        ex = xr + (0.2 * (1 - mat) * top_w if not lateral else 0.0) + distal_shift
        if kind == "physeal":
            ex += sev * 0.7 * top_w * (1 if lesion["side"] >= 0 else -1)
        ey = yp - gap / 2 - ay * 0.9
        tilt = -12.0 * mat if not lateral else 8.0 * mat
        if kind == "physeal":
            tilt += 25.0 * sev * (1 if lesion["side"] >= 0 else -1)
        cv.blob(bone, ex, ey, ax, ay, tilt, 1.0, power=2.0 + 1.6 * mat)
        if mat > 0.6 and not lateral:  # radial styloid
            cv.blob(bone, ex + 0.75 * ax, ey - 0.5 * ay, 0.25 * ax, 0.9 * ay, -20, 0.8)
        if fuse > 0:  # the physis fills with bone; a faint scar line remains
            cv.blob(bone, xr, yp, top_w * 0.95, max(gap, 0.03 * U) * 0.9 + 0.02 * U * fuse, 0, 0.6 * fuse, power=4)
    if kind == "physeal":
        # Thurston-Holland fragment: an oblique lucency from the physis into the metaphysis.
        sgn = -1 if lesion["side"] >= 0 else 1
        tx = xr + sgn * 0.6 * rs
        dline = (cv.x - tx) * 0.8 + (cv.y - (top_r + 0.4 * rs))
        mask = np.exp(-(dline / max(0.05 * rs, 0.55)) ** 2) * (np.abs(cv.y - (top_r + 0.25 * rs)) < 0.3 * rs) \
            * (sgn * (cv.x - xr) > 0)
        bone -= (0.3 + 0.5 * sev) * np.minimum(bone, radius_layer) * mask

    # Ulna: thinner, ends a little more proximally; its epiphysis ossifies at about 7 years.
    ru = 0.085 * U * float(np.exp(arng.normal(0, 0.05)))
    xu = x0 - (0.03 * U if lateral else 0.21 * U)
    yu = yp + 0.05 * U
    top_u = yu + gap / 2
    flu = np.exp(-np.clip(ys - top_u, 0, None) / (0.22 * U))
    lu = ru * (1 + 0.3 * flu)
    rgt = ru * (1 + 0.3 * flu)
    if lesion and lesion["ulna"] == "buckle":
        yb = top_u + 1.3 * ru
        lu = lu + sev * 0.2 * ru * np.exp(-((ys - yb) / (0.35 * ru)) ** 2)
    cv.long_bone(bone, top_u, np.full(h, xu, np.float32), lu, rgt, density=0.95)
    if ba > 7.3:
        mat = min((ba - 7.3) / 6.0, 1.0)
        ax, ay = ru * (0.5 + 0.75 * mat), 0.05 * U * (0.6 + 0.6 * mat)
        cv.blob(bone, xu + 0.1 * ru, yu - gap / 2 - ay, ax, ay, 0, 0.9, power=2 + mat)
        if ba > 10.5:  # ulnar styloid, sometimes broken off
            broken = lesion is not None and lesion["ulna"] == "styloid"
            sx = xu - (0.9 * ax if not lateral else 0.0)
            sy = yu - gap / 2 - 2.0 * ay - (0.25 * ru * (0.5 + sev) if broken else 0.0)
            cv.blob(bone, sx, sy, 0.22 * ru, 0.45 * ru, 10, 0.8)

    # Carpal bones: one more ossification centre every year or two, each growing.
    carpals = _CARPALS_LAT if lateral else _CARPALS_AP
    onset_jit = arng.normal(0, 0.5, len(carpals))
    for (name, dx, dy, ax, ay, ang, onset), jit in zip(carpals, onset_jit):
        if ba < onset + jit:
            continue
        grow = min(max((ba - onset - jit) / 6.0, 0.12), 1.0) ** 0.7
        roundness = 2.0 + 1.2 * grow  # young centres are round, mature ones angular
        cx = x0 + dx * U + (0.02 * U if not lateral else 0.0)
        cy = yp + dy * U - 0.04 * U * (1 - min(ba / 8, 1))  # cartilage keeps them apart when young
        ax_, ay_ = ax * U * (0.35 + 0.65 * grow), ay * U * (0.35 + 0.65 * grow)
        if ax < ay and grow < 0.5:  # early centres are round
            ax_ = ay_ = 0.5 * (ax_ + ay_)
        cv.blob(bone, cx + arng.normal(0, 0.01) * U, cy + arng.normal(0, 0.01) * U, ax_, ay_,
                ang + arng.normal(0, 5), 0.95, power=roundness)

    # Metacarpal bases (and, in small children, most of the shaft) at the top.
    for bx, by, ang, hw in (_METACARPALS_LAT if lateral else _METACARPALS_AP):
        cv.tube(bone, x0 + bx * U + 0.02 * U, yp + by * U - 0.04 * U * (1 - min(ba / 8, 1)),
                ang + arng.normal(0, 2), 1.6 * U, hw * U, density=1.0)

    if oblique:  # an oblique view spreads the bones: approximate with a sheared copy
        m = np.float32([[1, 0.18, -0.09 * h], [0, 1, 0]])
        bone = cv2.warpAffine(bone, m, (w, h), flags=cv2.INTER_LINEAR)

    # Growth-arrest lines: faint sclerotic bands in some healthy children (a distractor).
    if rng.random() < 0.15 and fuse < 1:
        ya = top_r + rng.uniform(0.6, 2.2) * rs
        bone += 0.12 * rs * np.exp(-((cv.y - ya) / 0.8) ** 2) * (np.abs(cv.x - xr) < 1.1 * rs) * (bone > 0)

    # Callus on follow-ups of a visible fracture.
    # Its own random stream, so that removing a lesion leaves every other pixel unchanged.
    lrng = np.random.default_rng([hidden["image_seed"], 1])
    if lesion and hidden["healing"] and lrng.random() < 0.6:
        for sgn in (-1, 1):
            cv.blob(bone, xr + sgn * 1.15 * rs, yf, 0.18 * rs * (0.5 + sev), 0.5 * rs, 0, 0.35 * sev, inner=0.0)

    # Trabecular texture and osteopenia (thinner, less dense bone).
    # Trabeculae are finer than a pixel at low resolution, so their contrast averages out.
    detail = min(max(h / 512, 0.25), 1.0)
    tex = 1.0 + 0.10 * detail * _smooth_noise(rng, h, w, max(1.5, h / 110)) + 0.06 * _smooth_noise(rng, h, w, max(3.0, h / 40))
    density = 0.72 if meta["osteopenia"] == "1" else 1.0
    bone *= tex * density

    if meta["cast"] == "1":
        top_c = yp - rng.uniform(0.35, 0.85) * U
        outer = half_t + w * rng.uniform(0.04, 0.08)
        inner = half_t + w * 0.012
        on = (ys > top_c)[:, None]
        r = np.abs(cv.x - ct[:, None])
        thick = np.sqrt(np.clip(outer[:, None] ** 2 - r ** 2, 0, None)) - np.sqrt(np.clip(inner[:, None] ** 2 - r ** 2, 0, None))
        grain = 1.0 + 0.25 * _smooth_noise(rng, h, w, max(1.0, h / 150))
        if rng.random() < 0.5:  # fibreglass: a woven mesh
            period = max(h / 45, 2.5)
            grain = grain + 0.35 * (np.sin((cv.x + cv.y) * 2 * np.pi / period) > 0.6) \
                + 0.35 * (np.sin((cv.x - cv.y) * 2 * np.pi / period) > 0.6)
        extra += on * thick * grain * rng.uniform(0.35, 0.6)

    if meta["metal"] == "1":
        metal = np.zeros((h, w), np.float32)
        th = max(int(round(h / 160)), 1)
        if rng.random() < 0.6:  # K-wires through the radial styloid
            for _ in range(int(rng.integers(1, 3))):
                a = math.radians(rng.uniform(25, 60))
                sx, sy = xr + 1.1 * rs, yp - 0.05 * U
                ex_, ey_ = sx - math.cos(a) * 1.2 * U, sy + math.sin(a) * 1.2 * U
                cv2.line(metal, (int(sx), int(sy)), (int(ex_), int(ey_)), 1.0, th, cv2.LINE_AA)
        else:  # plate with screws along the radial shaft
            px0, py0 = int(xr - 0.45 * rs), int(top_r + 0.3 * rs)
            px1, py1 = int(xr + 0.45 * rs), int(min(top_r + 3.5 * rs, h - 1))
            cv2.rectangle(metal, (px0, py0), (px1, py1), 0.7, -1)
            for k in range(4):
                yy = int(py0 + (k + 0.5) * (py1 - py0) / 4)
                cv2.line(metal, (int(xr - 1.3 * rs), yy), (int(xr + 1.3 * rs), yy), 1.0, th + 1, cv2.LINE_AA)
        extra += metal * w * 0.4

    # Skin folds: thin curved lines over the soft tissue.
    if rng.random() < 0.3:
        fold = np.zeros((h, w), np.float32)
        pts = np.stack([np.linspace(0, w, 6), yp + rng.uniform(-0.3, 0.6) * h + rng.normal(0, 0.04 * h, 6)], 1)
        cv2.polylines(fold, [pts.astype(np.int32)], False, 1.0, 1, cv2.LINE_AA)
        soft += fold * rng.choice([-1, 1]) * 0.03 * w * (soft > 0)

    if layers is not None:
        layers.update(soft=soft, bone=bone, extra=extra)

    # Exposure: Beer-Lambert, then a display curve, blur and quantum noise.
    k_soft = 1.15 * rng.uniform(0.85, 1.15)
    k_bone = 4.2 * rng.uniform(0.85, 1.15)
    att = (k_soft * soft + k_bone * bone + 3.0 * extra) / w
    img = 1.0 - np.exp(-att)
    gamma = float(np.exp(rng.normal(0, 0.15)))
    img = rng.uniform(0.02, 0.08) + rng.uniform(0.8, 0.95) * np.clip(img, 0, 1) ** gamma
    blur = rng.uniform(0.3, 0.9) * h / 256
    if blur > 0.35:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    sigma = rng.uniform(0.006, 0.025) * math.sqrt(detail)  # bigger pixels average more quanta
    img = img + sigma * np.sqrt(img + 0.05) * rng.standard_normal((h, w)).astype(np.float32)

    if meta["laterality"] == "R":  # the drawing is a left wrist
        img = img[:, ::-1]
    img = np.ascontiguousarray(img, dtype=np.float32)

    # Collimation shutters: unexposed margins that look bright.
    for side_ in range(4):
        if rng.random() < 0.25:
            depth = int(rng.uniform(0.02, 0.09) * (w if side_ < 2 else h))
            val = rng.uniform(0.75, 0.95)
            if side_ == 0:
                img[:, :depth] = val
            elif side_ == 1:
                img[:, w - depth:] = val
            elif side_ == 2:
                img[:depth, :] = val
            else:
                img[h - depth:, :] = val

    # Side marker: a grey plate with a bright letter, never mirrored.
    ms = max(int(0.11 * w), 6)
    mx = int(rng.choice([rng.uniform(0.01, 0.12), rng.uniform(0.75, 0.88)]) * w)
    my = int(rng.uniform(0.08, 0.85) * h)
    mx, my = min(max(mx, 0), w - ms), min(max(my, 0), h - int(1.3 * ms))
    img[my:my + int(1.3 * ms), mx:mx + ms] = 0.45 + 0.1 * rng.random()
    letter = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(letter, meta["laterality"], (mx + int(0.12 * ms), my + int(1.1 * ms)),
                cv2.FONT_HERSHEY_SIMPLEX, ms / 26.0, 255, max(ms // 8, 1), cv2.LINE_AA)
    alpha = letter.astype(np.float32) / 255.0
    img = img * (1.0 - alpha) + 0.98 * alpha

    # Patient positioning: a small rotation; the corners outside the detector stay black.
    angle = float(np.clip(rng.normal(0, 5), -12, 12))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return (np.clip(img, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)


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


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    df, hidden = draw_metadata(n_patients, seed)
    jobs = [(meta, hid, img_size, str(image_dir / f"{meta['filestem']}.png"))
            for meta, hid in zip(df.to_dict("records"), hidden)]
    workers = min(default_workers() if workers is None else workers, len(jobs))
    with tqdm(total=len(jobs), desc="phantom", unit="img", disable=not progress) as bar:
        if workers > 1:
            # fork where the platform has it: the workers need nothing but this module
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers, initializer=_one_cv2_thread) as pool:
                for _ in pool.imap_unordered(_render_and_write, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                _render_and_write(job)
                bar.update()
    csv_path = out_dir / "dataset.csv"
    _write_dataset_csv(df, csv_path)
    write_montage(df, image_dir, out_dir / "montage.png")
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
    return {"dataset_csv": str(csv_path), "image_dir": str(Path(args.out_dir) / "images"),
            "montage": str(Path(args.out_dir) / "montage.png"), "n_images": n_images, "seconds": seconds}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
