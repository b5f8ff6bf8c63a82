"""Stage 5: evaluate the age-routed fracture system on the fixed test set.

Systems scored side by side on ``age_test.csv``:

  (a) hard      the age classifier's predicted group picks the group's fracture model (the design)
  (b) soft      the group models' probabilities weighted by the age classifier's probabilities
  (c) oracle    the true age group picks the model: what routing would give with a perfect
                age classifier, so (c) - (a) is the price of routing errors
  (d) pooled    one fracture model trained on all ages (``train_fracture_per_agegroup.py --pooled``)
  (e) pooled, continued   the pooled model trained further on all ages with the group models'
                settings, when the group models started from the pooled model
                (``--init-from-pooled``): the equal-budget control for routing
  and (a)-(c) again with one threshold per group model ("per-group thresholds").

Like with like: each model's checkpoint records where its weights started, the epochs it ran
and the images it saw. The Answer compares routing with the pooled system whose training
budget equals the routed system's (same start, same schedule and epoch cap, the same number
of training images within 10 %), and says so; with no such system it says plainly that the
comparison is not equal-budget and never that routing "helped".

Each operating threshold is chosen on the VALIDATION CSV (Youden's J, or the highest
threshold reaching ``--target-sensitivity``) and applied unchanged to the test set; the
per-group variants choose one threshold per group model on the validation images routed to
it. Metrics (accuracy, F1, sensitivity, specificity, PPV, NPV, AUROC, AUPRC, Brier, confusion
matrix) are reported per image (overall, per TRUE age group, with/without a cast), per study
(the images of one study, ``patient_id`` + ``--study-col``, aggregated by their max and their
mean probability; a study is positive if any image is), and AUROC per X-ray device and per
projection (subsets under 30 images or with one class are listed, not scored). Every interval
is a 95 % percentile bootstrap over PATIENTS; differences between systems use paired
resamples, and where an interval includes 0 the report gives the smallest difference this
test set could detect. Calibration: a temperature per model fitted on validation, applied to
test, with the expected calibration error (ECE) before and after. A group without its own
model (skipped in training as too small) is served by the pooled model, and the report says so.

Inputs (all derived from --out-dir unless given)
  <out>/age_test.csv, <out>/age_val_tmp.csv
  <out>/saved_agegroup_models/{age_classifier, fracture_classifier_agegroup{0..G-1},
                               fracture_classifier_pooled[_continued]}.pt  (+ <stem>_metrics.csv)
Outputs
  <out>/test_predictions.csv   per test image: true/predicted age group, every system's
                               fracture probability (and calibrated), label and threshold
  <out>/metrics.json           every number, for machines (NaN written as null)
  <models-dir>/thresholds.json the validation thresholds (single and per group), read by predict.py
  <models-dir>/calibration.json each model's calibration (calibration.py's form) and the checkpoint
                               it was fitted for, applied by predict.py
  <out>/report/report.md       the Answer, tables and figures (ROC, confusion matrices, training
                               curves, calibration before/after, Grad-CAM) as PNG beside it

Every validation and test image is decoded before inference (the cache warm-up at each
model's size): one that cannot be decoded stops the run in one line, or with ``--skip-bad``
is left out, listed in ``<out>/rejected_rows.csv`` and counted in the report's notes.

Under ``torchrun`` the model inference (every model on validation and test) is sharded over
the processes and gathered back in row order; rank 0 alone then computes the bootstrap
metrics, writes every file and prints, while the other ranks leave as soon as inference is
done. A single process needs no flags.

Example
  python evaluate.py --out-dir runs/demo --n-boot 1000
  torchrun --nproc_per_node 8 evaluate.py --out-dir runs/real --amp bf16
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

import calibration
import cohort
import columns
import distributed
import engine
import environment
import errors
import evidence
import inference
import metrics
import presets
import recalibration
import report
import splits
import tables
from config import print_config, save_config, to_dict
from io_utils import to_jsonable, write_csv, write_json
from presets import AMP_MODES

# Every system, in table order. The per-group variants share their base system's
# probabilities (so its AUROC) and differ only in the thresholds.
SYSTEMS: dict[str, str] = {
    "hard": "(a) routed by predicted age group (hard)",
    "hard_per_group": "(a) hard, per-group thresholds",
    "soft": "(b) soft routing (group models weighted by age probabilities)",
    "soft_per_group": "(b) soft, per-group thresholds",
    "oracle": "(c) routed by true age group (oracle)",
    "oracle_per_group": "(c) oracle, per-group thresholds",
    "pooled": "(d) one pooled model",
    "pooled_continued": "(e) pooled, continued like the group models",
}
ROUTED = ("hard", "soft", "oracle")
BASE_SYSTEMS = ("hard", "soft", "oracle", "pooled", "pooled_continued")
PER_GROUP = "_per_group"
# Which group's threshold (model) applies to an image, per routed system.
GROUP_BY = {"hard": "predicted age group", "soft": "predicted age group (the largest weight)",
            "oracle": "true age group"}
# Subgroups scored by AUROC where the CSV has the column; smaller subsets are only listed.
SUBGROUP_COLUMNS = ("device_manufacturer", "projection", "gender", "initial_exam")
MIN_SUBSET_IMAGES = 30
# The training settings that must agree for two systems to have the same training budget.
SCHEDULE_KEYS = ("model", "img_size", "epochs", "lr", "scheduler", "warmup_epochs", "batch_size",
                 "sampler", "loss", "focal_alpha", "focal_gamma", "weight_decay")
# Images seen in training may differ this much (relative) and still count as the same budget:
# the class-balanced sampler draws one epoch of rows per epoch, and early stopping and dropped
# last batches move the totals a little.
IMAGES_TOLERANCE = 0.10
CALIBRATION_BINS = 10
SCRIPT = "evaluate"


def base_system(name: str) -> str:
    """``hard_per_group`` -> ``hard``; base systems are their own base."""
    return name.removesuffix(PER_GROUP)


def threshold_from_validation(
    val_y: Sequence[int], val_prob: Sequence[float], test_y: Sequence[int],
    test_prob: Sequence[float], method: str = "youden", target_sensitivity: float = 0.95,
) -> tuple[float, dict[str, Any]]:
    """Choose the threshold on validation data; return it and the test metrics at it."""
    thr = metrics.choose_threshold(val_y, val_prob, method, target_sensitivity)
    return thr, metrics.binary_metrics(test_y, test_prob, thr)


def find_history(ckpt: Path, pattern: str = "{stem}_metrics.csv") -> Path | None:
    """The per-epoch metrics CSV beside checkpoint ``ckpt`` (``pattern`` may glob)."""
    hits = sorted(ckpt.parent.glob(pattern.format(stem=ckpt.stem)), key=lambda p: len(p.name))
    return hits[0] if hits else None


# --------------------------------------------------------------------------- inference
def infer(routed: inference.RoutedModels, df: pd.DataFrame, device: torch.device, tta: bool = False,
          **loader_kw: Any) -> dict[str, np.ndarray | None]:
    """Age probabilities, every group's fracture probabilities and the pooled models'."""
    age_probs = inference.model_probs(routed.age, df, device, tta, **loader_kw)
    group = inference.all_group_probs(routed, df, device, tta, **loader_kw)
    pooled = None
    if routed.pooled is not None:
        served = [g for g in range(routed.n_groups) if routed.model_for_group(g) is routed.pooled]
        pooled = (group[:, served[0]].copy() if served
                  else inference.model_probs(routed.pooled, df, device, tta, **loader_kw))
    control = None
    if routed.pooled_continued is not None:
        control = inference.model_probs(routed.pooled_continued, df, device, tta, **loader_kw)
    return {"age_probs": age_probs, "group_probs": group, "pooled": pooled, "pooled_continued": control}


def training_seed(routed: inference.RoutedModels) -> int | None:
    """The training seed of the first seed's group models (from their checkpoints)."""
    for lm in routed.groups.values():
        seed = (lm.meta.get("config") or {}).get("seed")
        if seed is not None:
            return int(seed)
    return None


def further_seeds(routed: inference.RoutedModels, models_dir: Path, n_seeds: int, device: torch.device,
                  notes: list[str]) -> list[tuple[int, inference.RoutedModels]]:
    """The routed models of training seeds 2..N: each seed's group models and its own control
    (``<stem>_seedS``), with the same age classifier; a model the seed lacks (the shared pooled
    start) is the first seed's."""
    first = training_seed(routed)
    if n_seeds <= 1:
        return []
    if first is None:
        notes.append("the group models' checkpoints record no training seed: the Answer uses one seed")
        return []
    found = []
    for seed in range(first + 1, first + n_seeds):
        suffix = columns.seed_suffix(seed)

        def load(role: str, fallback: inference.LoadedModel | None) -> inference.LoadedModel | None:
            path = models_dir / inference.checkpoint_name(columns.fracture_model(role) + suffix)
            return inference.load_model(path, role, device, "fracture", (1, 2)) if path.is_file() else fallback

        groups = {g: load(columns.group_role(g), None) for g in routed.groups}
        missing = [g for g, lm in groups.items() if lm is None]
        if missing:
            notes.append(f"training seed {seed}: no model for age group(s) {missing} (run stage 4 with --seeds "
                         f"{n_seeds}); this seed is left out of the Answer")
            continue
        found.append((seed, replace(routed, groups=groups, pooled=load(columns.POOLED_ROLE, routed.pooled),
                                    pooled_continued=load(columns.CONTROL_ROLE, routed.pooled_continued))))
    return found


def infer_seed(routed: inference.RoutedModels, first: inference.RoutedModels, df: pd.DataFrame,
               device: torch.device, tta: bool, **loader_kw: Any) -> dict[str, np.ndarray]:
    """A further seed's fracture probabilities: its group models, and its pooled models where
    they are its own (the age classifier and a shared pooled start are the first seed's)."""
    out = {"group_probs": inference.all_group_probs(routed, df, device, tta, **loader_kw)}
    for key in ("pooled", "pooled_continued"):
        lm = getattr(routed, key)
        if lm is not None and lm is not getattr(first, key):
            out[key] = inference.model_probs(lm, df, device, tta, **loader_kw)
    return out


@dataclass
class SplitOutputs:
    """Every base system's fracture probability on one split, and for the routed systems the
    group whose model decided each image (the group whose threshold applies)."""

    prob: dict[str, np.ndarray]
    group: dict[str, np.ndarray]


def system_probs(inf: Mapping[str, Any], true_group: np.ndarray) -> SplitOutputs:
    """The systems' probabilities from :func:`infer`'s output."""
    prob, group = {}, {}
    for mode in ROUTED:
        prob[mode], group[mode] = inference.combine_routes(inf["age_probs"], inf["group_probs"], mode,
                                                           true_group)
    for key in ("pooled", "pooled_continued"):
        if inf.get(key) is not None:
            prob[key] = np.asarray(inf[key], float)
    return SplitOutputs(prob=prob, group=group)


def subsets(df: pd.DataFrame, true_group: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Row masks: overall, per true age group, cast present / absent (when known)."""
    out = {"overall": np.ones(len(df), bool)}
    for g, name in enumerate(names):
        out[f"age {name}"] = true_group == g
    if "cast" in df.columns:
        cast = pd.to_numeric(df["cast"], errors="coerce").fillna(0).to_numpy() == 1
        out["cast"] = cast
        out["no cast"] = ~cast
    return out


# --------------------------------------------------------------------------- thresholds
def choose_thresholds(y: np.ndarray, out: SplitOutputs, n_groups: int, method: str, target: float,
                      notes: list[str], unit: str = "images") -> dict[str, dict[str, Any]]:
    """Each system's operating point(s), chosen on validation ``y``/``out``.

    Base systems get one threshold; each routed system also gets a per-group variant with
    one threshold per group model, chosen on the validation rows that model decided.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for s, prob in out.prob.items():
        try:
            t = metrics.choose_threshold(y, prob, method, target)
        except ValueError as exc:
            t = 0.5
            notes.append(f"{s}: no validation threshold ({exc}); 0.5 used")
        chosen[s] = {"value": t, "method": method, "target_sensitivity": target if method == "sensitivity" else None,
                     "val_metrics": metrics.binary_metrics(y, prob, t)}
        if s not in out.group:
            continue
        per, fell_back = metrics.choose_group_thresholds(y, prob, out.group[s], n_groups, t, method, target)
        if fell_back:
            notes.append(f"{s}, per-group thresholds ({unit}): the validation {unit} of group(s) "
                         f"{', '.join(map(str, fell_back))} hold one class, so they use the single threshold")
        chosen[s + PER_GROUP] = {
            "values": per, "group_by": GROUP_BY[s], "method": method, "fallback_groups": fell_back,
            "val_n_by_group": np.bincount(out.group[s], minlength=n_groups).tolist(),
            "val_metrics": metrics.binary_metrics(y, prob, metrics.per_row_thresholds(out.group[s], per))}
    return {s: chosen[s] for s in SYSTEMS if s in chosen}


def row_thresholds(chosen: Mapping[str, Mapping[str, Any]], out: SplitOutputs) -> dict[str, float | np.ndarray]:
    """Each system's threshold for every row of a split: one value, or one per row."""
    return {s: (metrics.per_row_thresholds(out.group[base_system(s)], t["values"]) if "values" in t
                else t["value"]) for s, t in chosen.items()}


# --------------------------------------------------------------------------- scoring
def score_systems(y: np.ndarray, out: SplitOutputs, thresholds: Mapping[str, float | np.ndarray],
                  masks: Mapping[str, np.ndarray], patients: np.ndarray, boot: Mapping[str, Any]) -> dict[str, Any]:
    """Every system's metrics, with patient-bootstrap intervals, on every subset (row mask)."""
    scored: dict[str, Any] = {}
    for s, thr in thresholds.items():
        prob = out.prob[base_system(s)]
        scored[s] = {"description": SYSTEMS[s], "threshold": float(thr) if np.ndim(thr) == 0 else None}
        for sub, mask in masks.items():
            t = thr if np.ndim(thr) == 0 else thr[mask]
            scored[s][sub] = metrics.bootstrap_binary_metrics(y[mask], prob[mask], patients[mask], t, **boot)
    return scored


def compare_systems(y: np.ndarray, out: SplitOutputs, thresholds: Mapping[str, float | np.ndarray],
                    patients: np.ndarray, pairs: Sequence[tuple[str, str]], boot: Mapping[str, Any],
                    mask: np.ndarray | None = None) -> dict[str, Any]:
    """Paired patient-bootstrap differences ``a - b`` (same resamples) for each pair present."""
    m = np.ones(len(y), bool) if mask is None else mask
    found = {}
    for a, b in pairs:
        if a not in thresholds or b not in thresholds or f"{a}_minus_{b}" in found:
            continue
        ta, tb = (thresholds[s] if np.ndim(thresholds[s]) == 0 else thresholds[s][m] for s in (a, b))
        found[f"{a}_minus_{b}"] = metrics.paired_bootstrap_difference(
            y[m], out.prob[base_system(a)][m], out.prob[base_system(b)][m], patients[m], ta, tb, **boot)
    return found


def comparison_pairs(reference: str | None) -> list[tuple[str, str]]:
    """The differences the report gives: routing against the equal-budget pooled system first."""
    pairs = [("hard", reference), ("soft", reference)] if reference else []
    pairs += [("hard", "pooled"), ("soft", "pooled"), ("pooled_continued", "pooled"), ("soft", "hard"),
              ("oracle", "hard"), ("hard_per_group", "hard")]
    return [(a, b) for a, b in pairs if a != b]


def study_outputs(df: pd.DataFrame, y: np.ndarray, out: SplitOutputs, study_col: str | None,
                  how: str) -> tuple[pd.DataFrame, SplitOutputs]:
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
    agg = SplitOutputs(prob={s: studies[f"prob_{s}"].to_numpy(float) for s in out.prob},
                       group={s: studies[f"group_{s}"].to_numpy(int) for s in out.group})
    return studies, agg


def score_studies(val: tuple[pd.DataFrame, np.ndarray, SplitOutputs],
                  test: tuple[pd.DataFrame, np.ndarray, SplitOutputs], study_col: str | None, n_groups: int, method: str, target: float, reference: str | None,
                  boot: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """Study-level results per aggregation (max, mean): thresholds chosen on validation
    studies, every system scored on test studies, and routing against ``reference``."""
    unit = "patient_id + " + study_col if study_col else "patient_id (one study per patient)"
    result: dict[str, Any] = {"unit": unit, "aggregations": {}}
    for how in ("max", "mean"):
        val_studies, val_out = study_outputs(*val, study_col, how)
        test_studies, test_out = study_outputs(*test, study_col, how)
        y_val, y_test = val_studies["fracture"].to_numpy(int), test_studies["fracture"].to_numpy(int)
        chosen = choose_thresholds(y_val, val_out, n_groups, method, target, notes, unit=f"studies ({how})")
        thr = row_thresholds(chosen, test_out)
        patients = test_studies["patient_id"].to_numpy()
        whole = {"overall": np.ones(len(y_test), bool)}
        result["aggregations"][how] = {
            "n_studies": int(len(test_studies)), "n_patients": int(pd.unique(patients).size),
            "prevalence": float(y_test.mean()) if len(y_test) else float("nan"),
            "thresholds": chosen,
            "systems": {s: r["overall"] | {"threshold": r["threshold"]}
                        for s, r in score_systems(y_test, test_out, thr, whole, patients, boot).items()},
            "comparisons": compare_systems(y_test, test_out, thr, patients, comparison_pairs(reference)[:2], boot),
        }
    return result


def score_subgroups(df: pd.DataFrame, y: np.ndarray, out: SplitOutputs, patients: np.ndarray,
                    boot: Mapping[str, Any]) -> dict[str, Any]:
    """AUROC (with CI) of every base system per value of each subgroup column the CSV has;
    subsets of fewer than MIN_SUBSET_IMAGES images or with one class are listed, not scored."""
    found: dict[str, Any] = {}
    for col in SUBGROUP_COLUMNS:
        values = cohort.subgroup_values(df, col)
        if values is None:
            continue
        found[col] = {}
        for value in sorted(set(values)):
            mask = values == value
            n, n_pos = int(mask.sum()), int(y[mask].sum())
            entry: dict[str, Any] = {"n": n, "n_pos": n_pos, "n_patients": int(pd.unique(patients[mask]).size)}
            if n < MIN_SUBSET_IMAGES or not 0 < n_pos < n:
                entry["too_small"] = (f"fewer than {MIN_SUBSET_IMAGES} images" if n < MIN_SUBSET_IMAGES
                                      else "one class only")
            else:
                entry["auroc"] = {}
                for s in out.prob:
                    m = metrics.bootstrap_binary_metrics(y[mask], out.prob[s][mask], patients[mask], 0.5, **boot)
                    entry["auroc"][s] = {"value": m["auroc"], "ci": m["ci"].get("auroc")}
            found[col][value] = entry
    return found


# --------------------------------------------------------------------------- calibration
CALIBRATION_NAMES = {"temperature": "temperature scaling", "prior": "prior-shift correction",
                     "platt": "Platt (logistic) recalibration"}


def _recalibrated(inf: Mapping[str, Any], params: Mapping[str, Mapping[str, float]], n_groups: int,
                  age_temperature: float) -> dict[str, Any]:
    """:func:`infer`'s output with each model's probabilities mapped by its ``{"a", "b"}``."""
    return {
        "age_probs": calibration.apply_calibration({"models": {calibration.AGE_KEY: {"a": 1.0 / age_temperature}}},
                                                   calibration.AGE_KEY, inf["age_probs"]),
        "group_probs": np.stack([calibration.apply_binary(inf["group_probs"][:, g], params[f"agegroup{g}"])
                                 for g in range(n_groups)], 1),
        **{key: calibration.apply_binary(inf[key], params[key])
           for key in ("pooled", "pooled_continued") if inf.get(key) is not None},
    }


def _model_rows(val: "Split", n_groups: int) -> dict[str, np.ndarray]:
    """Each fracture model's validation rows: a group's model those routed to it (the images
    it decides in hard routing), the pooled models all."""
    pred = val.inf["age_probs"].argmax(1)
    rows = {f"agegroup{g}": pred == g for g in range(n_groups)}
    for key in ("pooled", "pooled_continued"):
        if val.inf.get(key) is not None:
            rows[key] = np.ones(len(val.y), bool)
    return rows


def _model_probs(inf: Mapping[str, Any], key: str) -> np.ndarray:
    return inf["group_probs"][:, int(key.removeprefix("agegroup"))] if key.startswith("agegroup") else inf[key]


def calibration_summary(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """ECE, Brier, calibration slope and intercept of one set of probabilities."""
    return {"ece": metrics.expected_calibration_error(y, prob, CALIBRATION_BINS),
            "brier": float(np.mean((prob - y) ** 2)), **recalibration.slope_intercept(y, prob)}


def calibrate(val: "Split", test: "Split",
              routed: inference.RoutedModels) -> tuple[dict[str, Any], SplitOutputs, dict[str, SplitOutputs]]:
    """Recalibration per model, fitted on validation, applied to test.

    Per fracture model three maps of the logit (recalibration.METHODS: temperature, prior-shift
    correction, Platt) are fitted on its validation rows (:func:`_model_rows`) and the one with
    the lowest cross-validated log loss over patient folds is chosen; the age classifier gets a
    temperature on the true groups (its argmax, so hard routing, is unchanged by it). Returns
    ``chosen`` (method per model) and ``params`` ({"a", "b"} per model: calibrated =
    sigmoid(a * logit(p) + b)), every method's parameters, and per system the test ECE, Brier
    score, calibration slope and intercept before and after each method and the chosen one;
    the test probabilities of the chosen recalibration, and those of each method.
    """
    age_t = metrics.fit_temperature(val.true_group, val.inf["age_probs"])
    patients = val.patients
    choices = {}
    for key, rows in _model_rows(val, routed.n_groups).items():
        choices[key] = recalibration.choose_method(val.y[rows], _model_probs(val.inf, key)[rows], patients[rows])
    chosen = {"age_classifier": "temperature", **{k: c.method for k, c in choices.items()}}
    params = {"age_classifier": {"a": 1.0 / age_t, "b": 0.0}, **{k: c.params for k, c in choices.items()}}
    outputs = {m: system_probs(_recalibrated(test.inf, {k: c.candidates[m] for k, c in choices.items()},
                                             routed.n_groups, age_t), test.true_group)
               for m in recalibration.METHODS}
    after = system_probs(_recalibrated(test.inf, params, routed.n_groups, age_t), test.true_group)
    systems = {}
    for s, prob in test.out.prob.items():
        systems[s] = {"before": calibration_summary(test.y, prob),
                      **{m: calibration_summary(test.y, outputs[m].prob[s]) for m in recalibration.METHODS},
                      "chosen": calibration_summary(test.y, after.prob[s])}
        # the keys the report and older readers use
        systems[s].update(ece_before=systems[s]["before"]["ece"], ece_after=systems[s]["chosen"]["ece"],
                          brier_before=systems[s]["before"]["brier"], brier_after=systems[s]["chosen"]["brier"])
    age = {"ece_before": metrics.top_label_calibration_error(test.true_group, test.inf["age_probs"], CALIBRATION_BINS),
           "ece_after": metrics.top_label_calibration_error(
               test.true_group, metrics.apply_temperature(test.inf["age_probs"], age_t), CALIBRATION_BINS)}
    result = {"method": "per model the best of temperature scaling, prior-shift correction and Platt recalibration "
                        "(lowest cross-validated log loss over patient folds of validation), fitted on validation",
              "form": "calibrated = sigmoid(a * logit(p_raw) + b)", "n_bins": CALIBRATION_BINS,
              "chosen": chosen, "params": params,
              "candidates": {k: c.candidates for k, c in choices.items()},
              "cv_log_loss": {k: c.cv_log_loss for k, c in choices.items()},
              "temperatures": {"age_classifier": age_t,
                               **{k: 1.0 / c.candidates["temperature"]["a"] for k, c in choices.items()}},
              "systems": systems, "age_classifier": age}
    return result, after, outputs


def calibration_file(params: Mapping[str, Any], routed: inference.RoutedModels) -> dict[str, Any]:
    """calibration.json: the parameters and the checkpoint each model key was fitted for."""
    serving = {calibration.AGE_KEY: routed.age, **{f"agegroup{g}": routed.model_for_group(g)
                                                   for g in range(routed.n_groups)},
               "pooled": routed.pooled, "pooled_continued": routed.pooled_continued}
    checkpoints = {k: calibration.file_digest(lm.path) for k, lm in serving.items()
                   if lm is not None and lm.path is not None and k in params["models"]}
    return {**params, "checkpoints": checkpoints,
            "note": "fitted on validation by evaluate.py; applied by predict.py (calibration.apply_calibration)"}


# --------------------------------------------------------------------------- training budgets
def model_budget(lm: inference.LoadedModel) -> dict[str, Any]:
    """What one model's training cost, from its checkpoint: start, epochs, images, settings."""
    meta = lm.meta
    cfg = meta.get("config") or {}
    return {"model": lm.name, "file": lm.path.name if lm.path else None, "init": meta.get("init"),
            "epochs_run": meta.get("epochs_run"), "epochs_max": meta.get("epochs_max", cfg.get("epochs")),
            "best_epoch": meta.get("epoch"), "images_seen": meta.get("images_seen"),
            "schedule": {k: cfg.get(k) for k in SCHEDULE_KEYS}}


def _init_key(init: Mapping[str, Any] | None) -> tuple:
    # A checkpoint start is named by its weights' digest where recorded: the pooled model
    # retrained after the control continued it keeps its file name, not its weights.
    if not init:
        return ("unknown",)
    return (init.get("kind"), init.get("weights_sha256") or init.get("checkpoint") or init.get("source")
            or init.get("seed"))


def system_budgets(routed: inference.RoutedModels) -> dict[str, dict[str, Any]]:
    """Per system (``routed`` for hard/soft/oracle, ``pooled``, ``pooled_continued``): its
    models' budgets and the images they saw in training (None if a model did not record it)."""
    serving = list({id(m): m for m in (routed.model_for_group(g) for g in range(routed.n_groups))}.values())
    budgets = {"routed": {"models": [model_budget(m) for m in serving],
                          "groups_served_by_pooled": [g for g in range(routed.n_groups)
                                                      if routed.model_for_group(g) is routed.pooled]}}
    for key in ("pooled", "pooled_continued"):
        lm = getattr(routed, key)
        if lm is not None:
            budgets[key] = {"models": [model_budget(lm)], "groups_served_by_pooled": []}
    for b in budgets.values():
        seen = [m["images_seen"] for m in b["models"]]
        b["images_seen"] = None if any(v is None for v in seen) else int(sum(seen))
        inits = {_init_key(m["init"]) for m in b["models"]}
        b["init"] = b["models"][0]["init"] if len(inits) == 1 else None
        b["epochs_max"] = max((m["epochs_max"] or 0) for m in b["models"])
    return budgets


def budget_differences(routed_budget: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """Why two systems' training budgets differ; empty when they are equal."""
    why = []
    if routed_budget["groups_served_by_pooled"]:
        why.append(f"age group(s) {routed_budget['groups_served_by_pooled']} are served by the pooled model")
    if routed_budget["init"] is None:
        why.append("the group models do not share one starting point")
    elif _init_key(routed_budget["init"]) != _init_key(other["init"]):
        ours, theirs = report.describe_init(routed_budget["init"]), report.describe_init(other["init"])
        if ours == theirs:
            theirs += ", but other weights under that name (retrained in between)"
        why.append(f"they start from different weights: the group models from {ours}, this one from {theirs}")
    ref = other["models"][0]["schedule"]
    by_diff: dict[str, list[str]] = {}  # one sentence for the group models that differ alike
    for m in routed_budget["models"]:
        diff = [f"{k} {m['schedule'].get(k)} vs {ref.get(k)}" for k in SCHEDULE_KEYS
                if m["schedule"].get(k) != ref.get(k)]
        if diff:
            by_diff.setdefault(", ".join(diff), []).append(m["model"])
    for diff, names in by_diff.items():
        who = "the group models" if len(names) == len(routed_budget["models"]) > 1 else " and ".join(names)
        why.append(f"{who} trained with other settings ({diff})")
    a, b = routed_budget["images_seen"], other["images_seen"]
    if a is None or b is None:
        why.append("a checkpoint does not record the images it saw in training")
    elif abs(a - b) > IMAGES_TOLERANCE * max(a, b):
        why.append(f"they saw {a:,} vs {b:,} training images")
    return why


def equal_budget_reference(budgets: Mapping[str, Any]) -> tuple[str | None, dict[str, list[str]]]:
    """The pooled system trained on the routed system's budget (the continued control first),
    or None; and, per pooled system, why its budget differs (empty: equal)."""
    why = {key: budget_differences(budgets["routed"], budgets[key])
           for key in ("pooled_continued", "pooled") if key in budgets}
    reference = next((key for key, reasons in why.items() if not reasons), None)
    return reference, why


# --------------------------------------------------------------------------- routing
def summarise_routing(test_df: pd.DataFrame, y: np.ndarray, inf_test: Mapping[str, Any], true_group: np.ndarray,
                      test: SplitOutputs, thresholds: Mapping[str, Any], names: Sequence[str],
                      boot: Mapping[str, Any], notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The age classifier on test (with a patient-bootstrap CI of macro-F1) and what the
    misrouted images cost."""
    pred_group = inf_test["age_probs"].argmax(1)
    age = metrics.multiclass_summary(true_group, pred_group, range(len(names)), names)
    age_df = pd.DataFrame({"patient_id": test_df["patient_id"].astype(str).to_numpy(), "t": true_group,
                           "p": pred_group})
    _, lo, hi = metrics.patient_bootstrap_ci(age_df, lambda d: metrics.macro_f1(d["t"], d["p"], range(len(names))),
                                             **boot)
    age["macro_f1_ci"] = [lo, hi]
    if "age_group_label" in test_df.columns:
        csv_pred = pd.to_numeric(test_df["age_group_label"], errors="coerce").to_numpy()
        age["agreement_with_csv_age_group_label"] = float((csv_pred == pred_group).mean())
        if age["agreement_with_csv_age_group_label"] < 1:
            notes.append("age_group_label in the test CSV (stage 3) differs from this run's age predictions "
                         f"for {int((csv_pred != pred_group).sum())} images; this run's predictions were used")
    mis = pred_group != true_group
    misrouted = {"n": int(mis.sum()), "n_total": int(len(mis)), "fraction": float(mis.mean()) if len(mis) else 0.0,
                 "metrics": {}}
    if mis.any():
        for s in ("hard", "oracle"):
            m = metrics.binary_metrics(y[mis], test.prob[s][mis], thresholds[s]["value"])
            misrouted["metrics"][s] = {k: m[k] for k in ("n", "accuracy", "auroc", "f1")}
    return age, misrouted


# --------------------------------------------------------------------------- figures
def make_figures(report_dir: Path, y: np.ndarray, test: SplitOutputs, calibrated: SplitOutputs,
                 thresholds: Mapping[str, float | np.ndarray], masks: Mapping[str, np.ndarray],
                 age_summary: Mapping[str, Any], routed: inference.RoutedModels,
                 history_pattern: str) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    shown = [s for s in BASE_SYSTEMS if s in test.prob]
    panel_keys = [k for k in masks if k == "overall" or k.startswith("age ")]
    panels = {k: {s: (y[masks[k]], test.prob[s][masks[k]], thresholds[s]) for s in shown}
              for k in panel_keys}
    figs["roc"] = report.plot_roc_panels(panels, report_dir / "roc_by_age_group.png",
                                         "Test ROC: overall and per true age group")
    if "cast" in masks:
        cast_panels = {k: {s: (y[masks[k]], test.prob[s][masks[k]], thresholds[s]) for s in shown}
                       for k in ("cast", "no cast")}
        figs["roc_cast"] = report.plot_roc_panels(cast_panels, report_dir / "roc_cast.png",
                                                  "Test ROC with and without a cast")
    cms = {SYSTEMS[s].split(" ", 1)[0] + " " + s:
           metrics.binary_metrics(y, test.prob[base_system(s)], thresholds[s])["confusion_matrix"]
           for s in thresholds}
    figs["confusion"] = report.plot_confusion_matrices(
        cms, report_dir / "confusion_fracture.png", ("no fracture", "fracture"),
        "Fracture, test set, at the validation threshold(s)")
    figs["age_confusion"] = report.plot_confusion_matrices(
        {"age-group classifier (test)": age_summary["confusion_matrix"]},
        report_dir / "confusion_age.png", age_summary["names"])
    figs["calibration"] = report.plot_calibration(
        {s: (y, test.prob[s]) for s in shown}, report_dir / "calibration.png",
        after={s: (y, calibrated.prob[s]) for s in shown})
    histories = {}
    for lm in [routed.age, *routed.groups.values(), routed.pooled, routed.pooled_continued]:
        if lm is not None and lm.path is not None:
            h = find_history(lm.path, history_pattern)
            if h is not None:
                histories[lm.path.stem] = h
    if histories:
        figs["training"] = report.plot_training_curves(histories, report_dir / "training_curves.png")
    return figs


def checklist_figures(report_dir: Path, result: Mapping[str, Any], test: Split,
                      extra: Mapping[str, Any]) -> dict[str, Path]:
    """The patient flow, the decision curve and one reliability diagram per system (raw,
    each recalibration and the chosen one per model)."""
    figs = {"flow": report.plot_flow(result["flow"], report_dir / "patient_flow.png"),
            "decision_curve": report.plot_decision_curve(result["net_benefit"]["curve"], report_dir / "decision_curve.png")}
    by_method = extra["by_method"]
    panels = {s: {"raw": (test.y, test.out.prob[s]),
                  **{CALIBRATION_NAMES[m]: (test.y, by_method[m].prob[s]) for m in recalibration.METHODS},
                  "chosen per model": (test.y, extra["calibrated"].prob[s])}
              for s in UTILITY_SYSTEMS if s in test.out.prob}
    figs["reliability"] = report.plot_reliability_per_system(panels, report_dir / "reliability_per_system.png",
                                                             CALIBRATION_BINS)
    return figs


def error_cam_figure(report_dir: Path, test: Split, confident: Sequence[Mapping[str, Any]],
                     routed: inference.RoutedModels, device: torch.device) -> Path | None:
    """Grad-CAM of the hard-routed system's most confident errors, each by the model that
    decided it (the predicted group's)."""
    if not confident:
        return None
    pred_group = test.inf["age_probs"].argmax(1)
    items = []
    for e in confident:
        i = e["row"]
        lm = routed.model_for_group(int(pred_group[i]))
        (img, cam), = inference.cam_examples(lm, test.df.iloc[[i]], device)
        items.append({"image": img, "cam": cam,
                      "caption": f"{e['kind']}: patient {e['patient_id']}, study {e['study']}\n"
                                 f"{Path(e['image']).name[:28]}",
                      "overlay": f"p {e['probability']:.2f} (raw {e['raw_probability']:.2f})\n"
                                 f"predicted group {e['predicted_group']}\n"
                                 f"true group {e['true_group']}"})
    return report.plot_cam_grid(items, report_dir / "gradcam_confident_errors.png",
                                "Grad-CAM, the hard-routed system's most confident errors (test)")


def cam_figure(report_dir: Path, df: pd.DataFrame, y: np.ndarray, prob: np.ndarray,
               thr: float, pred_group: np.ndarray, true_group: np.ndarray,
               routed: inference.RoutedModels, device: torch.device, n: int) -> Path | None:
    """Grad-CAM of the hard-routed model on a mix of TP, FN, FP and TN test images."""
    if n <= 0 or len(df) == 0:
        return None
    pos = prob >= thr
    kinds = {"TP": np.flatnonzero(pos & (y == 1))[np.argsort(-prob[pos & (y == 1)])],
             "FN": np.flatnonzero(~pos & (y == 1))[np.argsort(prob[~pos & (y == 1)])],
             "FP": np.flatnonzero(pos & (y == 0))[np.argsort(-prob[pos & (y == 0)])],
             "TN": np.flatnonzero(~pos & (y == 0))[np.argsort(prob[~pos & (y == 0)])]}
    picked: list[tuple[int, str]] = []
    depth = 0
    while len(picked) < n and depth < len(df):
        for kind in ("TP", "FN", "FP", "TN"):
            if depth < len(kinds[kind]) and len(picked) < n:
                picked.append((int(kinds[kind][depth]), kind))
        depth += 1
    names = columns.age_group_names(routed.age_bounds)
    items = []
    for i, kind in picked:
        lm = routed.model_for_group(int(pred_group[i]))
        (img, cam), = inference.cam_examples(lm, df.iloc[[i]], device)
        items.append({"image": img, "cam": cam,
                      "caption": f"{kind}: label {int(y[i])}, age {df['age'].iloc[i]:.1f} y "
                                 f"({names[true_group[i]]})\nmodel {lm.name}, {img.shape[1]}x{img.shape[0]} px",
                      "overlay": f"predicted age group {names[pred_group[i]]}\n"
                                 f"fracture p {prob[i]:.2f}, threshold {thr:.2f}"})
    return report.plot_cam_grid(items, report_dir / "gradcam_examples.png",
                                "Grad-CAM, hard-routed fracture model (test images)")


# --------------------------------------------------------------------------- main
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage 5: routed evaluation on the fixed test set.",
                                add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default=".", help="pipeline output directory")
    p.add_argument("--test-csv", default=None, help="default: <out-dir>/age_test.csv")
    p.add_argument("--val-csv", default=None, help="default: <out-dir>/age_val_tmp.csv")
    p.add_argument("--models-dir", default=None, help="default: <out-dir>/saved_agegroup_models")
    p.add_argument("--report-dir", default=None, help="default: <out-dir>/report")
    p.add_argument("--routing", choices=inference.ROUTINGS, default="hard",
                   help="system whose output fills fracture_prob/fracture_pred in the CSV")
    p.add_argument("--threshold-method", choices=("youden", "sensitivity"), default="youden")
    p.add_argument("--target-sensitivity", type=presets.probability, default=None,
                   help="choose the highest threshold with this validation sensitivity "
                        "(implies --threshold-method sensitivity)")
    p.add_argument("--study-col", default="study_number",
                   help="column that, with patient_id, identifies a study (the images read together); "
                        "without it in the CSV, each patient is one study")
    p.add_argument("--n-boot", type=presets.non_negative_int, default=1000, help="patient bootstrap resamples")
    p.add_argument("--seeds", type=presets.positive_int, default=1,
                   help="training seeds stage 4 trained (train_fracture_per_agegroup.py --seeds): the Answer "
                        "compares each seed's routed system with its own control (<stem>_seedS files)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--alpha", type=presets.probability, default=0.05, help="1 - confidence level")
    p.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--n-cam", type=presets.non_negative_int, default=6,
                   help="Grad-CAM examples in the report (0: none)")
    p.add_argument("--history-pattern", default="{stem}_metrics.csv",
                   help="per-epoch metrics CSV beside each checkpoint ({stem}: checkpoint stem)")
    p.add_argument("--cache-dir", default=None,
                   help="decoded-image cache shared with the trainers (default: "
                        "<out-dir>/image.cache)")
    p.add_argument("--no-cache", action="store_true", help="decode every image (no cache)")
    p.add_argument("--batch-size", type=presets.positive_int, default=64)
    p.add_argument("--workers", type=presets.non_negative_int, default=0)
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun, cuda means each rank's local GPU)")
    p.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="mixed-precision inference (auto: bf16 on CUDA, off on the CPU)")
    p.add_argument("--result-json", type=Path, default=None,
                   help="also write the returned summary as JSON (used by run_all_training.py)")
    presets.add_split_args(p, "evaluate")
    return p


def _paths(args: argparse.Namespace) -> dict[str, Path]:
    """The inputs and outputs: the flags, or their defaults in the run directory."""
    run = columns.RunDir(args.out_dir)
    given = {"test_csv": args.test_csv, "val_csv": args.val_csv, "models_dir": args.models_dir,
             "report_dir": args.report_dir}
    return {"out": run.root, **{k: Path(v) if v else getattr(run, k) for k, v in given.items()}}


def true_groups(df: pd.DataFrame, bounds: Sequence[float], split: str, notes: list[str]) -> np.ndarray:
    """True age groups from ``age`` with the age classifier's bounds (noting CSV disagreement)."""
    g = np.asarray(columns.age_to_group(df["age"].to_numpy(float), bounds))
    stated = pd.to_numeric(df["age_group"], errors="coerce").to_numpy()
    if (n_diff := int((stated != g).sum())):
        notes.append(f"{split}: age_group in the CSV differs from the age classifier's bounds {bounds} "
                     f"for {n_diff} rows; the bounds were used")
    return g


def decode_splits(test_df: pd.DataFrame, val_df: pd.DataFrame, routed: inference.RoutedModels,
                  cache: str | Path | None, skip_bad: bool, out: Path,
                  notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Every test and validation image decoded (into the cache, at each model's size) before
    inference: an undecodable one stops here in one line, or with ``skip_bad`` is left out,
    listed in rejected_rows.csv and counted in the notes. The CSVs themselves keep every row."""
    models = (routed.age, *routed.groups.values(), routed.pooled, routed.pooled_continued)
    sizes = sorted({lm.img_size for lm in models if lm})
    frames, left_out = {"test": test_df, "val": val_df}, {}
    rejected = out / columns.REJECTED_CSV
    for split, df in list(frames.items()):
        for size in sizes if cache is not None else sizes[:1]:
            frames[split] = engine.decode_pass(frames[split], size, cache_dir=cache, skip_bad=skip_bad,
                                               rejected_csv=rejected)
        left_out[split] = len(df) - len(frames[split])
        if left_out[split]:
            notes.append(f"{split}: {left_out[split]} of {len(df)} images could not be decoded and were "
                         f"left out (--skip-bad; listed in {rejected})")
    return frames["test"], frames["val"], left_out


def study_column(df: pd.DataFrame, name: str | None, notes: list[str]) -> str | None:
    if name and name in df.columns:
        return name
    notes.append(f"no {name!r} column: each patient counts as one study")
    return None


@dataclass
class Split:
    """One evaluated CSV: its rows, fracture labels and true age groups, the models' outputs
    (:func:`infer`) and the systems' probabilities."""

    df: pd.DataFrame
    y: np.ndarray
    true_group: np.ndarray
    inf: dict[str, Any]
    out: SplitOutputs
    seeds: list[tuple[int, SplitOutputs]] = field(default_factory=list)

    @property
    def patients(self) -> np.ndarray:
        return self.df["patient_id"].astype(str).to_numpy()


def load_and_infer(args: argparse.Namespace, paths: Mapping[str, Path], device: torch.device,
                   distributed_info: str) -> tuple[inference.RoutedModels, Split, Split, dict[str, int], list[str]]:
    """The checked CSVs and models, every image decoded, and every model's inference on
    validation and test (sharded under torchrun: every rank calls this)."""
    test_df = tables.read_split_csv(paths["test_csv"])
    val_df = tables.read_split_csv(paths["val_csv"])
    for note in splits.check_splits({str(paths["test_csv"]): test_df, str(paths["val_csv"]): val_df},
                                    paths["test_csv"], also=[columns.RunDir(paths["out"]).train_csv]):
        engine.log(f"note: {note}")
    routed = inference.load_routed_models(paths["models_dir"], device)
    # the true groups, the oracle and the age subgroups all follow the checkpoints' bounds
    splits.recorded_age_groups(paths["test_csv"], routed.age_bounds, given_by=f"{routed.age.path.name}'s",
                               remedy="retrain the models of this run (run_all_training.py --from-stage 3)")
    for note in splits.check_trained_apart({lm.path: lm.meta for lm in inference.loaded_models(routed) if lm.path},
                                           paths["test_csv"]):
        engine.log(f"note: {note}")
    notes = list(routed.notes)
    if routed.pooled is None:
        notes.append(f"no {inference.POOLED_CKPT}: the pooled baseline (d) is missing")
    cache = None if args.no_cache else (args.cache_dir or columns.RunDir(paths["out"]).cache_dir)
    amp = engine.resolve_amp(args.amp, device)
    test_df, val_df, left_out = decode_splits(test_df, val_df, routed, cache, args.skip_bad, paths["out"], notes)
    engine.log(f"inference: validation ({len(val_df)} images), test ({len(test_df)} images) on {device} "
               f"(amp {amp}){distributed_info}")
    found = []
    for name, df in (("val", val_df), ("test", test_df)):
        inf = infer(routed, df, device, args.tta, batch_size=args.batch_size, workers=args.workers, cache_dir=cache,
                    amp=amp)
        true = true_groups(df, routed.age_bounds, name, notes)
        found.append(Split(df, df["fracture"].to_numpy(int), true, inf, system_probs(inf, true)))
    test = found[1]
    for seed, seed_models in further_seeds(routed, paths["models_dir"], args.seeds, device, notes):
        loader_kw = {"batch_size": args.batch_size, "workers": args.workers, "cache_dir": cache, "amp": amp}
        inf = {**test.inf, **infer_seed(seed_models, routed, test.df, device, args.tta, **loader_kw)}
        test.seeds.append((seed, system_probs(inf, test.true_group)))
    return routed, found[0], test, left_out, notes


# The systems of the decision curve and the reliability diagrams: routed, its control, plain pooled.
UTILITY_SYSTEMS = ("hard", "pooled_continued", "pooled")
N_CONFIDENT_ERRORS = 10


def checklist_items(paths: Mapping[str, Path], val: Split, test: Split, extra: Mapping[str, Any],
                    left_out: Mapping[str, int], names: Sequence[str]) -> dict[str, Any]:
    """The reporting-checklist sections of metrics.json: patient flow, Table 1 per partition,
    net benefit (decision curve, on the calibrated probabilities) and the error analysis of
    the hard-routed system at its validation threshold. ``extra``: :func:`score`'s second value."""
    run = columns.RunDir(paths["out"])
    calibrated, thresholds = extra["calibrated"], extra["thresholds"]
    frames = {"test": test.df.assign(age_group=test.true_group), "val": val.df.assign(age_group=val.true_group)}
    if run.train_csv.is_file():
        frames["train"] = tables.read_split_csv(run.train_csv, validate=False)
    shown = [s for s in UTILITY_SYSTEMS if s in calibrated.prob]
    pred = (test.out.prob["hard"] >= thresholds["hard"]).astype(int)
    # ranked by the calibrated probability: the group models' raw scales differ, so raw
    # probabilities of two models are not equally confident
    errors_ = cohort.most_confident_errors(test.df, test.y, calibrated.prob["hard"], pred, N_CONFIDENT_ERRORS)
    pred_group = test.inf["age_probs"].argmax(1)
    for e in errors_:
        e["raw_probability"] = float(test.out.prob["hard"][e["row"]])
        e["predicted_group"] = names[int(pred_group[e["row"]])]
        e["true_group"] = names[int(test.true_group[e["row"]])]
    return {
        "flow": cohort.patient_flow(run, frames, left_out),
        "table_one": cohort.table_one(frames, names),
        "net_benefit": {"probabilities": "calibrated (the chosen recalibration)",
                        "curve": evidence.decision_curve(test.y, {s: calibrated.prob[s] for s in shown})},
        "error_analysis": {"system": "hard", "threshold": "the validation threshold (raw probabilities)",
                           "ranked_by": "calibrated probability",
                           "by": cohort.error_breakdown(frames["test"], test.y, pred, names),
                           "most_confident": errors_},
    }


def score(args: argparse.Namespace, routed: inference.RoutedModels, val: Split, test: Split,
          notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every number of the evaluation (the ``metrics.json`` sections), and what the output
    files need besides (per-row thresholds, subsets, calibrated probabilities)."""
    method = "sensitivity" if args.target_sensitivity is not None else args.threshold_method
    target = args.target_sensitivity if args.target_sensitivity is not None else 0.95
    boot = {"n_boot": args.n_boot, "seed": args.seed, "alpha": args.alpha}
    names = columns.age_group_names(routed.age_bounds)
    chosen = choose_thresholds(val.y, val.out, routed.n_groups, method, target, notes)
    thr = row_thresholds(chosen, test.out)
    budgets = system_budgets(routed)
    reference, budget_why = equal_budget_reference(budgets)
    masks = subsets(test.df, test.true_group, names)
    print(f"metrics with {args.n_boot} patient-bootstrap resamples ...")
    pairs = comparison_pairs(reference)
    study_col = study_column(test.df, args.study_col, notes)
    calib, calibrated, by_method = calibrate(val, test, routed)
    age, misrouted = summarise_routing(test.df, test.y, test.inf, test.true_group, test.out, chosen, names, boot, notes)
    result = {
        "threshold_method": method if method == "youden" else f"sensitivity >= {target}",
        "budgets": budgets,
        "equal_budget": {"reference": reference, "differences": budget_why, "images_tolerance": IMAGES_TOLERANCE},
        "thresholds": chosen, "subsets": list(masks),
        "systems": score_systems(test.y, test.out, thr, masks, test.patients, boot),
        "comparisons": compare_systems(test.y, test.out, thr, test.patients, pairs, boot),
        "comparisons_by_age_group": {
            sub: compare_systems(test.y, test.out, thr, test.patients, pairs[:1], boot, mask=masks[sub])
            for sub in masks if sub.startswith("age ") and masks[sub].any()},
        "study_level": score_studies((val.df, val.y, val.out), (test.df, test.y, test.out), study_col,
                                     routed.n_groups, method, target, reference, boot, notes),
        "subgroups": score_subgroups(test.df, test.y, test.out, test.patients, boot),
        "calibration": calib, "age_classifier": age, "misrouted": misrouted,
    }
    if reference:
        first = training_seed(routed)
        runs = [evidence.SeedSystems(first if first is not None else 0, test.out.prob["hard"],
                                     test.out.prob[reference])]
        runs += [evidence.SeedSystems(seed, out.prob["hard"], out.prob[reference]) for seed, out in test.seeds]
        result["seeds"] = {"reference": reference, **evidence.across_seeds(test.y, test.patients, runs, boot)}
    return result, {"thresholds": thr, "masks": masks, "calibrated": calibrated, "by_method": by_method}


def describe_run(args: argparse.Namespace, paths: Mapping[str, Path], routed: inference.RoutedModels, val: Split,
                 test: Split, device: torch.device, world_size: int) -> dict[str, Any]:
    """What was evaluated, how, and with which models (the head of ``metrics.json``)."""
    return {
        "inputs": {k: str(v) for k, v in paths.items()}, "config": to_dict(args),
        "environment": environment.describe(),
        "device": str(device), "world_size": world_size,
        "n_test_images": int(len(test.df)), "n_test_patients": int(pd.unique(test.patients).size),
        "test_prevalence": float(test.y.mean()), "n_val_images": int(len(val.df)),
        "age_bounds": list(routed.age_bounds), "age_group_names": list(columns.age_group_names(routed.age_bounds)),
        "n_boot": args.n_boot, "seed": args.seed, "alpha": args.alpha, "tta": args.tta,
        "routing_served_by": routed.served_by(),
        "models": {lm.name: {"path": str(lm.path), "model_name": lm.meta.get("model_name"), "img_size": lm.img_size,
                             "epoch": lm.meta.get("epoch"), "train_metrics": lm.meta.get("metrics"),
                             "budget": model_budget(lm)}
                   for lm in [routed.age, *routed.groups.values(), routed.pooled, routed.pooled_continued] if lm},
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns the written files and a summary on rank 0 (and in a single
    process), an empty dict on the other torchrun ranks."""
    t0 = time.perf_counter()
    paths = _paths(args)
    with distributed.session(args.device, paths["out"]) as info:
        if info.is_main:
            print_config(to_dict(args), SCRIPT)
        sharded = f", sharded over {info.world_size} processes" if info.distributed else ""
        routed, val, test, left_out, notes = load_and_infer(args, paths, info.device, sharded)
        # The rest (bootstrap, figures, Grad-CAM) is rank 0's alone and may outlast the
        # collective timeout: leave the process group now (barrier first, see
        # distributed.cleanup), so the other ranks exit instead of waiting for rank 0.
        distributed.cleanup()
        if not info.is_main:
            return {}
        scores, extra = score(args, routed, val, test, notes)
        result = {**describe_run(args, paths, routed, val, test, info.device, info.world_size),
                  "undecodable_left_out": left_out, **scores, "notes": notes}
        result.update(checklist_items(paths, val, test, extra, left_out, columns.age_group_names(routed.age_bounds)))
        group_cols = {lm.meta.get("group_column") for lm in routed.groups.values()} - {None}
        result["conclusion"] = report.answer(result, ", ".join(sorted(map(str, group_cols))) or None)
        written = write_outputs(args, paths, result, test, extra, routed, info.device, t0)
    report.print_summary(result)
    for k in ("test_predictions", "metrics", "thresholds", "calibration", "report"):
        print(f"wrote {written[k]}")
    print(f"wrote {len(written['figures'])} figures to {paths['report_dir']}")
    return written


def predictions_frame(args: argparse.Namespace, test: Split, thr: Mapping[str, float | np.ndarray],
                      calibrated: SplitOutputs, routed: inference.RoutedModels) -> pd.DataFrame:
    """test_predictions.csv: per test image its true and predicted age group, and every
    system's probability (raw and calibrated), threshold and decision."""
    pred_group = test.inf["age_probs"].argmax(1)
    frame = test.df.reset_index(drop=True).copy()
    frame["age_group"] = test.true_group
    frame["age_group_label"] = pred_group
    for g in range(routed.n_groups):
        frame[f"age_group_prob_{g}"] = test.inf["age_probs"][:, g]
    frame["routed_model"] = [routed.model_for_group(int(g)).name for g in pred_group]
    for s in thr:
        prob = test.out.prob[base_system(s)]
        if s in test.out.prob:
            frame[f"prob_{s}"] = prob
            frame[f"prob_{s}_calibrated"] = calibrated.prob[s]
        frame[f"pred_{s}"] = (prob >= thr[s]).astype(int)
        frame[f"threshold_{s}"] = thr[s]
    frame["routing"] = args.routing
    frame["fracture_prob"] = test.out.prob[args.routing]
    frame["fracture_pred"] = frame[f"pred_{args.routing}"]
    frame["threshold"] = thr[args.routing]
    return frame


def write_outputs(args: argparse.Namespace, paths: Mapping[str, Path], result: dict[str, Any], test: Split,
                  extra: Mapping[str, Any], routed: inference.RoutedModels, device: torch.device,
                  t0: float) -> dict[str, Any]:
    """test_predictions.csv, thresholds.json, the figures, report.md, metrics.json."""
    run, thr = columns.RunDir(paths["out"]), extra["thresholds"]
    written: dict[str, Any] = {"test_predictions": write_csv(
        predictions_frame(args, test, thr, extra["calibrated"], routed), run.predictions_csv)}
    written["thresholds"] = write_json({
        "thresholds": result["thresholds"], "method": result["threshold_method"], "val_csv": str(paths["val_csv"]),
        "models": inference.weights_by_file(inference.loaded_models(routed)), "note": "chosen on validation by evaluate.py; read by predict.py"},
        paths["models_dir"] / columns.THRESHOLDS_JSON)
    written["calibration"] = write_json(calibration_file(calibration.calibration_params(result["calibration"]), routed),
                                        paths["models_dir"] / columns.CALIBRATION_JSON)
    report_dir = paths["report_dir"]
    figures = make_figures(report_dir, test.y, test.out, extra["calibrated"], thr, extra["masks"],
                           result["age_classifier"], routed, args.history_pattern)
    try:
        cam = cam_figure(report_dir, test.df, test.y, test.out.prob["hard"], thr["hard"],
                         test.inf["age_probs"].argmax(1), test.true_group, routed, device, args.n_cam)
        if cam is not None:
            figures["gradcam"] = cam
    except Exception as exc:  # a failed explanation must not cost the evaluation
        result["notes"].append(f"Grad-CAM figure skipped: {type(exc).__name__}: {exc}")
    figures.update(checklist_figures(report_dir, result, test, extra))
    try:
        cam = error_cam_figure(report_dir, test, result["error_analysis"]["most_confident"], routed, device)
        if cam is not None:
            figures["gradcam_errors"] = cam
    except Exception as exc:  # a failed explanation must not cost the evaluation
        result["notes"].append(f"Grad-CAM of the most confident errors skipped: {type(exc).__name__}: {exc}")
    result["wall_time_s"] = time.perf_counter() - t0
    written["report"] = report.write_report(report_dir, result, figures)
    written["figures"] = list(figures.values())
    save_config(result["config"], report_dir / (SCRIPT + columns.CONFIG_SUFFIX))
    result["wall_time_s"] = time.perf_counter() - t0
    written["metrics"] = write_json(result, run.metrics_json)
    written["summary"] = to_jsonable(nan_as_none=True, obj={
        s: {k: [r["overall"][k], *r["overall"]["ci"].get(k, [None, None])]
            for k in ("auroc", "f1", "sensitivity", "specificity")}
        for s, r in result["systems"].items()})
    written["conclusion"] = result["conclusion"]
    written["wall_time_s"] = result["wall_time_s"]
    if args.result_json:
        write_json(written, args.result_json)
    return written


if __name__ == "__main__":
    errors.run(main, get_args_parser())
