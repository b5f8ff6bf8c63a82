"""The evaluation's vocabulary: the systems it compares and the subsets of test images it
scores them on, each defined once here; evaluate.py, scoring.py, figures.py and report.py
read these tables instead of keeping their own lists.

A system is a way of turning the models' outputs into one fracture probability per image
(:data:`SYSTEMS`); a subset is a named set of test rows (:data:`SUBSETS`), scored with every
metric or by AUROC only. Adding a subgroup is one :class:`Subset` line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

import cohort
import inference

GROUP_MODELS = "group models"  # System.models of the routed systems: one model per age group


@dataclass(frozen=True)
class System:
    """One compared system.

    ``label``: its row in the tables; ``name`` and ``short``: how sentences name it; ``summary``:
    its row label in the report's summary table (None: not there); ``color``: its colour in every
    figure (None: a fallback). ``models``: ``GROUP_MODELS`` for a routed system, else the one model it uses: its key in
    :func:`evaluate.infer`'s output, ``inference.RoutedModels`` and calibration.json, and its
    checkpoint role (``columns.POOLED_ROLE``, ``columns.CONTROL_ROLE``).
    ``routing``: how a routed system picks the model (``inference.combine_routes``'s mode) and
    ``group_by`` which group's threshold then applies. ``base``: for a per-group-threshold
    variant the system whose probabilities it shares. ``reference``: a pooled system the
    routed ones are compared with. ``rank``: order in the summary table, the clinical-utility
    figures (``utility``) and the choice of the equal-budget control (lower first).
    """

    key: str
    label: str
    name: str
    short: str
    color: str | None = None
    models: str = GROUP_MODELS
    routing: str | None = None
    group_by: str | None = None
    base: str | None = None
    reference: bool = False
    summary: str | None = None
    rank: int | None = None
    utility: bool = False


# In table order. The per-group variants share their base system's probabilities (so its
# AUROC) and differ only in the thresholds.
SYSTEMS: dict[str, System] = {s.key: s for s in (
    System("hard", "(a) routed by predicted age group (hard)", "the hard-routed system", "hard-routed",
           "tab:blue", routing="hard", group_by="predicted age group", summary="routed (hard)", rank=0,
           utility=True),
    System("hard_per_group", "(a) hard, per-group thresholds", "the hard-routed system with per-group thresholds",
           "hard, per-group thresholds", base="hard"),
    System("soft", "(b) soft routing (group models weighted by age probabilities)", "the soft-routed system",
           "soft-routed", "tab:green", routing="soft", group_by="predicted age group (the largest weight)"),
    System("soft_per_group", "(b) soft, per-group thresholds", "the soft-routed system with per-group thresholds",
           "soft, per-group thresholds", base="soft"),
    System("oracle", "(c) routed by true age group (oracle)", "the oracle-routed system", "oracle-routed",
           "tab:purple", routing="oracle", group_by="true age group", summary="oracle routing", rank=3),
    System("oracle_per_group", "(c) oracle, per-group thresholds",
           "the oracle-routed system with per-group thresholds", "oracle, per-group thresholds", base="oracle"),
    System("pooled", "(d) one pooled model", "the plain pooled model", "the plain pooled model", "tab:orange",
           models="pooled", reference=True, summary="plain pooled", rank=2, utility=True),
    System("pooled_continued", "(e) pooled, continued like the group models",
           "the pooled model continued like the group models", "the pooled, continued model", "tab:red",
           models="pooled_continued", reference=True, summary="equal-budget control", rank=1, utility=True),
)}


def _ranked(keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(keys, key=lambda k: SYSTEMS[k].rank))


ROUTED = tuple(k for k, s in SYSTEMS.items() if s.routing)
BASE_SYSTEMS = tuple(k for k, s in SYSTEMS.items() if s.base is None)
POOLED_MODELS = tuple(s.models for s in SYSTEMS.values() if s.models != GROUP_MODELS)
# The pooled systems in the order they are tried as the routed system's equal-budget control.
REFERENCES = _ranked([k for k, s in SYSTEMS.items() if s.reference])
SUMMARY_SYSTEMS = _ranked([k for k, s in SYSTEMS.items() if s.summary])
UTILITY_SYSTEMS = _ranked([k for k, s in SYSTEMS.items() if s.utility])
PER_GROUP = {s.base: k for k, s in SYSTEMS.items() if s.base}  # base system -> its per-group variant
DESIGN = ROUTED[0]  # the design's system: hard routing by the predicted age group


def base_system(key: str) -> str:
    """``hard_per_group`` -> ``hard``; base systems are their own base."""
    return SYSTEMS[key].base or key


def comparison_pairs(reference: str | None) -> list[tuple[str, str]]:
    """The paired differences ``a - b`` the report gives: routing against the equal-budget
    pooled system first."""
    pairs = [("hard", reference), ("soft", reference)] if reference else []
    pairs += [("hard", "pooled"), ("soft", "pooled"), ("pooled_continued", "pooled"), ("soft", "hard"),
              ("oracle", "hard"), ("hard_per_group", "hard")]
    return [(a, b) for a, b in pairs if a != b]


@dataclass
class SplitOutputs:
    """Every base system's fracture probability on one split, and for the routed systems the
    group whose model decided each image (the group whose threshold applies)."""

    prob: dict[str, np.ndarray]
    group: dict[str, np.ndarray]


def system_probs(inf: Mapping[str, Any], true_group: np.ndarray) -> SplitOutputs:
    """The systems' probabilities from the models' outputs (:func:`evaluate.infer`)."""
    prob, group = {}, {}
    for key in BASE_SYSTEMS:
        s = SYSTEMS[key]
        if s.routing:
            prob[key], group[key] = inference.combine_routes(inf["age_probs"], inf["group_probs"], s.routing,
                                                             true_group)
        elif inf.get(s.models) is not None:
            prob[key] = np.asarray(inf[s.models], float)
    return SplitOutputs(prob=prob, group=group)


# --------------------------------------------------------------------------- subsets
@dataclass(frozen=True)
class TestRows:
    """What a subset is built from: the test rows, their TRUE age groups and the groups' names."""

    df: pd.DataFrame
    true_group: np.ndarray
    group_names: Sequence[str]


@dataclass(frozen=True)
class Subset:
    """One kind of subset of the test rows.

    ``kind`` names it in ``metrics.json`` and ``title`` in the report's headings. ``masks`` gives
    name -> row mask, or None when the CSV lacks what it needs. ``full``: every
    metric of every system (``metrics.json`` ``systems[s][name]``), else AUROC of the base
    systems only (``subgroups[kind][value]``). A subset under ``min_images`` (or, AUROC only,
    with one class) is listed, not scored. ``compare``: also the paired differences per
    subset; ``figure``: the ROC figure whose panels show it.
    """

    kind: str
    title: str
    masks: Callable[[TestRows], dict[str, np.ndarray] | None]
    full: bool = False
    min_images: int = 0
    compare: bool = False
    figure: str | None = None


def _everything(rows: TestRows) -> dict[str, np.ndarray]:
    return {"overall": np.ones(len(rows.df), bool)}


def _true_age_groups(rows: TestRows) -> dict[str, np.ndarray]:
    return {f"age {name}": rows.true_group == g for g, name in enumerate(rows.group_names)}


def _cast(rows: TestRows) -> dict[str, np.ndarray] | None:
    if "cast" not in rows.df.columns:
        return None
    cast = pd.to_numeric(rows.df["cast"], errors="coerce").fillna(0).to_numpy() == 1
    return {"cast": cast, "no cast": ~cast}


def by_column(column: str, prefix: str = "") -> Callable[[TestRows], dict[str, np.ndarray] | None]:
    """Masks per value of ``column`` (as :func:`cohort.subgroup_values` reads it), in sorted
    order and named ``prefix + value``."""
    def masks(rows: TestRows) -> dict[str, np.ndarray] | None:
        values = cohort.subgroup_values(rows.df, column)
        if values is None:
            return None
        return {f"{prefix}{value}": values == value for value in sorted(set(values))}
    return masks


MIN_SUBSET_IMAGES = 30
SUBSETS: tuple[Subset, ...] = (
    Subset("overall", "whole test set", _everything, full=True, figure="roc"),
    Subset("age group", "true age group", _true_age_groups, full=True, compare=True, figure="roc"),
    Subset("cast", "cast", _cast, full=True, figure="roc_cast"),
    Subset("sex", "sex", by_column("gender", "sex "), full=True, min_images=MIN_SUBSET_IMAGES),
    Subset("device_manufacturer", "device", by_column("device_manufacturer"), min_images=MIN_SUBSET_IMAGES),
    Subset("projection", "projection", by_column("projection"), min_images=MIN_SUBSET_IMAGES),
    Subset("gender", "sex", by_column("gender"), min_images=MIN_SUBSET_IMAGES),
    Subset("initial_exam", "initial exam vs follow-up", by_column("initial_exam"), min_images=MIN_SUBSET_IMAGES),
)


@dataclass
class SubsetMask:
    """One built subset: its kind (:class:`Subset`), name, rows, and why it is too small to
    score (None: scored)."""

    spec: Subset
    name: str
    mask: np.ndarray
    too_small: str | None = None


def too_small(spec: Subset, mask: np.ndarray, y: np.ndarray) -> str | None:
    """Why a subset is listed but not scored, or None."""
    n = int(mask.sum())
    if n < spec.min_images:
        return f"fewer than {spec.min_images} images"
    if not spec.full and not 0 < int(y[mask].sum()) < n:
        return "one class only"
    return None


def build_subsets(rows: TestRows, y: np.ndarray) -> list[SubsetMask]:
    """Every subset of :data:`SUBSETS` the CSV allows, in their order."""
    return [SubsetMask(spec, name, mask, too_small(spec, mask, y))
            for spec in SUBSETS for name, mask in (spec.masks(rows) or {}).items()]


def full_masks(subsets: Sequence[SubsetMask]) -> dict[str, np.ndarray]:
    """Name -> rows of the subsets scored with every metric."""
    return {s.name: s.mask for s in subsets if s.spec.full and s.too_small is None}


@dataclass
class Split:
    """One evaluated CSV: its rows, fracture labels and true age groups, the models' outputs
    (:func:`evaluate.infer`) and the systems' probabilities; ``seeds``: further training
    seeds' probabilities on the same rows."""

    df: pd.DataFrame
    y: np.ndarray
    true_group: np.ndarray
    inf: dict[str, Any]
    out: SplitOutputs
    seeds: list[tuple[int, SplitOutputs]] = field(default_factory=list)

    @property
    def patients(self) -> np.ndarray:
        return self.df["patient_id"].astype(str).to_numpy()
