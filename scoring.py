"""Scores the systems on a split: operating thresholds chosen on validation, metrics with
patient-bootstrap intervals on every subset, paired differences between systems, and the
same at the study level. Plain numbers for ``metrics.json``; evaluate.py puts them together.

Each operating threshold is chosen on the VALIDATION split (Youden's J, or the highest
threshold reaching a target sensitivity) and applied unchanged to test; a per-group variant
chooses one threshold per group model on the validation rows routed to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

import metrics
import systems


@dataclass
class Labelled:
    """What is scored on one split: its fracture labels, each row's patient and the systems'
    probabilities."""

    y: np.ndarray
    out: systems.SplitOutputs
    patients: np.ndarray


@dataclass(frozen=True)
class Settings:
    """How the systems are scored: the threshold rule, the bootstrap, the number of age groups,
    the column that with ``patient_id`` names a study, and the equal-budget pooled system."""

    rule: metrics.ThresholdRule
    boot: metrics.BootstrapSpec
    n_groups: int
    study_col: str | None = None
    reference: str | None = None


@dataclass
class PerRow:
    """What the output files and figures need besides the numbers: each system's threshold for
    every test row, the test subsets, and the calibrated test probabilities (the recalibration
    chosen per model, and each method's)."""

    thresholds: dict[str, float | np.ndarray]
    subsets: list[systems.SubsetMask]
    calibrated: systems.SplitOutputs
    by_method: dict[str, systems.SplitOutputs]


# --------------------------------------------------------------------------- thresholds
def choose_thresholds(y: np.ndarray, out: systems.SplitOutputs, n_groups: int, rule: metrics.ThresholdRule,
                      notes: list[str], unit: str = "images") -> dict[str, dict[str, Any]]:
    """Each system's operating point(s), chosen on validation ``y``/``out``.

    Base systems get one threshold; each routed system also gets a per-group variant with
    one threshold per group model, chosen on the validation rows that model decided.
    """
    chosen: dict[str, dict[str, Any]] = {}
    target = rule.target_sensitivity if rule.method == "sensitivity" else None
    for s, prob in out.prob.items():
        try:
            t = metrics.choose_threshold(y, prob, rule.method, rule.target_sensitivity)
        except ValueError as exc:
            t = 0.5
            notes.append(f"{s}: no validation threshold ({exc}); 0.5 used")
        chosen[s] = {"value": t, "method": rule.method, "target_sensitivity": target,
                     "val_metrics": metrics.binary_metrics(y, prob, t)}
        if s not in out.group:
            continue
        per, fell_back = metrics.choose_group_thresholds(y, prob, out.group[s], n_groups, t, rule)
        if fell_back:
            notes.append(f"{s}, per-group thresholds ({unit}): the validation {unit} of group(s) "
                         f"{', '.join(map(str, fell_back))} hold one class, so they use the single threshold")
        chosen[systems.PER_GROUP[s]] = {
            "values": per, "group_by": systems.SYSTEMS[s].group_by, "method": rule.method,
            "fallback_groups": fell_back, "val_n_by_group": np.bincount(out.group[s], minlength=n_groups).tolist(),
            "val_metrics": metrics.binary_metrics(y, prob, metrics.per_row_thresholds(out.group[s], per))}
    return {s: chosen[s] for s in systems.SYSTEMS if s in chosen}


def row_thresholds(chosen: Mapping[str, Mapping[str, Any]],
                   out: systems.SplitOutputs) -> dict[str, float | np.ndarray]:
    """Each system's threshold for every row of a split: one value, or one per row."""
    return {s: (metrics.per_row_thresholds(out.group[systems.base_system(s)], t["values"]) if "values" in t
                else t["value"]) for s, t in chosen.items()}


def _rows(thr: float | np.ndarray, mask: np.ndarray) -> float | np.ndarray:
    return thr if np.ndim(thr) == 0 else thr[mask]


# --------------------------------------------------------------------------- scoring
def score_systems(data: Labelled, thresholds: Mapping[str, float | np.ndarray], masks: Mapping[str, np.ndarray],
                  boot: metrics.BootstrapSpec) -> dict[str, Any]:
    """Every system's metrics, with patient-bootstrap intervals, on every subset (row mask)."""
    scored: dict[str, Any] = {}
    for s, thr in thresholds.items():
        prob = data.out.prob[systems.base_system(s)]
        scored[s] = {"description": systems.SYSTEMS[s].label, "threshold": float(thr) if np.ndim(thr) == 0 else None}
        for sub, mask in masks.items():
            scored[s][sub] = metrics.bootstrap_binary_metrics(data.y[mask], prob[mask], data.patients[mask],
                                                              _rows(thr, mask), boot)
    return scored


def compare_systems(data: Labelled, thresholds: Mapping[str, float | np.ndarray], pairs: Sequence[tuple[str, str]],
                    boot: metrics.BootstrapSpec, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Paired patient-bootstrap differences ``a - b`` (same resamples) for each pair present."""
    m = np.ones(len(data.y), bool) if mask is None else mask
    found = {}
    for a, b in pairs:
        if a not in thresholds or b not in thresholds or f"{a}_minus_{b}" in found:
            continue
        probs = [data.out.prob[systems.base_system(s)][m] for s in (a, b)]
        found[f"{a}_minus_{b}"] = metrics.paired_bootstrap_difference(
            data.y[m], probs, [_rows(thresholds[s], m) for s in (a, b)], data.patients[m], boot)
    return found


def score_subgroups(data: Labelled, subsets: Sequence[systems.SubsetMask],
                    boot: metrics.BootstrapSpec) -> dict[str, Any]:
    """AUROC (with CI) of every base system on each AUROC-only subset, by kind and value;
    a subset too small to score is listed with the reason."""
    found: dict[str, Any] = {}
    for sub in subsets:
        if sub.spec.full:
            continue
        mask = sub.mask
        entry: dict[str, Any] = {"n": int(mask.sum()), "n_pos": int(data.y[mask].sum()),
                                 "n_patients": int(pd.unique(data.patients[mask]).size)}
        if sub.too_small:
            entry["too_small"] = sub.too_small
        else:
            entry["auroc"] = {}
            for s, prob in data.out.prob.items():
                m = metrics.bootstrap_binary_metrics(data.y[mask], prob[mask], data.patients[mask], 0.5, boot)
                entry["auroc"][s] = {"value": m["auroc"], "ci": m["ci"].get("auroc")}
        found.setdefault(sub.spec.kind, {})[sub.name] = entry
    return found


# --------------------------------------------------------------------------- study level
def study_outputs(df: pd.DataFrame, y: np.ndarray, out: systems.SplitOutputs, study_col: str | None,
                  how: str) -> tuple[pd.DataFrame, systems.SplitOutputs]:
    """The split aggregated to one row per study, with the systems' study probabilities; a
    study's group is the group that decided most of its images."""
    keys = ["patient_id"] + ([study_col] if study_col else [])
    frame = pd.DataFrame({"patient_id": df["patient_id"].astype(str).to_numpy(), "fracture": y})
    if study_col:
        frame[study_col] = df[study_col].astype(str).to_numpy()
    for s, p in out.prob.items():
        frame[f"prob_{s}"] = p
    for s, g in out.group.items():
        frame[f"group_{s}"] = g
    studies = metrics.aggregate_studies(frame, [f"prob_{s}" for s in out.prob], how, keys,
                                        [f"group_{s}" for s in out.group])
    agg = systems.SplitOutputs(prob={s: studies[f"prob_{s}"].to_numpy(float) for s in out.prob},
                               group={s: studies[f"group_{s}"].to_numpy(int) for s in out.group})
    return studies, agg


def score_studies(val: systems.Split, test: systems.Split, settings: Settings, notes: list[str]) -> dict[str, Any]:
    """Study-level results per aggregation (max, mean): thresholds chosen on validation
    studies, every system scored on test studies, and routing against the reference."""
    study_col = settings.study_col
    unit = "patient_id + " + study_col if study_col else "patient_id (one study per patient)"
    result: dict[str, Any] = {"unit": unit, "aggregations": {}}
    for how in ("max", "mean"):
        val_studies, val_out = study_outputs(val.df, val.y, val.out, study_col, how)
        test_studies, test_out = study_outputs(test.df, test.y, test.out, study_col, how)
        y_val, y_test = val_studies["fracture"].to_numpy(int), test_studies["fracture"].to_numpy(int)
        chosen = choose_thresholds(y_val, val_out, settings.n_groups, settings.rule, notes, unit=f"studies ({how})")
        thr = row_thresholds(chosen, test_out)
        data = Labelled(y_test, test_out, test_studies["patient_id"].to_numpy())
        whole = {"overall": np.ones(len(y_test), bool)}
        result["aggregations"][how] = {
            "n_studies": int(len(test_studies)), "n_patients": int(pd.unique(data.patients).size),
            "prevalence": float(y_test.mean()) if len(y_test) else float("nan"),
            "thresholds": chosen,
            "systems": {s: r["overall"] | {"threshold": r["threshold"]}
                        for s, r in score_systems(data, thr, whole, settings.boot).items()},
            "comparisons": compare_systems(data, thr, systems.comparison_pairs(settings.reference)[:2], settings.boot),
        }
    return result
