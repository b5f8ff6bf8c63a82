"""Stage 5: evaluate the age-routed fracture system on the fixed test set.

Systems scored side by side on ``age_test.csv`` (their table and the subsets they are scored
on: systems.py):

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

import calibration
import cohort
import columns
import conclusion
import config
import distributed
import engine
import environment
import errors
import evidence
import figures
import inference
import io_utils
import metrics
import presets
import recalibration
import report
import scoring
import splits
import systems
import tables

N_CONFIDENT_ERRORS = 10
SCRIPT = "evaluate"


# --------------------------------------------------------------------------- inference
def infer(routed: inference.RoutedModels, df: pd.DataFrame, device: torch.device, tta: bool = False,
          **loader_kw: Any) -> dict[str, np.ndarray | None]:
    """Age probabilities, every group's fracture probabilities and the pooled models'."""
    out = {"age_probs": inference.model_probs(routed.age, df, device, tta, **loader_kw),
           "group_probs": inference.all_group_probs(routed, df, device, tta, **loader_kw)}
    for key in systems.POOLED_MODELS:
        lm = getattr(routed, key)
        # a pooled model that serves a group has already run as that group's model
        served = [g for g in range(routed.n_groups) if lm is not None and routed.model_for_group(g) is lm]
        out[key] = (None if lm is None else out["group_probs"][:, served[0]].copy() if served
                    else inference.model_probs(lm, df, device, tta, **loader_kw))
    return out


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
        pooled = {key: load(key, getattr(routed, key)) for key in systems.POOLED_MODELS}
        found.append((seed, replace(routed, groups=groups, **pooled)))
    return found


def infer_seed(routed: inference.RoutedModels, first: inference.RoutedModels, df: pd.DataFrame,
               device: torch.device, tta: bool, **loader_kw: Any) -> dict[str, np.ndarray]:
    """A further seed's fracture probabilities: its group models, and its pooled models where
    they are its own (the age classifier and a shared pooled start are the first seed's)."""
    out = {"group_probs": inference.all_group_probs(routed, df, device, tta, **loader_kw)}
    for key in systems.POOLED_MODELS:
        lm = getattr(routed, key)
        if lm is not None and lm is not getattr(first, key):
            out[key] = inference.model_probs(lm, df, device, tta, **loader_kw)
    return out


@dataclass
class Evaluation:
    """What one evaluation runs with: its flags, paths, models, device and start time."""

    args: argparse.Namespace
    paths: dict[str, Path]
    routed: inference.RoutedModels
    device: torch.device
    t0: float


def calibration_file(params: Mapping[str, Any], routed: inference.RoutedModels) -> dict[str, Any]:
    """calibration.json: the parameters and the checkpoint each model key was fitted for."""
    serving = {calibration.AGE_KEY: routed.age, **{f"agegroup{g}": routed.model_for_group(g)
                                                   for g in range(routed.n_groups)},
               **{key: getattr(routed, key) for key in systems.POOLED_MODELS}}
    checkpoints = {k: calibration.file_digest(lm.path) for k, lm in serving.items()
                   if lm is not None and lm.path is not None and k in params["models"]}
    return {**params, "checkpoints": checkpoints,
            "note": "fitted on validation by evaluate.py; applied by predict.py (calibration.apply_calibration)"}


# --------------------------------------------------------------------------- routing
def summarise_routing(test: systems.Split, thresholds: Mapping[str, Any], names: Sequence[str],
                      boot: metrics.BootstrapSpec, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The age classifier on test (with a patient-bootstrap CI of macro-F1) and what the
    misrouted images cost."""
    pred_group = test.inf["age_probs"].argmax(1)
    age = metrics.multiclass_summary(test.true_group, pred_group, range(len(names)), names)
    age_df = pd.DataFrame({"patient_id": test.patients, "t": test.true_group, "p": pred_group})
    _, lo, hi = metrics.patient_bootstrap_ci(age_df, lambda d: metrics.macro_f1(d["t"], d["p"], range(len(names))),
                                             n_boot=boot.n_boot, seed=boot.seed, alpha=boot.alpha)
    age["macro_f1_ci"] = [lo, hi]
    if "age_group_label" in test.df.columns:
        csv_pred = pd.to_numeric(test.df["age_group_label"], errors="coerce").to_numpy()
        age["agreement_with_csv_age_group_label"] = float((csv_pred == pred_group).mean())
        if age["agreement_with_csv_age_group_label"] < 1:
            notes.append("age_group_label in the test CSV (stage 3) differs from this run's age predictions "
                         f"for {int((csv_pred != pred_group).sum())} images; this run's predictions were used")
    mis = pred_group != test.true_group
    misrouted = {"n": int(mis.sum()), "n_total": int(len(mis)), "fraction": float(mis.mean()) if len(mis) else 0.0,
                 "metrics": {}}
    if mis.any():
        for s in ("hard", "oracle"):
            m = metrics.binary_metrics(test.y[mis], test.out.prob[s][mis], thresholds[s]["value"])
            misrouted["metrics"][s] = {k: m[k] for k in ("n", "accuracy", "auroc", "f1")}
    return age, misrouted


# --------------------------------------------------------------------------- Grad-CAM figures
def histories(routed: inference.RoutedModels, pattern: str) -> dict[str, Path]:
    """Each model's per-epoch metrics CSV, by checkpoint stem, where one is found."""
    found = {}
    for lm in inference.loaded_models(routed):
        if lm.path is not None:
            h = figures.find_history(lm.path, pattern)
            if h is not None:
                found[lm.path.stem] = h
    return found


def error_cam_figure(ev: Evaluation, test: systems.Split, confident: Sequence[Mapping[str, Any]]) -> Path | None:
    """Grad-CAM of the hard-routed system's most confident errors, each by the model that
    decided it (the predicted group's)."""
    if not confident:
        return None
    pred_group = test.inf["age_probs"].argmax(1)
    items = []
    for e in confident:
        i = e["row"]
        lm = ev.routed.model_for_group(int(pred_group[i]))
        (img, cam), = inference.cam_examples(lm, test.df.iloc[[i]], ev.device)
        items.append({"image": img, "cam": cam,
                      "caption": f"{e['kind']}: patient {e['patient_id']}, study {e['study']}\n"
                                 f"{Path(e['image']).name[:28]}",
                      "overlay": f"p {e['probability']:.2f} (raw {e['raw_probability']:.2f})\n"
                                 f"predicted group {e['predicted_group']}\n"
                                 f"true group {e['true_group']}"})
    return figures.plot_cam_grid(items, ev.paths["report_dir"] / "gradcam_confident_errors.png",
                                 "Grad-CAM, the hard-routed system's most confident errors (test)")


def cam_figure(ev: Evaluation, test: systems.Split, thr: float) -> Path | None:
    """Grad-CAM of the hard-routed model on a mix of TP, FN, FP and TN test images."""
    n, df, y, prob = ev.args.n_cam, test.df, test.y, test.out.prob["hard"]
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
    names = columns.age_group_names(ev.routed.age_bounds)
    pred_group, true_group = test.inf["age_probs"].argmax(1), test.true_group
    items = []
    for i, kind in picked:
        lm = ev.routed.model_for_group(int(pred_group[i]))
        (img, cam), = inference.cam_examples(lm, df.iloc[[i]], ev.device)
        items.append({"image": img, "cam": cam,
                      "caption": f"{kind}: label {int(y[i])}, age {df['age'].iloc[i]:.1f} y "
                                 f"({names[true_group[i]]})\nmodel {lm.name}, {img.shape[1]}x{img.shape[0]} px",
                      "overlay": f"predicted age group {names[pred_group[i]]}\n"
                                 f"fracture p {prob[i]:.2f}, threshold {thr:.2f}"})
    return figures.plot_cam_grid(items, ev.paths["report_dir"] / "gradcam_examples.png",
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
    p.add_argument("--amp", choices=presets.AMP_MODES, default="off",
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


def decode_splits(frames: Mapping[str, pd.DataFrame], routed: inference.RoutedModels, cache: str | Path | None,
                  skip_bad: bool, out: Path, notes: list[str]) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Every image of each split (``frames``: name -> rows) decoded (into the cache, at each
    model's size) before inference: an undecodable one stops here in one line, or with
    ``skip_bad`` is left out, listed in rejected_rows.csv and counted in the notes. The CSVs
    themselves keep every row."""
    sizes = sorted({lm.img_size for lm in inference.loaded_models(routed)})
    decoded, left_out = dict(frames), {}
    rejected = out / columns.REJECTED_CSV
    for split, df in frames.items():
        for size in sizes if cache is not None else sizes[:1]:
            decoded[split] = tables.decode_pass(decoded[split], size, cache_dir=cache, skip_bad=skip_bad,
                                                rejected_csv=rejected)
        left_out[split] = len(df) - len(decoded[split])
        if left_out[split]:
            notes.append(f"{split}: {left_out[split]} of {len(df)} images could not be decoded and were "
                         f"left out (--skip-bad; listed in {rejected})")
    return decoded, left_out


def study_column(df: pd.DataFrame, name: str | None, notes: list[str]) -> str | None:
    if name and name in df.columns:
        return name
    notes.append(f"no {name!r} column: each patient counts as one study")
    return None


def load_and_infer(args: argparse.Namespace, paths: Mapping[str, Path], device: torch.device,
                   distributed_info: str
                   ) -> tuple[inference.RoutedModels, systems.Split, systems.Split, dict[str, int], list[str]]:
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
    frames, left_out = decode_splits({"test": test_df, "val": val_df}, routed, cache, args.skip_bad, paths["out"],
                                     notes)
    test_df, val_df = frames["test"], frames["val"]
    engine.log(f"inference: validation ({len(val_df)} images), test ({len(test_df)} images) on {device} "
               f"(amp {amp}){distributed_info}")
    found = []
    for name, df in (("val", val_df), ("test", test_df)):
        inf = infer(routed, df, device, args.tta, batch_size=args.batch_size, workers=args.workers, cache_dir=cache,
                    amp=amp)
        true = true_groups(df, routed.age_bounds, name, notes)
        found.append(systems.Split(df, df["fracture"].to_numpy(int), true, inf, systems.system_probs(inf, true)))
    test = found[1]
    for seed, seed_models in further_seeds(routed, paths["models_dir"], args.seeds, device, notes):
        loader_kw = {"batch_size": args.batch_size, "workers": args.workers, "cache_dir": cache, "amp": amp}
        inf = {**test.inf, **infer_seed(seed_models, routed, test.df, device, args.tta, **loader_kw)}
        test.seeds.append((seed, systems.system_probs(inf, test.true_group)))
    return routed, found[0], test, left_out, notes


def checklist_items(paths: Mapping[str, Path], val: systems.Split, test: systems.Split, rows: scoring.PerRow,
                    left_out: Mapping[str, int], names: Sequence[str]) -> dict[str, Any]:
    """The reporting-checklist sections of metrics.json: patient flow, Table 1 per partition,
    net benefit (decision curve, on the calibrated probabilities) and the error analysis of
    the hard-routed system at its validation threshold."""
    run = columns.RunDir(paths["out"])
    calibrated, thresholds = rows.calibrated, rows.thresholds
    frames = {"test": test.df.assign(age_group=test.true_group), "val": val.df.assign(age_group=val.true_group)}
    if run.train_csv.is_file():
        frames["train"] = tables.read_split_csv(run.train_csv, validate=False)
    shown = [s for s in systems.UTILITY_SYSTEMS if s in calibrated.prob]
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


def score(args: argparse.Namespace, routed: inference.RoutedModels, val: systems.Split, test: systems.Split,
          notes: list[str]) -> tuple[dict[str, Any], scoring.PerRow]:
    """Every number of the evaluation (the ``metrics.json`` sections), and what the output
    files need besides (per-row thresholds, subsets, calibrated probabilities)."""
    if args.target_sensitivity is not None:
        rule = metrics.ThresholdRule("sensitivity", args.target_sensitivity)
    else:
        rule = metrics.ThresholdRule(args.threshold_method)
    boot = metrics.BootstrapSpec(args.n_boot, args.seed, args.alpha)
    names = columns.age_group_names(routed.age_bounds)
    chosen = scoring.choose_thresholds(val.y, val.out, routed.n_groups, rule, notes)
    thr = scoring.row_thresholds(chosen, test.out)
    budgets = evidence.system_budgets(routed)
    reference, budget_why = evidence.equal_budget_reference(budgets)
    subsets = systems.build_subsets(systems.TestRows(test.df, test.true_group, names), test.y)
    notes += [f"subset {s.name}: {s.too_small}, so it is listed, not scored" for s in subsets
              if s.spec.full and s.too_small]
    masks = systems.full_masks(subsets)
    print(f"metrics with {args.n_boot} patient-bootstrap resamples ...")
    pairs = systems.comparison_pairs(reference)
    settings = scoring.Settings(rule, boot, routed.n_groups, study_column(test.df, args.study_col, notes), reference)
    calib, calibrated, by_method = recalibration.calibrate(val, test, routed)
    age, misrouted = summarise_routing(test, chosen, names, boot, notes)
    data = scoring.Labelled(test.y, test.out, test.patients)
    result = {
        "threshold_method": rule.method if rule.method == "youden" else f"sensitivity >= {rule.target_sensitivity}",
        "budgets": budgets,
        "equal_budget": {"reference": reference, "differences": budget_why,
                         "images_tolerance": evidence.IMAGES_TOLERANCE},
        "thresholds": chosen, "subsets": list(masks),
        "systems": scoring.score_systems(data, thr, masks, boot),
        "comparisons": scoring.compare_systems(data, thr, pairs, boot),
        "comparisons_by_age_group": {
            s.name: scoring.compare_systems(data, thr, pairs[:1], boot, mask=s.mask)
            for s in subsets if s.spec.compare and s.name in masks and s.mask.any()},
        "study_level": scoring.score_studies(val, test, settings, notes),
        "subgroups": scoring.score_subgroups(data, subsets, boot),
        "calibration": calib, "age_classifier": age, "misrouted": misrouted,
    }
    if reference:
        first = training_seed(routed)
        runs = [evidence.SeedSystems(first if first is not None else 0, test.out.prob["hard"],
                                     test.out.prob[reference])]
        runs += [evidence.SeedSystems(seed, out.prob["hard"], out.prob[reference]) for seed, out in test.seeds]
        result["seeds"] = {"reference": reference, **evidence.across_seeds(test.y, test.patients, runs, boot)}
    return result, scoring.PerRow(thresholds=thr, subsets=subsets, calibrated=calibrated, by_method=by_method)


def describe_run(ev: Evaluation, val: systems.Split, test: systems.Split, world_size: int) -> dict[str, Any]:
    """What was evaluated, how, and with which models (the head of ``metrics.json``)."""
    args, routed = ev.args, ev.routed
    return {
        "inputs": {k: str(v) for k, v in ev.paths.items()}, "config": config.to_dict(args),
        "environment": environment.describe(),
        "device": str(ev.device), "world_size": world_size,
        "n_test_images": int(len(test.df)), "n_test_patients": int(pd.unique(test.patients).size),
        "test_prevalence": float(test.y.mean()), "n_val_images": int(len(val.df)),
        "age_bounds": list(routed.age_bounds), "age_group_names": list(columns.age_group_names(routed.age_bounds)),
        "n_boot": args.n_boot, "seed": args.seed, "alpha": args.alpha, "tta": args.tta,
        "routing_served_by": routed.served_by(),
        "models": {lm.name: {"path": str(lm.path), "model_name": lm.meta.get("model_name"), "img_size": lm.img_size,
                             "epoch": lm.meta.get("epoch"), "train_metrics": lm.meta.get("metrics"),
                             "budget": evidence.model_budget(lm)}
                   for lm in inference.loaded_models(routed)},
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns the written files and a summary on rank 0 (and in a single
    process), an empty dict on the other torchrun ranks."""
    t0 = time.perf_counter()
    paths = _paths(args)
    with distributed.session(args.device, paths["out"]) as info:
        if info.is_main:
            config.print_config(config.to_dict(args), SCRIPT)
        sharded = f", sharded over {info.world_size} processes" if info.distributed else ""
        routed, val, test, left_out, notes = load_and_infer(args, paths, info.device, sharded)
        # The rest (bootstrap, figures, Grad-CAM) is rank 0's alone and may outlast the
        # collective timeout: leave the process group now (barrier first, see
        # distributed.cleanup), so the other ranks exit instead of waiting for rank 0.
        distributed.cleanup()
        if not info.is_main:
            return {}
        ev = Evaluation(args, paths, routed, info.device, t0)
        scores, rows = score(args, routed, val, test, notes)
        result = {**describe_run(ev, val, test, info.world_size), "undecodable_left_out": left_out, **scores,
                  "notes": notes}
        result.update(checklist_items(paths, val, test, rows, left_out, columns.age_group_names(routed.age_bounds)))
        group_cols = {lm.meta.get("group_column") for lm in routed.groups.values()} - {None}
        result["conclusion"] = conclusion.answer(result, ", ".join(sorted(map(str, group_cols))) or None)
        summary = conclusion.summary_answer(result)
        written = write_outputs(ev, result, test, rows, summary)
    report.print_summary(result, summary)
    for k in ("test_predictions", "metrics", "thresholds", "calibration", "report"):
        print(f"wrote {written[k]}")
    print(f"wrote {len(written['figures'])} figures to {paths['report_dir']}")
    return written


def predictions_frame(args: argparse.Namespace, test: systems.Split, thr: Mapping[str, float | np.ndarray],
                      calibrated: systems.SplitOutputs, routed: inference.RoutedModels) -> pd.DataFrame:
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
        prob = test.out.prob[systems.base_system(s)]
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


def write_outputs(ev: Evaluation, result: dict[str, Any], test: systems.Split, rows: scoring.PerRow,
                  summary: str) -> dict[str, Any]:
    """test_predictions.csv, thresholds.json, calibration.json, the figures, report.md (with
    the short Answer ``summary``), metrics.json."""
    args, paths, routed = ev.args, ev.paths, ev.routed
    run, thr = columns.RunDir(paths["out"]), rows.thresholds
    written: dict[str, Any] = {"test_predictions": io_utils.write_csv(
        predictions_frame(args, test, thr, rows.calibrated, routed), run.predictions_csv)}
    written["thresholds"] = io_utils.write_json({
        "thresholds": result["thresholds"], "method": result["threshold_method"], "val_csv": str(paths["val_csv"]),
        "models": inference.weights_by_file(inference.loaded_models(routed)),
        "note": "chosen on validation by evaluate.py; read by predict.py"},
        paths["models_dir"] / columns.THRESHOLDS_JSON)
    params = calibration.calibration_params(result["calibration"])
    written["calibration"] = io_utils.write_json(calibration_file(params, routed),
                                                 paths["models_dir"] / columns.CALIBRATION_JSON)
    report_dir = paths["report_dir"]
    figs = figures.make_figures(report_dir, test, rows, result["age_classifier"],
                                histories(routed, args.history_pattern))
    try:
        cam = cam_figure(ev, test, thr["hard"])
        if cam is not None:
            figs["gradcam"] = cam
    except Exception as exc:  # a failed explanation must not cost the evaluation
        result["notes"].append(f"Grad-CAM figure skipped: {type(exc).__name__}: {exc}")
    figs.update(figures.checklist_figures(report_dir, result, test, rows))
    try:
        cam = error_cam_figure(ev, test, result["error_analysis"]["most_confident"])
        if cam is not None:
            figs["gradcam_errors"] = cam
    except Exception as exc:  # a failed explanation must not cost the evaluation
        result["notes"].append(f"Grad-CAM of the most confident errors skipped: {type(exc).__name__}: {exc}")
    result["wall_time_s"] = time.perf_counter() - ev.t0
    written["report"] = report.write_report(report_dir, result, summary, figs)
    written["figures"] = list(figs.values())
    config.save_config(result["config"], report_dir / (SCRIPT + columns.CONFIG_SUFFIX))
    result["wall_time_s"] = time.perf_counter() - ev.t0
    written["metrics"] = io_utils.write_json(result, run.metrics_json)
    written["summary"] = io_utils.to_jsonable(nan_as_none=True, obj={
        s: {k: [r["overall"][k], *r["overall"]["ci"].get(k, [None, None])]
            for k in ("auroc", "f1", "sensitivity", "specificity")}
        for s, r in result["systems"].items()})
    written["conclusion"] = result["conclusion"]
    written["wall_time_s"] = result["wall_time_s"]
    if args.result_json:
        io_utils.write_json(written, args.result_json)
    return written


if __name__ == "__main__":
    errors.run(main, get_args_parser())
