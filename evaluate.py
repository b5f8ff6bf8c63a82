"""Stage 5: evaluate the age-routed fracture system on the fixed test set.

Four systems are scored side by side on ``age_test.csv``:

  (a) hard    the age classifier's predicted group picks the group's fracture model (the design)
  (b) soft    the group models' probabilities weighted by the age classifier's probabilities
  (c) oracle  the true age group picks the model: what routing would give with a perfect
              age classifier, so (c) - (a) is the price of routing errors
  (d) pooled  one fracture model trained on all ages (``train_fracture_per_agegroup.py --pooled``)

Each system's operating threshold is chosen on the VALIDATION CSV (Youden's J, or the
highest threshold reaching ``--target-sensitivity``) and applied unchanged to the test set.
Metrics (accuracy, F1, sensitivity, specificity, PPV, NPV, AUROC, AUPRC, Brier, confusion
matrix) are reported overall, per TRUE age group and with/without a cast (the known
shortcut), each with a 95 % confidence interval from a bootstrap that resamples patients.
Differences between systems use paired resamples. A group without its own model (skipped in
training as too small) is served by the pooled model, and the report says so.

Inputs (all derived from --out-dir unless given)
  <out>/age_test.csv, <out>/age_val_tmp.csv
  <out>/saved_agegroup_models/{age_classifier, fracture_classifier_agegroup{0,1,2},
                               fracture_classifier_pooled}.pt  (+ <stem>_metrics.csv beside)
Outputs
  <out>/test_predictions.csv   per test image: true/predicted age group, every system's
                               fracture probability, label and threshold
  <out>/metrics.json           every number, for machines (NaN written as null)
  <models-dir>/thresholds.json the validation thresholds, read by predict.py
  <out>/report/report.md       tables + figures (ROC, confusion matrices, training curves,
                               calibration, Grad-CAM) as PNG beside it

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
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

import errors
import columns
import distributed
import engine
import metrics as M
import inference as P
import report as R
import unified_dataset as ud
from config import print_config, save_config, to_dict, versions
from io_utils import write_csv, write_json, write_text
import presets
from presets import AMP_MODES

SYSTEMS: dict[str, str] = {
    "hard": "(a) routed by predicted age group (hard)",
    "soft": "(b) soft routing (group models weighted by age probabilities)",
    "oracle": "(c) routed by true age group (oracle)",
    "pooled": "(d) one pooled model",
}
TABLE_METRICS = ("auroc", "auprc", "f1", "sensitivity", "specificity", "ppv", "npv", "accuracy")


# --------------------------------------------------------------------------- pieces
def threshold_from_validation(
    val_y: Sequence[int], val_prob: Sequence[float], test_y: Sequence[int],
    test_prob: Sequence[float], method: str = "youden", target_sensitivity: float = 0.95,
) -> tuple[float, dict[str, Any]]:
    """Choose the threshold on validation data; return it and the test metrics at it."""
    thr = M.choose_threshold(val_y, val_prob, method, target_sensitivity)
    return thr, M.binary_metrics(test_y, test_prob, thr)


def find_history(ckpt: Path, pattern: str = "{stem}_metrics.csv") -> Path | None:
    """The per-epoch metrics CSV beside checkpoint ``ckpt`` (``pattern`` may glob)."""
    hits = sorted(ckpt.parent.glob(pattern.format(stem=ckpt.stem)), key=lambda p: len(p.name))
    return hits[0] if hits else None


def infer(routed: P.RoutedModels, df: pd.DataFrame, device: torch.device, tta: bool = False,
          **loader_kw: Any) -> dict[str, np.ndarray | None]:
    """Age probabilities, every group's fracture probabilities and the pooled model's."""
    age_probs = P.model_probs(routed.age, df, device, tta, **loader_kw)
    group = P.all_group_probs(routed, df, device, tta, **loader_kw)
    pooled = None
    if routed.pooled is not None:
        served = [g for g in range(routed.n_groups) if routed.model_for_group(g) is routed.pooled]
        pooled = (group[:, served[0]].copy() if served
                  else P.model_probs(routed.pooled, df, device, tta, **loader_kw))
    return {"age_probs": age_probs, "group_probs": group, "pooled": pooled}


def system_probs(inf: Mapping[str, Any], true_group: np.ndarray) -> dict[str, np.ndarray]:
    """Fracture probability of each system from :func:`infer`'s output."""
    out = {m: P.combine_routes(inf["age_probs"], inf["group_probs"], m, true_group)[0]
           for m in ("hard", "soft", "oracle")}
    if inf["pooled"] is not None:
        out["pooled"] = np.asarray(inf["pooled"], float)
    return out


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


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _pm(x: float) -> str:
    return f"{x:+.3f}"


def conclusion(comparisons: Mapping[str, Any], systems: Mapping[str, Any],
               age: Mapping[str, Any], misrouted: Mapping[str, Any], n_boot: int,
               group_column: str | None = None) -> str:
    """Plain-language answer: did routing help, and what do routing errors cost."""
    parts = []
    hp = comparisons.get("hard_minus_pooled")
    if hp is None:
        parts.append("No pooled model was found, so routing cannot be compared with one model.")
    else:
        d = hp["auroc"]
        a, p = systems["hard"]["overall"], systems["pooled"]["overall"]
        head = (f"hard-routed AUROC {R.fmt_ci(a['auroc'], a['ci'].get('auroc'))} vs pooled "
                f"{R.fmt_ci(p['auroc'], p['ci'].get('auroc'))}; difference {_pm(d['diff'])} "
                f"(95% CI {_pm(d['lo'])} to {_pm(d['hi'])}, paired patient bootstrap, "
                f"{n_boot} resamples)")
        if d["lo"] > 0:
            parts.append(f"Routing helped: {head}.")
        elif d["hi"] < 0:
            parts.append(f"Routing hurt: {head}.")
        else:
            parts.append(f"No evidence that routing helped: {head}; the interval includes 0.")
        f = hp["f1"]
        parts.append(f"At the validation thresholds, F1 differs by {_pm(f['diff'])} "
                     f"(95% CI {_pm(f['lo'])} to {_pm(f['hi'])}).")
        sp = comparisons.get("soft_minus_pooled")
        if sp is not None:
            parts.append(f"Soft routing vs pooled: AUROC {_pm(sp['auroc']['diff'])} "
                         f"(95% CI {_pm(sp['auroc']['lo'])} to {_pm(sp['auroc']['hi'])}).")
    oh = comparisons["oracle_minus_hard"]
    d = oh["auroc"]
    parts.append(
        f"Routing errors: the age classifier sends {misrouted['n']} of {misrouted['n_total']} "
        f"test images ({100 * misrouted['fraction']:.1f}%) to another group's model (test "
        f"macro-F1 {age['macro_f1']:.3f}). Routing by the true group instead (oracle minus "
        f"hard): AUROC {_pm(d['diff'])} (95% CI {_pm(d['lo'])} to {_pm(d['hi'])}), F1 "
        f"{_pm(oh['f1']['diff'])} (95% CI {_pm(oh['f1']['lo'])} to {_pm(oh['f1']['hi'])}).")
    if d["lo"] > 0:
        parts.append(f"By AUROC, the routing errors cost about {d['diff']:.3f}.")
    elif d["hi"] < 0 and group_column in (None, "age_group_label"):
        parts.append("By AUROC the oracle is worse: the group models were trained on the images the age "
                     "classifier routed to them (age_group_label), so they fit its routing "
                     "better than the true groups.")
    elif d["hi"] < 0:
        parts.append(f"By AUROC the oracle is worse than hard routing (group models trained on "
                     f"{group_column}).")
    else:
        parts.append("By AUROC, the routing errors have no measurable cost at this test-set size "
                     "(threshold metrics such as F1 also depend on how well each system's "
                     "validation threshold transfers).")
    return " ".join(parts)


# --------------------------------------------------------------------------- report
def _metric_rows(systems: Mapping[str, Any], subset: str) -> list[dict[str, str]]:
    rows = []
    for s, res in systems.items():
        m = res[subset]
        row = {"system": SYSTEMS.get(s, s), "n": f"{m['n']} ({m['n_patients']} pat.)",
               "threshold": f"{res['threshold']:.3f}"}
        row.update({k: R.fmt_ci(m[k], m["ci"].get(k)) for k in TABLE_METRICS})
        rows.append(row)
    return rows


def _subset_rows(systems: Mapping[str, Any], keys: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for sub in keys:
        for s, res in systems.items():
            m = res[sub]
            rows.append({"subset": sub, "system": s, "n": m["n"],
                         "fracture rate": f"{m['prevalence']:.2f}" if m["n"] else "n/a",
                         **{k: R.fmt_ci(m[k], m["ci"].get(k))
                            for k in ("auroc", "f1", "sensitivity", "specificity")}})
    return rows


def _comparison_rows(comparisons: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, comp in comparisons.items():
        for k in ("auroc", "auprc", "f1", "sensitivity", "specificity"):
            c = comp[k]
            rows.append({"comparison": name.replace("_minus_", " - "), "metric": k,
                         "difference": _pm(c["diff"]) if np.isfinite(c["diff"]) else "n/a",
                         "95% CI": (f"{_pm(c['lo'])} to {_pm(c['hi'])}"
                                    if np.isfinite(c["lo"]) else "n/a")})
    return rows


def write_report(report_dir: Path, result: Mapping[str, Any], figures: Mapping[str, Path]) -> Path:
    """report.md: the answer, tables, and links to the figures."""
    sysres = result["systems"]
    age = result["age_classifier"]
    names = age["names"]
    lines = [
        "# Evaluation: age-routed fracture detection on the fixed test set", "",
        "## Answer", "", result["conclusion"], "",
        f"Test set: `{result['inputs']['test_csv']}`: {result['n_test_images']} images of "
        f"{result['n_test_patients']} patients, fracture rate {result['test_prevalence']:.2f}. "
        f"Thresholds chosen on `{result['inputs']['val_csv']}` "
        f"({result['threshold_method']}) and applied unchanged to test. 95% CIs: percentile "
        f"bootstrap over patients, {result['n_boot']} resamples, seed {result['seed']}. "
        f"Evaluation wall time {result['wall_time_s']:.1f} s on {result['device']}.", "",
    ]
    if result["notes"]:
        lines += ["**Notes:**", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += ["## Fracture detection, whole test set", "",
              R.markdown_table(_metric_rows(sysres, "overall")),
              "## By true age group and by cast", "",
              "A group's numbers come from the images whose TRUE age is in that group, whichever "
              "model the system sent them to. Cast images are an easy shortcut (a cast goes with "
              "a fracture most of the time), so the no-cast rows are the harder test.", "",
              R.markdown_table(_subset_rows(sysres, [k for k in result["subsets"] if k != "overall"])),
              "## Paired differences (same patient resamples)", "",
              R.markdown_table(_comparison_rows(result["comparisons"])),
              "## Age-group classifier (router) on the test set", "",
              f"Accuracy {age['accuracy']:.3f}, macro-F1 "
              f"{R.fmt_ci(age['macro_f1'], age.get('macro_f1_ci'))}, balanced accuracy "
              f"{age['balanced_accuracy']:.3f}. Rows: true group; columns: predicted group.", ""]
    cm = pd.DataFrame(age["confusion_matrix"], columns=[f"pred {n}" for n in names])
    cm.insert(0, "true", names)
    lines.append(R.markdown_table(cm))
    rep = age["classification_report"]
    lines.append(R.markdown_table([
        {"group": n, "precision": rep[n]["precision"], "recall": rep[n]["recall"],
         "f1": rep[n]["f1-score"], "support": int(rep[n]["support"])} for n in names]))
    mis = result["misrouted"]
    lines += [f"Misrouted test images: {mis['n']} of {mis['n_total']}.", ""]
    if mis.get("metrics"):
        lines.append(R.markdown_table([
            {"system on misrouted images": s, "n": v["n"], "accuracy": v["accuracy"],
             "auroc": v["auroc"]} for s, v in mis["metrics"].items()]))
    lines += ["## Thresholds (chosen on validation)", "",
              R.markdown_table([{"system": s, "threshold": f"{t['value']:.4f}",
                                 "val sensitivity": t["val_metrics"]["sensitivity"],
                                 "val specificity": t["val_metrics"]["specificity"],
                                 "val AUROC": t["val_metrics"]["auroc"]}
                                for s, t in result["thresholds"].items()]),
              "## Figures", ""]
    captions = {
        "roc": "ROC curves, overall and per true age group (dots: validation threshold)",
        "roc_cast": "ROC curves with and without a cast",
        "confusion": "Fracture confusion matrices at the validation thresholds",
        "age_confusion": "Age-group classifier confusion matrix",
        "calibration": "Calibration (reliability) of the fracture probabilities",
        "training": "Training curves from each model's per-epoch metrics CSV",
        "gradcam": "Grad-CAM of the hard-routed fracture model on test images",
    }
    for key, path in figures.items():
        lines += [f"### {captions.get(key, key)}", "", R.figure_link(path, report_dir, key), ""]
    lines += ["## Models", "", R.markdown_table([
        {"role": role, "file": info["path"], "model": info["model_name"], "img_size": info["img_size"],
         "epoch": info["epoch"]} for role, info in result["models"].items()])]
    return write_text("\n".join(lines), report_dir / "report.md")


def make_figures(report_dir: Path, y: np.ndarray, sys_probs: Mapping[str, np.ndarray],
                 thresholds: Mapping[str, float], masks: Mapping[str, np.ndarray],
                 age_summary: Mapping[str, Any], routed: P.RoutedModels,
                 history_pattern: str) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    shown = [s for s in ("hard", "soft", "oracle", "pooled") if s in sys_probs]
    panel_keys = [k for k in masks if k == "overall" or k.startswith("age ")]
    panels = {k: {s: (y[masks[k]], sys_probs[s][masks[k]], thresholds[s]) for s in shown}
              for k in panel_keys}
    figs["roc"] = R.plot_roc_panels(panels, report_dir / "roc_by_age_group.png",
                                    "Test ROC: overall and per true age group")
    if "cast" in masks:
        cast_panels = {k: {s: (y[masks[k]], sys_probs[s][masks[k]], thresholds[s]) for s in shown}
                       for k in ("cast", "no cast")}
        figs["roc_cast"] = R.plot_roc_panels(cast_panels, report_dir / "roc_cast.png",
                                             "Test ROC with and without a cast")
    cms = {SYSTEMS[s].split(" ", 1)[0] + " " + s:
           M.binary_metrics(y, sys_probs[s], thresholds[s])["confusion_matrix"] for s in shown}
    figs["confusion"] = R.plot_confusion_matrices(
        cms, report_dir / "confusion_fracture.png", ("no fracture", "fracture"),
        "Fracture, test set, at the validation threshold")
    figs["age_confusion"] = R.plot_confusion_matrices(
        {"age-group classifier (test)": age_summary["confusion_matrix"]},
        report_dir / "confusion_age.png", age_summary["names"])
    figs["calibration"] = R.plot_calibration({s: (y, sys_probs[s]) for s in shown},
                                             report_dir / "calibration.png")
    histories = {}
    for lm in [routed.age, *routed.groups.values(), routed.pooled]:
        if lm is not None and lm.path is not None:
            h = find_history(lm.path, history_pattern)
            if h is not None:
                histories[lm.path.stem] = h
    if histories:
        figs["training"] = R.plot_training_curves(histories, report_dir / "training_curves.png")
    return figs


def cam_figure(report_dir: Path, df: pd.DataFrame, y: np.ndarray, prob: np.ndarray,
               thr: float, pred_group: np.ndarray, true_group: np.ndarray,
               routed: P.RoutedModels, device: torch.device, n: int) -> Path | None:
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
        (img, cam), = P.cam_examples(lm, df.iloc[[i]], device)
        items.append({"image": img, "cam": cam,
                      "caption": f"{kind}: label {int(y[i])}, age {df['age'].iloc[i]:.1f} y "
                                 f"({names[true_group[i]]})\nmodel {lm.name}, {img.shape[1]}x{img.shape[0]} px",
                      "overlay": f"predicted age group {names[pred_group[i]]}\n"
                                 f"fracture p {prob[i]:.2f}, threshold {thr:.2f}"})
    return R.plot_cam_grid(items, report_dir / "gradcam_examples.png",
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
    p.add_argument("--routing", choices=P.ROUTINGS, default="hard",
                   help="system whose output fills fracture_prob/fracture_pred in the CSV")
    p.add_argument("--threshold-method", choices=("youden", "sensitivity"), default="youden")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="choose the highest threshold with this validation sensitivity "
                        "(implies --threshold-method sensitivity)")
    p.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level")
    p.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--n-cam", type=int, default=6, help="Grad-CAM examples in the report (0: none)")
    p.add_argument("--history-pattern", default="{stem}_metrics.csv",
                   help="per-epoch metrics CSV beside each checkpoint ({stem}: checkpoint stem)")
    p.add_argument("--cache-dir", default=None,
                   help="decoded-image cache shared with the trainers (default: "
                        "<out-dir>/image.cache)")
    p.add_argument("--no-cache", action="store_true", help="decode every image (no cache)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun, cuda means each rank's local GPU)")
    p.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="mixed-precision inference (auto: bf16 on CUDA, off on the CPU)")
    p.add_argument("--result-json", type=Path, default=None,
                   help="also write the returned summary as JSON (used by run_all_training.py)")
    presets.add_split_args(p, "evaluate")
    return p


def _paths(args: argparse.Namespace) -> dict[str, Path]:
    out = Path(args.out_dir)
    return {
        "out": out,
        "test_csv": Path(args.test_csv) if args.test_csv else out / "age_test.csv",
        "val_csv": Path(args.val_csv) if args.val_csv else out / "age_val_tmp.csv",
        "models_dir": Path(args.models_dir) if args.models_dir else out / "saved_agegroup_models",
        "report_dir": Path(args.report_dir) if args.report_dir else out / "report",
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns the written files and a summary on rank 0 (and in a single
    process), an empty dict on the other torchrun ranks."""
    t0 = time.perf_counter()
    paths = _paths(args)
    method = "sensitivity" if args.target_sensitivity is not None else args.threshold_method
    target = args.target_sensitivity if args.target_sensitivity is not None else 0.95
    cfg = to_dict(args)
    with distributed.session(args.device, paths["out"]) as info:
        if info.is_main:
            print_config(cfg, "evaluate")
        device = info.device
        test_df = ud.read_split_csv(paths["test_csv"])
        val_df = ud.read_split_csv(paths["val_csv"])
        routed = P.load_routed_models(paths["models_dir"], device)
        notes = list(routed.notes)
        if routed.pooled is None:
            notes.append("no fracture_classifier_pooled.pt: the pooled baseline (d) is missing")
        bounds = routed.age_bounds
        names = columns.age_group_names(bounds)
        cache = None if args.no_cache else (args.cache_dir or paths["out"] / "image.cache")
        amp = engine.resolve_amp(args.amp, device)
        infer_kw = dict(batch_size=args.batch_size, num_workers=args.workers, cache_dir=cache, amp=amp)
        # every image decoded (into the cache, at each model's size) before inference: an
        # undecodable one stops here in one line, or with --skip-bad is left out and counted
        sizes = sorted({lm.img_size for lm in (routed.age, *routed.groups.values(), routed.pooled) if lm})
        frames, left_out = {"test": test_df, "val": val_df}, {}
        for split, df in list(frames.items()):
            for size in sizes if cache is not None else sizes[:1]:
                frames[split] = engine.decode_pass(frames[split], size, cache_dir=cache, skip_bad=args.skip_bad,
                                                   rejected_csv=paths["out"] / ud.REJECTED_CSV)
            left_out[split] = len(df) - len(frames[split])
            if left_out[split]:
                notes.append(f"{split}: {left_out[split]} of {len(df)} images could not be decoded and were "
                             f"left out (--skip-bad; listed in {paths['out'] / ud.REJECTED_CSV})")
        test_df, val_df = frames["test"], frames["val"]

        true = {}
        for split, df in (("test", test_df), ("val", val_df)):
            g = np.asarray(columns.age_to_group(df["age"].to_numpy(float), bounds))
            stated = pd.to_numeric(df["age_group"], errors="coerce").to_numpy()
            if (n_diff := int((stated != g).sum())):
                notes.append(f"{split}: age_group in the CSV differs from the age classifier's "
                             f"bounds {bounds} for {n_diff} rows; the bounds were used")
            true[split] = g

        engine.log(f"inference: validation ({len(val_df)} images), test ({len(test_df)} images) "
                   f"on {device} (amp {amp})"
                   + (f", sharded over {info.world_size} processes" if info.distributed else ""))
        inf_val = infer(routed, val_df, device, args.tta, **infer_kw)
        inf_test = infer(routed, test_df, device, args.tta, **infer_kw)
        # The rest (bootstrap, figures, Grad-CAM) is rank 0's alone and may outlast the
        # collective timeout: leave the process group now (barrier first, see
        # distributed.cleanup), so the other ranks exit instead of waiting for rank 0.
        distributed.cleanup()
        if not info.is_main:
            return {}
        val_sys = system_probs(inf_val, true["val"])
        test_sys = system_probs(inf_test, true["test"])
        y_val = val_df["fracture"].to_numpy(int)
        y = test_df["fracture"].to_numpy(int)
        pid = test_df["patient_id"].astype(str).to_numpy()

        thresholds: dict[str, dict[str, Any]] = {}
        for s, pv in val_sys.items():
            try:
                t = M.choose_threshold(y_val, pv, method, target)
            except ValueError as exc:
                t = 0.5
                notes.append(f"{s}: no validation threshold ({exc}); 0.5 used")
            thresholds[s] = {"value": t, "method": method,
                             "target_sensitivity": target if method == "sensitivity" else None,
                             "val_metrics": M.binary_metrics(y_val, pv, t)}
        thr = {s: v["value"] for s, v in thresholds.items()}

        masks = subsets(test_df, true["test"], names)
        print(f"metrics with {args.n_boot} patient-bootstrap resamples ...")
        systems: dict[str, Any] = {}
        for s, prob in test_sys.items():
            systems[s] = {"description": SYSTEMS[s], "threshold": thr[s]}
            for sub, mask in masks.items():
                systems[s][sub] = M.bootstrap_binary_metrics(
                    y[mask], prob[mask], pid[mask], thr[s], args.n_boot, args.seed, args.alpha)

        pairs = [("hard", "pooled"), ("soft", "pooled"), ("soft", "hard"), ("oracle", "hard")]
        comparisons = {}
        for a, b in pairs:
            if a in test_sys and b in test_sys:
                comparisons[f"{a}_minus_{b}"] = M.paired_bootstrap_difference(
                    y, test_sys[a], test_sys[b], pid, thr[a], thr[b], args.n_boot, args.seed,
                    args.alpha)
        by_group = {}
        for sub in [k for k in masks if k.startswith("age ")]:
            mk = masks[sub]
            if "pooled" in test_sys and mk.any():
                by_group[sub] = M.paired_bootstrap_difference(
                    y[mk], test_sys["hard"][mk], test_sys["pooled"][mk], pid[mk], thr["hard"],
                    thr["pooled"], args.n_boot, args.seed, args.alpha)

        pred_group = inf_test["age_probs"].argmax(1)
        age = M.multiclass_summary(true["test"], pred_group, range(len(names)), names)
        age_df = pd.DataFrame({"patient_id": pid, "t": true["test"], "p": pred_group})
        _, lo, hi = M.patient_bootstrap_ci(
            age_df, lambda d: M.macro_f1(d["t"], d["p"], range(len(names))),
            n_boot=args.n_boot, seed=args.seed, alpha=args.alpha)
        age["macro_f1_ci"] = [lo, hi]
        if "age_group_label" in test_df.columns:
            csv_pred = pd.to_numeric(test_df["age_group_label"], errors="coerce").to_numpy()
            age["agreement_with_csv_age_group_label"] = float((csv_pred == pred_group).mean())
            if age["agreement_with_csv_age_group_label"] < 1:
                notes.append("age_group_label in the test CSV (stage 3) differs from this run's "
                             f"age predictions for {int((csv_pred != pred_group).sum())} images; "
                             "this run's predictions were used")
        mis = pred_group != true["test"]
        misrouted = {"n": int(mis.sum()), "n_total": int(len(mis)),
                     "fraction": float(mis.mean()) if len(mis) else 0.0, "metrics": {}}
        if mis.any():
            for s in ("hard", "oracle"):
                m = M.binary_metrics(y[mis], test_sys[s][mis], thr[s])
                misrouted["metrics"][s] = {k: m[k] for k in ("n", "accuracy", "auroc", "f1")}

        group_cols = {lm.meta.get("group_column") or (lm.meta.get("config") or {}).get("group_column")
                      for lm in routed.groups.values()} - {None}
        text = conclusion(comparisons, systems, age, misrouted, args.n_boot,
                          ", ".join(sorted(map(str, group_cols))) or None)

        # ---- files
        pred_df = test_df.reset_index(drop=True).copy()
        pred_df["age_group"] = true["test"]
        pred_df["age_group_label"] = pred_group
        for g in range(len(names)):
            pred_df[f"age_group_prob_{g}"] = inf_test["age_probs"][:, g]
        pred_df["routed_model"] = [routed.model_for_group(int(g)).name for g in pred_group]
        for s, prob in test_sys.items():
            pred_df[f"prob_{s}"] = prob
            pred_df[f"pred_{s}"] = (prob >= thr[s]).astype(int)
            pred_df[f"threshold_{s}"] = thr[s]
        pred_df["routing"] = args.routing
        pred_df["fracture_prob"] = test_sys[args.routing]
        pred_df["fracture_pred"] = pred_df[f"pred_{args.routing}"]
        pred_df["threshold"] = thr[args.routing]
        written = {"test_predictions": write_csv(pred_df, paths["out"] / "test_predictions.csv")}
        written["thresholds"] = write_json(_clean({
            "thresholds": thresholds, "method": method, "val_csv": str(paths["val_csv"]),
            "note": "chosen on validation by evaluate.py; read by predict.py"}),
            paths["models_dir"] / P.THRESHOLDS_FILE)

        report_dir = paths["report_dir"]
        figures = make_figures(report_dir, y, test_sys, thr, masks, age, routed,
                               args.history_pattern)
        try:
            cam = cam_figure(report_dir, test_df, y, test_sys["hard"], thr["hard"], pred_group,
                             true["test"], routed, device, args.n_cam)
            if cam is not None:
                figures["gradcam"] = cam
        except Exception as exc:  # a failed explanation must not cost the evaluation
            notes.append(f"Grad-CAM figure skipped: {type(exc).__name__}: {exc}")

        wall = time.perf_counter() - t0
        result = {
            "inputs": {k: str(v) for k, v in paths.items()},
            "config": cfg, "versions": versions(), "device": str(device),
            "world_size": info.world_size,
            "n_test_images": int(len(test_df)), "n_test_patients": int(pd.Series(pid).nunique()),
            "undecodable_left_out": left_out,
            "test_prevalence": float(y.mean()), "n_val_images": int(len(val_df)),
            "age_bounds": list(bounds), "age_group_names": list(names),
            "threshold_method": method if method == "youden"
            else f"sensitivity >= {target}",
            "n_boot": args.n_boot, "seed": args.seed, "alpha": args.alpha, "tta": args.tta,
            "routing_served_by": routed.served_by(),
            "models": {lm.name: {"path": str(lm.path), "model_name": lm.meta.get("model_name"),
                                 "img_size": lm.img_size, "epoch": lm.meta.get("epoch"),
                                 "train_metrics": lm.meta.get("metrics")}
                       for lm in [routed.age, *routed.groups.values(), routed.pooled] if lm},
            "thresholds": thresholds, "subsets": list(masks), "systems": systems,
            "comparisons": comparisons, "comparisons_by_age_group_hard_minus_pooled": by_group,
            "age_classifier": age, "misrouted": misrouted, "notes": notes,
            "conclusion": text, "wall_time_s": wall,
        }
        written["report"] = write_report(report_dir, result, figures)
        written["figures"] = list(figures.values())
        save_config(cfg, report_dir / "evaluate_config.json")
        result["wall_time_s"] = time.perf_counter() - t0
        written["metrics"] = write_json(_clean(result), paths["out"] / "metrics.json")
        written["summary"] = _clean({
            s: {k: [r["overall"][k], *r["overall"]["ci"].get(k, [None, None])]
                for k in ("auroc", "f1", "sensitivity", "specificity")}
            for s, r in systems.items()})
        written["conclusion"] = text
        written["wall_time_s"] = result["wall_time_s"]
        if args.result_json:
            write_json(_clean(written), args.result_json)

    print_summary(result)
    for k in ("test_predictions", "metrics", "thresholds", "report"):
        print(f"wrote {written[k]}")
    print(f"wrote {len(figures)} figures to {report_dir}")
    return written


def print_summary(result: Mapping[str, Any]) -> None:
    """The side-by-side table, per-group AUROC, the router, and the answer."""
    sysres = result["systems"]
    print("\n== Fracture detection on the test set (95% CI, patient bootstrap) ==")
    rows = [{"system": s, "thr": f"{r['threshold']:.3f}",
             **{k: R.fmt_ci(r["overall"][k], r["overall"]["ci"].get(k))
                for k in ("auroc", "f1", "sensitivity", "specificity")}}
            for s, r in sysres.items()]
    print(R.text_table(rows))
    print("\n== AUROC by true age group / cast ==")
    subs = [k for k in result["subsets"] if k != "overall"]
    rows = [{"system": s, **{k: R.fmt_ci(r[k]["auroc"], r[k]["ci"].get("auroc")) for k in subs}}
            for s, r in sysres.items()]
    print(R.text_table(rows))
    age = result["age_classifier"]
    print(f"\nage classifier (test): accuracy {age['accuracy']:.3f}, macro-F1 "
          f"{R.fmt_ci(age['macro_f1'], age.get('macro_f1_ci'))}; confusion (rows true): "
          f"{age['confusion_matrix']}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\n{result['conclusion']}")
    print(f"evaluation wall time: {result['wall_time_s']:.1f} s")


if __name__ == "__main__":
    errors.run(main, get_args_parser())
