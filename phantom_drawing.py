"""Drawing one synthetic wrist radiograph: the primitives, the anatomy, the exposure.

``phantom.render_image`` calls these in a fixed order; each adds to the float attenuation
layer it is given. The order of the calls is the order of the random draws and of the
float sums, so it is part of the output (tests/test_phantom.py holds golden digests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

ASPECT = 0.70  # width / height; real wrist images are portrait (494x727, 573x808)
# How hard the phantom's images are: SIZE_SD scatters body size and zoom (log scale);
# LESION_GAIN scales the size and contrast of every fracture sign (a patient's severity,
# 0.3-1, times the gain, capped at LESION_CAP so that strong lesions stay anatomically
# plausible: a gain above 1 makes more lesions obvious, not bigger).
SIZE_SD = 0.04
LESION_GAIN = 1.2
LESION_CAP = 1.5

# Carpal bones of a left wrist in AP view, radial side to the right (x grows radially):
# name, centre (dx, dy) and half axes (ax, ay) in units of WristGeometry.scale, angle (deg),
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


# ----------------------------------------------------------------------------- drawing

def _shell(r2: np.ndarray, inner: float, marrow: float) -> np.ndarray:
    """Projected thickness of a bone with a cortical shell (edges brighter than the middle).

    ``r2`` is the squared normalised distance from the axis; ``inner`` the normalised inner
    radius of the cortex; ``marrow`` the relative density of the trabecular core.
    """
    outer = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    core = np.sqrt(np.clip(inner * inner - r2, 0.0, None))
    return outer - (1.0 - marrow) * core


@dataclass(frozen=True)
class Ellipse:
    """A rotated superellipse: centre (``cx``, ``cy``), half axes (``ax``, ``ay``) in pixels,
    rotation ``angle`` in degrees and exponent ``power`` (2: an ellipse, larger: boxier)."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    power: float = 2.0


@dataclass(frozen=True)
class Rod:
    """A straight tubular bone: its rounded base (``bx``, ``by``), its direction ``angle``
    (degrees from up), its ``length`` and the ``half`` width of its shaft, in pixels."""

    bx: float
    by: float
    angle: float
    length: float
    half: float


@dataclass(frozen=True)
class Shaft:
    """A vertical long bone from row ``top`` down to the bottom edge. ``centre``, ``left`` and
    ``right`` are per-row arrays (length h): the axis and the half widths on the ulnar (left)
    and radial (right) side, so a cortex can bulge alone."""

    top: float
    centre: np.ndarray
    left: np.ndarray
    right: np.ndarray


class Canvas:
    """Float attenuation layers of one image and the drawing primitives on them.

    Each primitive adds ``density`` times the projected thickness of a bone with a cortical
    shell: ``inner`` is the normalised inner radius of the cortex, ``marrow`` the relative
    density of the trabecular core (:func:`_shell`).
    """

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.y = np.arange(h, dtype=np.float32)[:, None]
        self.x = np.arange(w, dtype=np.float32)[None, :]
        self.rows = self.y[:, 0]

    def _box(self, cx: float, cy: float, rx: float, ry: float) -> tuple[int, int, int, int] | None:
        x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, self.w)
        y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, self.h)
        if x0 >= x1 or y0 >= y1:
            return None
        return x0, x1, y0, y1

    def blob(self, layer: np.ndarray, shape: Ellipse, density: float, inner: float = 0.82,
             marrow: float = 0.55) -> None:
        """A rotated superellipse bone (carpal, epiphysis) with a cortical rim."""
        cx, cy, angle, power = shape.cx, shape.cy, shape.angle, shape.power
        ax, ay = max(shape.ax, 0.6), max(shape.ay, 0.6)
        r = max(ax, ay) * 1.5
        box = self._box(cx, cy, r, r)
        if box is None:
            return
        x0, x1, y0, y1 = box
        dx = self.x[:, x0:x1] - cx
        dy = self.y[y0:y1] - cy
        cos_a, sin_a = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        along = np.abs((dx * cos_a + dy * sin_a) / ax)
        across = np.abs((-dx * sin_a + dy * cos_a) / ay)
        if power != 2.0:
            r2 = (along ** power + across ** power) ** (2.0 / power)
        else:
            r2 = along * along + across * across
        thick = math.sqrt(ax * ay)
        layer[y0:y1, x0:x1] += density * thick * _shell(r2, inner, marrow)

    def tube(self, layer: np.ndarray, rod: Rod, density: float, inner: float = 0.7, marrow: float = 0.35) -> None:
        """A straight tubular bone from a rounded base towards its angle (metacarpal)."""
        bx, by, angle, length, half = rod.bx, rod.by, rod.angle, rod.length, rod.half
        dir_x, dir_y = math.sin(math.radians(angle)), -math.cos(math.radians(angle))
        end_x, end_y = bx + dir_x * length, by + dir_y * length
        box = self._box((bx + end_x) / 2, (by + end_y) / 2,
                        abs(end_x - bx) / 2 + 2 * half, abs(end_y - by) / 2 + 2 * half)
        if box is None:
            return
        x0, x1, y0, y1 = box
        from_x = self.x[:, x0:x1] - bx
        from_y = self.y[y0:y1] - by
        along = from_x * dir_x + from_y * dir_y
        across = from_x * dir_y - from_y * dir_x
        # The base is a little wider than the shaft and rounded.
        widen = 1.0 + 0.35 * np.exp(-np.clip(along, 0, None) / (1.2 * half))
        r2 = (across / (half * widen)) ** 2 + (np.clip(-along, 0, None) / (0.9 * half)) ** 2
        r2 = np.where(along > length, 2.0, r2)
        layer[y0:y1, x0:x1] += density * half * _shell(r2, inner, marrow)

    def long_bone(self, layer: np.ndarray, shaft: Shaft, density: float, inner: float = 0.8,
                  marrow: float = 0.2) -> None:
        """A vertical long bone (radius, ulna) with a flat distal cap."""
        top, centre, left, right = shaft.top, shaft.centre, shaft.left, shaft.right
        y0 = max(int(math.ceil(top)), 0)
        if y0 >= self.h:
            return
        dx = self.x - centre[y0:, None]
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


def _growth(bone_age: float) -> float:
    """Relative linear size of the wrist bones at ``bone_age`` (1 from 17.5 years)."""
    return 0.25 + 0.75 * min(max(bone_age, 0.0) / 17.5, 1.0) ** 0.8


# ----------------------------------------------------------------------------- anatomy

@dataclass(frozen=True)
class Fracture:
    """The fracture an image shows: its patient's lesion, on a projection where it is visible."""

    kind: str  # "buckle", "break" or "physeal"
    ulna: str | None  # "buckle", "styloid" or None
    severity: float  # size and contrast: the patient's severity times LESION_GAIN, capped
    side: int  # cortex that bulges or breaks first: -1 ulnar, 1 radial, 0 both
    level: float  # distance of the fracture from the physis, in radius widths
    angle: float  # slope of a break line, degrees
    extent: float  # share of the bone's width a break runs across
    healing: bool  # a follow-up study: less swelling, maybe callus

    @property
    def direction(self) -> int:
        """+1 if the distal fragment moves radially (x grows radially), -1 if ulnarly."""
        return 1 if self.side >= 0 else -1


def visible_fracture(hidden: dict[str, Any]) -> Fracture | None:
    lesion = hidden["lesion"]
    if lesion is None:
        return None
    return Fracture(kind=lesion["kind"], ulna=lesion["ulna"],
                    severity=min(lesion["severity"] * LESION_GAIN, LESION_CAP), side=lesion["side"],
                    level=lesion["level"], angle=lesion["angle"], extent=lesion["extent"],
                    healing=bool(hidden["healing"]))


@dataclass(frozen=True)
class WristGeometry:
    """Size and place of one image's wrist, in pixels: a left wrist, before flip and rotation.

    ``scale`` is the unit of every anatomical offset (the carpal and metacarpal tables are
    in it); it grows with bone age and body size, so older wrists fill more of the image.
    Rows grow distally to proximally: the hand is at the top, the forearm at the bottom.
    """

    height: int
    width: int
    lateral: bool
    oblique: bool
    bone_age: float  # age plus the child's maturity offset, years
    body_size: float  # the child's build times this exposure's zoom, about 1
    scale: float
    midline_x: float  # between radius and ulna
    physis_y: float  # row of the radial growth plate
    physis_fusion: float  # 0 = open, 1 = closed
    physis_gap: float  # height of the open growth plate
    radius_x: float
    radius_top: float  # first row of the radial metaphysis
    radius_half_width: float
    ulna_x: float
    ulna_physis_y: float
    ulna_top: float
    ulna_half_width: float
    fracture_y: float  # row of a radial fracture and of its callus
    young_spacing: float  # cartilage that keeps a young child's carpals and metacarpals apart
    fine_detail: float  # share of trabecular detail and quantum noise a pixel keeps (1 from 512 px)


def wrist_geometry(meta: dict[str, Any], hidden: dict[str, Any], img_size: int, fracture: Fracture | None,
                    image_rng: np.random.Generator, anatomy_rng: np.random.Generator) -> WristGeometry:
    """Place the wrist: the first draws of both streams (aspect, size, position, bone widths)."""
    height = int(img_size)
    width = max(int(round(height * ASPECT * float(np.exp(anatomy_rng.normal(0, 0.03))))), 8)
    lateral = int(meta["projection"]) == 2
    bone_age = max(float(hidden["age"]) + hidden["maturity_offset"], 0.1)
    # The child's build comes from the anatomy stream, the zoom of this exposure from the image stream.
    body_size = float(np.exp(anatomy_rng.normal(0, SIZE_SD) + image_rng.normal(0, 0.6 * SIZE_SD)))
    scale = width * _growth(bone_age) * body_size
    midline_x = width * (0.5 + image_rng.normal(0, 0.035))
    physis_y = height * (0.50 + image_rng.normal(0, 0.035))
    # Growth plate: wide in young children, narrowing, fused between about 15 and 17.
    fusion = min(max((bone_age - 14.7) / 1.6, 0.0), 1.0)
    gap = scale * (0.085 - 0.06 * min(bone_age / 14.0, 1.0)) * (1.0 - fusion)
    if fracture is not None and fracture.kind == "physeal":
        gap *= 1.0 + 2.0 * fracture.severity  # the fracture runs through the plate and opens it
    radius_half_width = 0.135 * scale * float(np.exp(anatomy_rng.normal(0, 0.04)))
    ulna_half_width = 0.085 * scale * float(np.exp(anatomy_rng.normal(0, 0.05)))
    radius_top = physis_y + gap / 2
    ulna_physis_y = physis_y + 0.05 * scale  # the ulna ends a little more proximally
    return WristGeometry(
        height=height, width=width, lateral=lateral, oblique=int(meta["projection"]) == 3,
        bone_age=bone_age, body_size=body_size, scale=scale, midline_x=midline_x, physis_y=physis_y,
        physis_fusion=fusion, physis_gap=gap,
        radius_x=midline_x + (0.0 if lateral else 0.21 * scale), radius_top=radius_top,
        radius_half_width=radius_half_width,
        ulna_x=midline_x - (0.03 * scale if lateral else 0.21 * scale), ulna_physis_y=ulna_physis_y,
        ulna_top=ulna_physis_y + gap / 2, ulna_half_width=ulna_half_width,
        fracture_y=radius_top + (fracture.level if fracture else 0.5) * 2 * radius_half_width,
        young_spacing=0.04 * scale * (1 - min(bone_age / 8, 1)),
        fine_detail=min(max(height / 512, 0.25), 1.0),
    )


# ----------------------------------------------------------------------------- drawing per anatomy
# The draw_ functions add to the float layer they are given. The order of the calls in
# render_image is the order of the random draws and of the float sums: part of the output.

def forearm_outline(canvas: Canvas, wrist: WristGeometry, fracture: Fracture | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the centre and half width of the soft tissue: a forearm widening into the hand."""
    rows, scale = canvas.rows, wrist.scale
    hand = 1.0 / (1.0 + np.exp((rows - (wrist.physis_y - 0.45 * scale)) / (0.08 * scale)))
    forearm = wrist.width * (0.22 + 0.33 * _growth(wrist.bone_age) * wrist.body_size) * (0.85 if wrist.lateral else 1.0)
    half_width = forearm * (1.0 + 0.18 * hand)
    if fracture is not None:
        # Soft-tissue swelling over an acute fracture (less on follow-ups), a real indirect sign.
        swell = fracture.severity * (0.03 if fracture.healing else 0.07)
        over_fracture = np.exp(-((rows - (wrist.physis_y + 0.35 * scale)) / (0.45 * scale)) ** 2)
        half_width = half_width * (1.0 + swell * over_fracture)
    centre = wrist.midline_x + (0.04 * scale if wrist.lateral else 0.0) * hand
    return centre, half_width


def draw_soft_tissue(canvas: Canvas, soft: np.ndarray, outline: tuple[np.ndarray, np.ndarray]) -> None:
    centre, half_width = outline
    # Chord length through a cylinder of that half width.
    from_axis = (canvas.x - centre[:, None]) / half_width[:, None]
    soft += half_width[:, None] * np.sqrt(np.clip(1 - from_axis ** 2, 0, None))


def _radius_outline(canvas: Canvas, wrist: WristGeometry,
                    fracture: Fracture | None) -> tuple[np.ndarray | float, np.ndarray, np.ndarray]:
    """Per row, the radius's axis and its half widths on the ulnar and the radial side."""
    rows, scale, half = canvas.rows, wrist.scale, wrist.radius_half_width
    flare = np.exp(-np.clip(rows - wrist.radius_top, 0, None) / (0.4 * scale))  # the metaphysis widens distally
    centre = wrist.radius_x + (0.03 * scale * flare if not wrist.lateral else 0.0)
    ulnar_half = half * (1.0 + 0.55 * flare)
    radial_half = half * (1.0 + (0.55 if not wrist.lateral else 0.3) * flare)
    if fracture is not None and fracture.kind == "buckle":
        # A rounded bulge of the cortex, longer towards the physis than towards the shaft.
        reach = np.where(rows < wrist.fracture_y, 0.4 * half, 0.22 * half)
        bump = fracture.severity * 0.45 * half * np.exp(-((rows - wrist.fracture_y) / reach) ** 2)
        # A torus runs round the bone: one cortex bulges most, the other less.
        ulnar_half = ulnar_half + bump * (1.0 if fracture.side <= 0 or wrist.lateral else 0.4)
        radial_half = radial_half + bump * (1.0 if fracture.side >= 0 else 0.4)
    return centre, ulnar_half, radial_half


def _distal_displacement(canvas: Canvas, wrist: WristGeometry, fracture: Fracture | None) -> tuple[np.ndarray, float]:
    """Sideways shift of the radius per row, and the shift the epiphysis on top of it follows."""
    rows = canvas.rows
    shift = np.zeros(wrist.height, np.float32)
    distal_shift = 0.0
    if fracture is None:
        return shift, distal_shift
    if fracture.kind == "break" and fracture.extent > 0.6:
        # The more complete the break, the more the distal fragment is displaced.
        distal_shift = (fracture.severity * 0.6 * wrist.radius_half_width * (fracture.extent - 0.5) * 2
                        * (1 if fracture.angle >= 0 else -1))
    if fracture.kind in ("break", "buckle"):
        # Angulation of the distal fragment, best seen on the lateral view (dorsal tilt).
        tilt = (0.2 if wrist.lateral else 0.07) * fracture.severity
        shift = np.where(rows < wrist.fracture_y,
                         distal_shift + (wrist.fracture_y - rows) * tilt * fracture.direction, 0.0)
        physis_row = int(wrist.physis_y)
        distal_shift = float(shift[max(physis_row, 0)]) if 0 <= physis_row < wrist.height else distal_shift
    return shift, distal_shift


def radius_layer(canvas: Canvas, wrist: WristGeometry, fracture: Fracture | None) -> tuple[np.ndarray, float]:
    """The radius with its shaft lesions, and the sideways shift of its epiphysis.

    The radius gets a layer of its own because a physeal fracture later cuts only its bone.
    """
    centre, ulnar_half, radial_half = _radius_outline(canvas, wrist, fracture)
    shift, epiphysis_shift = _distal_displacement(canvas, wrist, fracture)
    layer = np.zeros((wrist.height, wrist.width), np.float32)
    canvas.long_bone(layer, Shaft(wrist.radius_top, centre + shift, ulnar_half, radial_half), density=1.0)
    kind = fracture.kind if fracture else None
    half = wrist.radius_half_width
    if kind == "buckle":
        # Compressed trabeculae: a dense band across the metaphysis.
        band = (np.exp(-((canvas.y - wrist.fracture_y) / (0.12 * half + 0.4)) ** 2)
                * (np.abs(canvas.x - wrist.radius_x) < 1.2 * half))
        layer += 1.2 * fracture.severity * half * band
    if kind == "break":
        slope = math.tan(math.radians(fracture.angle))
        from_line = (canvas.y - wrist.fracture_y) - slope * (canvas.x - wrist.radius_x)
        line_width = max(0.2 * half * (0.6 + fracture.severity), wrist.height / 85)
        # How far across the bone, from the cortex where the break starts (0) to the other (1).
        across = (canvas.x - (wrist.radius_x - 1.5 * half)) / (3.0 * half)
        if fracture.side > 0:
            across = 1.0 - across
        break_line = np.exp(-(from_line / line_width) ** 2) * (across < fracture.extent)
        layer *= 1.0 - min(0.6 + 0.4 * fracture.severity, 0.97) * break_line
    return layer, epiphysis_shift


def draw_radial_epiphysis(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry, fracture: Fracture | None,
                           sideways: float) -> None:
    """The distal radial epiphysis (from about 1 year), shifted by a physeal fracture, and the fusing physis."""
    if wrist.bone_age <= 0.9:
        return
    maturity = min((wrist.bone_age - 0.9) / 11.0, 1.0)
    top_width = wrist.radius_half_width * 1.55
    half_x = top_width * (0.35 + 0.65 * maturity) * (0.85 if wrist.lateral else 1.0)
    half_y = 0.45 * wrist.scale * 0.12 * (0.5 + 0.7 * maturity)
    centre_x = wrist.radius_x + (0.2 * (1 - maturity) * top_width if not wrist.lateral else 0.0) + sideways
    tilt = -12.0 * maturity if not wrist.lateral else 8.0 * maturity
    if fracture is not None and fracture.kind == "physeal":
        centre_x += fracture.severity * 0.7 * top_width * fracture.direction
        tilt += 25.0 * fracture.severity * fracture.direction
    centre_y = wrist.physis_y - wrist.physis_gap / 2 - half_y * 0.9
    canvas.blob(bone, Ellipse(centre_x, centre_y, half_x, half_y, tilt, power=2.0 + 1.6 * maturity), 1.0)
    if maturity > 0.6 and not wrist.lateral:  # radial styloid
        canvas.blob(bone, Ellipse(centre_x + 0.75 * half_x, centre_y - 0.5 * half_y, 0.25 * half_x, 0.9 * half_y, -20),
                    0.8)
    fusion = wrist.physis_fusion
    if fusion > 0:  # the physis fills with bone; a faint scar line remains
        scar_half_height = max(wrist.physis_gap, 0.03 * wrist.scale) * 0.9 + 0.02 * wrist.scale * fusion
        canvas.blob(bone, Ellipse(wrist.radius_x, wrist.physis_y, top_width * 0.95, scar_half_height, 0, power=4),
                    0.6 * fusion)


def cut_physeal_fragment(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry, fracture: Fracture | None,
                          radius_layer: np.ndarray) -> None:
    """Thurston-Holland fragment: an oblique lucency from the physis into the metaphysis."""
    if fracture is None or fracture.kind != "physeal":
        return
    half = wrist.radius_half_width
    # The epiphysis moves one way; the line leaves the metaphysis on the other side.
    fragment_side = -fracture.direction
    line_x = wrist.radius_x + fragment_side * 0.6 * half
    from_line = (canvas.x - line_x) * 0.8 + (canvas.y - (wrist.radius_top + 0.4 * half))
    lucency = (np.exp(-(from_line / max(0.05 * half, 0.55)) ** 2)
               * (np.abs(canvas.y - (wrist.radius_top + 0.25 * half)) < 0.3 * half)
               * (fragment_side * (canvas.x - wrist.radius_x) > 0))
    # The cut takes at most the radius's own bone, not the epiphysis lying over it.
    bone -= (0.3 + 0.5 * fracture.severity) * np.minimum(bone, radius_layer) * lucency


def draw_ulna(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry, fracture: Fracture | None) -> None:
    """The ulna, thinner than the radius; its epiphysis ossifies at about 7 years, its styloid later."""
    rows, half = canvas.rows, wrist.ulna_half_width
    flare = np.exp(-np.clip(rows - wrist.ulna_top, 0, None) / (0.22 * wrist.scale))
    ulnar_half = half * (1 + 0.3 * flare)
    radial_half = half * (1 + 0.3 * flare)
    if fracture is not None and fracture.ulna == "buckle":
        bulge_y = wrist.ulna_top + 1.3 * half
        ulnar_half = ulnar_half + fracture.severity * 0.2 * half * np.exp(-((rows - bulge_y) / (0.35 * half)) ** 2)
    canvas.long_bone(bone, Shaft(wrist.ulna_top, np.full(wrist.height, wrist.ulna_x, np.float32), ulnar_half,
                                 radial_half), density=0.95)
    if wrist.bone_age <= 7.3:
        return
    maturity = min((wrist.bone_age - 7.3) / 6.0, 1.0)
    half_x, half_y = half * (0.5 + 0.75 * maturity), 0.05 * wrist.scale * (0.6 + 0.6 * maturity)
    epiphysis_y = wrist.ulna_physis_y - wrist.physis_gap / 2 - half_y
    canvas.blob(bone, Ellipse(wrist.ulna_x + 0.1 * half, epiphysis_y, half_x, half_y, 0, power=2 + maturity), 0.9)
    if wrist.bone_age > 10.5:  # ulnar styloid, sometimes broken off
        broken = fracture is not None and fracture.ulna == "styloid"
        styloid_x = wrist.ulna_x - (0.9 * half_x if not wrist.lateral else 0.0)
        styloid_y = (wrist.ulna_physis_y - wrist.physis_gap / 2 - 2.0 * half_y
                     - (0.25 * half * (0.5 + fracture.severity) if broken else 0.0))
        canvas.blob(bone, Ellipse(styloid_x, styloid_y, 0.22 * half, 0.45 * half, 10), 0.8)


def draw_carpals(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry, anatomy_rng: np.random.Generator) -> None:
    """Carpal bones: one more ossification centre every year or two, each growing."""
    carpals = _CARPALS_LAT if wrist.lateral else _CARPALS_AP
    scale = wrist.scale
    onset_delays = anatomy_rng.normal(0, 0.5, len(carpals))
    for (_name, offset_x, offset_y, half_x, half_y, angle, onset), delay in zip(carpals, onset_delays):
        if wrist.bone_age < onset + delay:
            continue
        grown = min(max((wrist.bone_age - onset - delay) / 6.0, 0.12), 1.0) ** 0.7
        roundness = 2.0 + 1.2 * grown  # young centres are round, mature ones angular
        centre_x = wrist.midline_x + offset_x * scale + (0.02 * scale if not wrist.lateral else 0.0)
        centre_y = wrist.physis_y + offset_y * scale - wrist.young_spacing
        size_x, size_y = half_x * scale * (0.35 + 0.65 * grown), half_y * scale * (0.35 + 0.65 * grown)
        if half_x < half_y and grown < 0.5:  # early centres are round
            size_x = size_y = 0.5 * (size_x + size_y)
        canvas.blob(bone, Ellipse(centre_x + anatomy_rng.normal(0, 0.01) * scale,
                                  centre_y + anatomy_rng.normal(0, 0.01) * scale,
                                  size_x, size_y, angle + anatomy_rng.normal(0, 5), power=roundness), 0.95)


def draw_metacarpals(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry,
                      anatomy_rng: np.random.Generator) -> None:
    """Metacarpal bases (and, in small children, most of the shaft) at the top."""
    scale = wrist.scale
    for base_x, base_y, angle, half_width in (_METACARPALS_LAT if wrist.lateral else _METACARPALS_AP):
        start_x = wrist.midline_x + base_x * scale + 0.02 * scale
        start_y = wrist.physis_y + base_y * scale - wrist.young_spacing
        canvas.tube(bone, Rod(start_x, start_y, angle + anatomy_rng.normal(0, 2), 1.6 * scale, half_width * scale),
                    density=1.0)


def shear_for_oblique(bone: np.ndarray, wrist: WristGeometry) -> np.ndarray:
    # An oblique view spreads the bones apart; a sheared copy is a cheap stand-in.
    shear = np.float64([[1, 0.18, -0.09 * wrist.height], [0, 1, 0]])
    return _warp(bone, shear, wrist.width, wrist.height)


def draw_growth_arrest_line(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry, rng: np.random.Generator) -> None:
    """A faint sclerotic band across the radius in some healthy children (a distractor)."""
    # The draw comes first, so the image stream moves on the same with an open or a closed physis.
    if rng.random() < 0.15 and wrist.physis_fusion < 1:
        half = wrist.radius_half_width
        line_y = wrist.radius_top + rng.uniform(0.6, 2.2) * half
        bone += (0.12 * half * np.exp(-((canvas.y - line_y) / 0.8) ** 2)
                 * (np.abs(canvas.x - wrist.radius_x) < 1.1 * half) * (bone > 0))


def draw_callus(canvas: Canvas, bone: np.ndarray, wrist: WristGeometry, fracture: Fracture | None,
                 image_seed: int) -> None:
    """Callus on a follow-up of a visible fracture, on both cortices."""
    # Its own random stream, so that removing a lesion leaves every other pixel unchanged.
    callus_rng = np.random.default_rng([image_seed, 1])
    if fracture is not None and fracture.healing and callus_rng.random() < 0.6:
        half = wrist.radius_half_width
        for side in (-1, 1):
            canvas.blob(bone, Ellipse(wrist.radius_x + side * 1.15 * half, wrist.fracture_y,
                                      0.18 * half * (0.5 + fracture.severity), 0.5 * half, 0),
                        0.35 * fracture.severity, inner=0.0)


def bone_texture(rng: np.random.Generator, wrist: WristGeometry) -> np.ndarray:
    """Trabecular texture, a factor around 1 on the bone layer."""
    height, width = wrist.height, wrist.width
    # Trabeculae are finer than a pixel at low resolution, so their contrast averages out.
    return (1.0 + 0.10 * wrist.fine_detail * _smooth_noise(rng, height, width, max(1.5, height / 110))
            + 0.06 * _smooth_noise(rng, height, width, max(3.0, height / 40)))


def draw_cast(canvas: Canvas, extra: np.ndarray, wrist: WristGeometry, outline: tuple[np.ndarray, np.ndarray],
               rng: np.random.Generator) -> None:
    """A cast: a broad radio-opaque sleeve round the forearm, plaster or a fibreglass mesh."""
    centre, half_width = outline
    height, width = wrist.height, wrist.width
    cast_top = wrist.physis_y - rng.uniform(0.35, 0.85) * wrist.scale
    outer = half_width + width * rng.uniform(0.04, 0.08)
    inner = half_width + width * 0.012
    covered = (canvas.rows > cast_top)[:, None]
    from_axis = np.abs(canvas.x - centre[:, None])
    # Chord length through a hollow cylinder: the sleeve is thickest at its edges.
    thickness = (np.sqrt(np.clip(outer[:, None] ** 2 - from_axis ** 2, 0, None))
                 - np.sqrt(np.clip(inner[:, None] ** 2 - from_axis ** 2, 0, None)))
    grain = 1.0 + 0.25 * _smooth_noise(rng, height, width, max(1.0, height / 150))
    if rng.random() < 0.5:  # fibreglass: a woven mesh
        period = max(height / 45, 2.5)
        grain = (grain + 0.35 * (np.sin((canvas.x + canvas.y) * 2 * np.pi / period) > 0.6)
                 + 0.35 * (np.sin((canvas.x - canvas.y) * 2 * np.pi / period) > 0.6))
    extra += covered * thickness * grain * rng.uniform(0.35, 0.6)


def draw_metal(extra: np.ndarray, wrist: WristGeometry, rng: np.random.Generator) -> None:
    """Metal: one or two K-wires through the radial styloid, or a plate with screws on the radius."""
    height, width = wrist.height, wrist.width
    half, scale = wrist.radius_half_width, wrist.scale
    metal = np.zeros((height, width), np.float32)
    line_width = max(int(round(height / 160)), 1)
    if rng.random() < 0.6:
        for _ in range(int(rng.integers(1, 3))):
            wire_angle = math.radians(rng.uniform(25, 60))
            start_x, start_y = wrist.radius_x + 1.1 * half, wrist.physis_y - 0.05 * scale
            end_x, end_y = start_x - math.cos(wire_angle) * 1.2 * scale, start_y + math.sin(wire_angle) * 1.2 * scale
            cv2.line(metal, (int(start_x), int(start_y)), (int(end_x), int(end_y)), 1.0, line_width, cv2.LINE_AA)
    else:
        left, top = int(wrist.radius_x - 0.45 * half), int(wrist.radius_top + 0.3 * half)
        right, bottom = int(wrist.radius_x + 0.45 * half), int(min(wrist.radius_top + 3.5 * half, height - 1))
        cv2.rectangle(metal, (left, top), (right, bottom), 0.7, -1)
        for screw in range(4):
            screw_y = int(top + (screw + 0.5) * (bottom - top) / 4)
            cv2.line(metal, (int(wrist.radius_x - 1.3 * half), screw_y), (int(wrist.radius_x + 1.3 * half), screw_y),
                     1.0, line_width + 1, cv2.LINE_AA)
    extra += metal * width * 0.4


def draw_skin_fold(soft: np.ndarray, wrist: WristGeometry, rng: np.random.Generator) -> None:
    """Now and then a skin fold: a thin curved line, brighter or darker, over the soft tissue."""
    height, width = wrist.height, wrist.width
    if rng.random() < 0.3:
        fold = np.zeros((height, width), np.float32)
        points = np.stack([np.linspace(0, width, 6),
                           wrist.physis_y + rng.uniform(-0.3, 0.6) * height + rng.normal(0, 0.04 * height, 6)], 1)
        cv2.polylines(fold, [points.astype(np.int32)], False, 1.0, 1, cv2.LINE_AA)
        soft += fold * rng.choice([-1, 1]) * 0.03 * width * (soft > 0)


# ----------------------------------------------------------------------------- exposure

def expose(soft: np.ndarray, bone: np.ndarray, extra: np.ndarray, wrist: WristGeometry,
            rng: np.random.Generator) -> np.ndarray:
    """Brightness in [0, 1] (about): Beer-Lambert, then a display curve, blur and quantum noise."""
    height, width = wrist.height, wrist.width
    soft_gain = 1.15 * rng.uniform(0.85, 1.15)
    bone_gain = 4.2 * rng.uniform(0.85, 1.15)
    # The layers hold thickness in pixels; dividing by the width makes contrast independent of size.
    attenuation = (soft_gain * soft + bone_gain * bone + 3.0 * extra) / width
    image = 1.0 - np.exp(-attenuation)
    gamma = float(np.exp(rng.normal(0, 0.15)))
    image = rng.uniform(0.02, 0.08) + rng.uniform(0.8, 0.95) * np.clip(image, 0, 1) ** gamma
    blur = rng.uniform(0.3, 0.9) * height / 256
    if blur > 0.35:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    sigma = rng.uniform(0.006, 0.025) * math.sqrt(wrist.fine_detail)  # bigger pixels average more quanta
    return image + sigma * np.sqrt(image + 0.05) * rng.standard_normal((height, width)).astype(np.float32)


def add_collimation(image: np.ndarray, rng: np.random.Generator) -> None:
    """Collimation shutters: unexposed margins that look bright (in place)."""
    height, width = image.shape
    for edge in range(4):  # left, right, top, bottom
        if rng.random() < 0.25:
            depth = int(rng.uniform(0.02, 0.09) * (width if edge < 2 else height))
            brightness = rng.uniform(0.75, 0.95)
            if edge == 0:
                image[:, :depth] = brightness
            elif edge == 1:
                image[:, width - depth:] = brightness
            elif edge == 2:
                image[:depth, :] = brightness
            else:
                image[height - depth:, :] = brightness


def add_side_marker(image: np.ndarray, laterality: str, rng: np.random.Generator) -> np.ndarray:
    """A grey plate with a bright L or R; drawn after the flip, so it is never mirrored."""
    height, width = image.shape
    size = max(int(0.11 * width), 6)
    left = int(rng.choice([rng.uniform(0.01, 0.12), rng.uniform(0.75, 0.88)]) * width)
    top = int(rng.uniform(0.08, 0.85) * height)
    left, top = min(max(left, 0), width - size), min(max(top, 0), height - int(1.3 * size))
    image[top:top + int(1.3 * size), left:left + size] = 0.45 + 0.1 * rng.random()
    alpha = np.zeros((height, width), np.float32)
    glyph = _glyph(laterality, size)
    g_top, g_left = top + int(0.15 * size), left + int(0.12 * size)
    g_h, g_w = min(glyph.shape[0], height - g_top), min(glyph.shape[1], width - g_left)
    alpha[g_top:g_top + g_h, g_left:g_left + g_w] = glyph[:g_h, :g_w]
    return image * (1.0 - alpha) + 0.98 * alpha


# The side marker's letters as 5x7 bitmaps, drawn by numpy rather than by a font renderer:
# OpenCV's text and float32 warps change from one release to the next (4.12 -> 5.1 moved
# the letter's pixels by up to 30,000 of 65,535 and warped pixels by up to 1,100), and the
# demo's images, hence its results, must not depend on the installed OpenCV.
_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


def _glyph(letter: str, size: int) -> np.ndarray:
    """``letter`` as a float mask about 0.75 * ``size`` wide, box-averaged from its bitmap."""
    bitmap = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], np.float64)
    scale = max(int(round(0.15 * size)), 1)
    big = np.kron(bitmap, np.ones((scale, scale)))
    return big.astype(np.float32)


def _warp(image: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear affine warp with black outside, in float64: OpenCV's float32 path rounds
    differently between releases, its float64 path agrees to about 1e-7."""
    out = cv2.warpAffine(np.ascontiguousarray(image, dtype=np.float64), np.float64(matrix), (width, height),
                         flags=cv2.INTER_LINEAR, borderValue=0.0)
    return out.astype(np.float32)


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Patient positioning: a small rotation; the corners outside the detector stay black."""
    height, width = image.shape
    angle = float(np.clip(rng.normal(0, 5), -12, 12))
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    return _warp(image, rotation, width, height)
