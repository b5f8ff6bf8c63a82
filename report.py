"""The evaluation report: renders ``metrics.json``'s numbers as report.md (tables, the
Answer's text from conclusion.py, links to the figures) and as the terminal summary. It
decides nothing: every number, verdict and sentence of conclusion comes in ``result``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

import columns
import evidence
import io_utils
import systems


# --------------------------------------------------------------------------- Markdown
def fmt_ci(value: float, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    """``0.912 [0.880, 0.940]``; ``n/a`` for NaN."""
    if value is None or not np.isfinite(value):
        return "n/a"
    s = f"{value:.{digits}f}"
    if ci is not None and len(ci) == 2 and all(np.isfinite(ci)):
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def markdown_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]],
                   columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table from a DataFrame or a list of dicts (values via ``str``)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    cols = list(columns) if columns is not None else list(df.columns)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = "n/a" if not np.isfinite(v) else f"{v:.3f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines) + "\n"


def text_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]],
               columns: Sequence[str] | None = None) -> str:
    """The same table aligned for a terminal."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    cols = list(columns) if columns is not None else list(df.columns)
    cells = [[str(c) for c in cols]] + [[str(r[c]) for c in cols] for _, r in df.iterrows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def figure_link(path: str | os.PathLike, report_dir: str | os.PathLike, alt: str) -> str:
    """A Markdown image link relative to the report's directory."""
    rel = os.path.relpath(Path(path), Path(report_dir))
    return f"![{alt}]({Path(rel).as_posix()})"


# --------------------------------------------------------------------------- the report's text
PROJECTIONS = {"1": "1 (AP/PA)", "2": "2 (lateral)", "3": "3 (oblique)"}
TABLE_METRICS = ("auroc", "auprc", "f1", "sensitivity", "specificity", "ppv", "npv", "accuracy")
CAPTIONS = {
    "roc": "ROC curves, overall and per true age group (dots: validation threshold)",
    "roc_cast": "ROC curves with and without a cast",
    "confusion": "Fracture confusion matrices at the validation thresholds",
    "age_confusion": "Age-group classifier confusion matrix",
    "calibration": "Calibration (reliability) of the fracture probabilities, before and after the chosen recalibration",
    "training": "Training curves from each model's per-epoch metrics CSV",
    "gradcam": "Grad-CAM of the hard-routed fracture model on test images",
    "flow": "Patient flow",
    "decision_curve": "Decision curve: net benefit of routed, control and plain pooled (calibrated probabilities)",
    "reliability": "Reliability diagram per system: raw, each recalibration, and the one chosen per model",
    "gradcam_errors": "Grad-CAM of the hard-routed system's most confident errors",
}


def pm(x: float) -> str:
    """A signed difference, ``+0.012``."""
    return f"{x:+.3f}" if x is not None and np.isfinite(x) else "n/a"


def fmt_diff(c: Mapping[str, float], level: int = 95) -> str:
    """``+0.012 (95% CI -0.004 to +0.027)`` from a paired-difference entry."""
    return f"{pm(c['diff'])} ({level}% CI {pm(c['lo'])} to {pm(c['hi'])})"


def epochs_text(models: Sequence[Mapping[str, Any]]) -> str:
    """Epochs run / cap of each model, e.g. ``4/4, 3/4``."""
    return ", ".join(f"{m['epochs_run']}/{m['epochs_max']}" for m in models)


def _with_init(budget: Mapping[str, Any]) -> Any:
    init = budget.get("init") or {}
    before = init.get("images_seen") if init.get("kind") == "checkpoint" else 0
    if budget.get("images_seen") is None or before is None:
        return None
    return budget["images_seen"] + before


def budget_rows(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per system family: models, start, epochs, images seen, and whether its budget
    equals the routed system's."""
    eq = result["equal_budget"]
    rows = []
    for key, b in result["budgets"].items():
        same = ("-" if key == "routed" else "yes, equal budget" if not eq["differences"].get(key)
                else "no: " + "; ".join(eq["differences"][key]))
        rows.append({"system": "hard / soft / oracle (routed)" if key == "routed" else key,
                     "models": ", ".join(m["model"] for m in b["models"]),
                     "initialisation": evidence.describe_init(b["init"]) if b["init"] else "mixed",
                     "epochs run / cap": epochs_text(b["models"]),
                     "training images (own)": evidence.count_text(b["images_seen"]),
                     "incl. initialisation": evidence.count_text(_with_init(b)),
                     "same budget as routed": same})
    return rows


def threshold_text(system: str, thresholds: Mapping[str, Any]) -> str:
    t = thresholds[system]
    if "values" in t:
        return "per group " + " / ".join(f"{v:.3f}" for _, v in sorted(t["values"].items(), key=lambda kv: int(kv[0])))
    return f"{t['value']:.3f}"


def metric_rows(scored: Mapping[str, Any], thresholds: Mapping[str, Any], subset: str = "overall",
                keys: Sequence[str] = TABLE_METRICS) -> list[dict[str, str]]:
    rows = []
    for s, res in scored.items():
        m = res[subset] if subset in res else res
        rows.append({"system": res.get("description", s), "n": f"{m['n']} ({m['n_patients']} pat.)",
                     "threshold": threshold_text(s, thresholds),
                     **{k: fmt_ci(m[k], m["ci"].get(k)) for k in keys}})
    return rows


def subset_rows(scored: Mapping[str, Any], keys: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for sub in keys:
        for s, res in scored.items():
            m = res[sub]
            rows.append({"subset": sub, "system": s, "n": m["n"],
                         "fracture rate": f"{m['prevalence']:.2f}" if m["n"] else "n/a",
                         **{k: fmt_ci(m[k], m["ci"].get(k)) for k in ("auroc", "f1", "sensitivity", "specificity")}})
    return rows


def subgroup_rows(subgroups: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for col, values in subgroups.items():
        for value, e in values.items():
            label = PROJECTIONS.get(value, value) if col == "projection" else value
            row = {"column": col, "value": label, "n": f"{e['n']} ({e['n_patients']} pat., {e['n_pos']} fx)"}
            if "too_small" in e:
                row["AUROC"] = f"too small to score ({e['too_small']})"
            else:
                row["AUROC"] = "; ".join(f"{s} {fmt_ci(v['value'], v['ci'])}" for s, v in e["auroc"].items())
            rows.append(row)
    return rows


def comparison_rows(comparisons: Mapping[str, Any], keys: Sequence[str] = ("auroc", "auprc", "f1", "sensitivity",
                                                                             "specificity")) -> list[dict[str, str]]:
    rows = []
    for name, comp in comparisons.items():
        for k in keys:
            c = comp[k]
            rows.append({"comparison": name.replace("_minus_", " - "), "metric": k, "difference": pm(c["diff"]),
                         "95% CI": f"{pm(c['lo'])} to {pm(c['hi'])}" if np.isfinite(c["lo"]) else "n/a"})
    return rows


def calibration_rows(calibration: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"system": s, "ECE before": f"{v['ece_before']:.3f}", "ECE after": f"{v['ece_after']:.3f}",
             "Brier before": f"{v['brier_before']:.3f}", "Brier after": f"{v['brier_after']:.3f}"}
            for s, v in calibration["systems"].items()]


CALIBRATION_STAGES = (("before", "raw"), ("temperature", "temperature"), ("prior", "prior shift"),
                      ("platt", "Platt"), ("chosen", "chosen"))


def calibration_detail_rows(calibration: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per system and recalibration: test ECE, Brier, calibration slope and intercept."""
    rows = []
    for s, v in calibration["systems"].items():
        for key, label in CALIBRATION_STAGES:
            m = v[key]
            rows.append({"system": s, "probabilities": label, "ECE": f"{m['ece']:.3f}", "Brier": f"{m['brier']:.3f}",
                         "slope": f"{m['slope']:.2f}", "intercept": f"{m['intercept']:+.2f}"})
    return rows


ECE_TARGET = 0.05


def calibration_shape(calibration: Mapping[str, Any]) -> list[str]:
    """What the raw calibration slopes say: above 1 the probabilities are under-confident (a
    focal loss pulls them toward 0.5), which a prior shift alone cannot fix either."""
    slopes = {s: v["before"]["slope"] for s, v in calibration["systems"].items() if np.isfinite(v["before"]["slope"])}
    if not slopes:
        return []
    lo, hi = min(slopes.values()), max(slopes.values())
    if lo > 1.2:
        return [f"The raw probabilities are under-confident (calibration slope {lo:.1f}-{hi:.1f} > 1; the focal "
                "loss pulls them toward 0.5) as well as shifted by the sampler's prior, so a map with both a slope "
                "and an offset (Platt) is needed; temperature scaling alone and the prior correction alone each fix "
                "one of the two.", ""]
    if hi < 0.8:
        return [f"The raw probabilities are over-confident (calibration slope {lo:.1f}-{hi:.1f} < 1).", ""]
    return []


def calibration_gaps(calibration: Mapping[str, Any]) -> list[str]:
    """A sentence for every system whose test ECE after the chosen recalibration stays above
    ECE_TARGET: what remains is not the prior shift (which the correction removes) but
    miscalibration that varies with the probability, or a validation-test difference."""
    high = {s: v["chosen"]["ece"] for s, v in calibration["systems"].items() if v["chosen"]["ece"] > ECE_TARGET}
    if not high:
        return [f"Every system's test ECE after recalibration is at most {ECE_TARGET}.", ""]
    listed = ", ".join(f"{s} {e:.3f} (intercept {calibration['systems'][s]['chosen']['intercept']:+.2f})"
                       for s, e in high.items())
    return [f"Test ECE after recalibration stays above {ECE_TARGET} for: {listed}. The recalibration is fitted on "
            "validation images and applied unchanged to test; what remains is largely calibration-in-the-large (the "
            "intercept in brackets: above 0 the test images' fracture rate is under-predicted, below 0 over-predicted, "
            "a validation-test difference that a map fitted on validation cannot see), plus the bins' sampling noise "
            "on a small test set.", ""]


def calibration_choice_rows(calibration: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per model: the chosen method, its {a, b}, and each method's cross-validated log loss."""
    rows = []
    for key, method in calibration["chosen"].items():
        par = calibration["params"][key]
        cv = calibration.get("cv_log_loss", {}).get(key, {})
        rows.append({"model": key, "chosen": method, "a": f"{par['a']:.3f}", "b": f"{par['b']:+.3f}",
                     **{f"CV log loss, {m}": (f"{v:.4f}" if v is not None and np.isfinite(v) else "n/a")
                        for m, v in cv.items()}})
    return rows


def model_rows(models: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role, info in models.items():
        b = info["budget"]
        rows.append({"role": role, "file": info["path"], "model": info["model_name"], "img_size": info["img_size"],
                     "initialisation": evidence.describe_init(b["init"]),
                     "epochs run / cap (best)": f"{b['epochs_run']}/{b['epochs_max']} ({b['best_epoch']})",
                     "training images": evidence.count_text(b["images_seen"])})
    return rows


def subset_titles(full: bool, sep: str = ", ", last: str = " and ") -> str:
    """The titles of the kinds of subset scored with every metric (``full``; the whole test set
    aside) or by AUROC only, e.g. "true age group, cast and sex"."""
    titles = [s.title for s in systems.SUBSETS if s.full == full and s.kind != "overall"]
    return sep.join(titles[:-1]) + last + titles[-1] if len(titles) > 1 else "".join(titles)


# --------------------------------------------------------------------------- summary and checklist sections
def summary_rows(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """Routed, control, plain pooled and oracle per image and per study (max)."""
    study = result["study_level"]["aggregations"]["max"]["systems"]
    rows = []
    for key in systems.SUMMARY_SYSTEMS:
        if key not in result["systems"]:
            continue
        im, st = result["systems"][key]["overall"], study[key]
        rows.append({"system": systems.SYSTEMS[key].summary, "image AUROC": fmt_ci(im["auroc"], im["ci"].get("auroc")),
                     "image sens. / spec.": f"{im['sensitivity']:.3f} / {im['specificity']:.3f}",
                     "study AUROC": fmt_ci(st["auroc"], st["ci"].get("auroc")),
                     "study sens. / spec.": f"{st['sensitivity']:.3f} / {st['specificity']:.3f}"})
    return rows


def seed_rows(seeds: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"training seed": x["seed"], "routed AUROC": f"{x['routed_auroc']:.3f}",
             "control AUROC": f"{x['control_auroc']:.3f}", "difference": pm(x["diff"]),
             "95% CI (test sample)": f"{pm(x['lo'])} to {pm(x['hi'])}"} for x in seeds["per_seed"]]


def flow_rows(flow: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = [{"step": "rows in the source CSV", "images": flow["source_rows"], "patients": ""},
            {"step": "set aside: image missing or unreadable (stage 1)", "images": flow["set_aside_unreadable"],
             "patients": ""}]
    rows += [{"step": f"excluded: {k} flag", "images": v, "patients": ""} for k, v in flow["excluded_by_flag"].items()]
    rows += [{"step": "excluded in all (any flag)", "images": flow["excluded"], "patients": ""},
             {"step": "set aside: unreadable (stage 2)", "images": flow["set_aside_unreadable_pool"], "patients": ""}]
    rows += [{"step": name, "images": flow[key]["images"], "patients": flow[key]["patients"]}
             for key, name in (("test", "test set"), ("train", "training set"), ("val", "validation set"))]
    rows.append({"step": "not accounted for", "images": flow["not_accounted"], "patients": ""})
    rows += [{"step": f"left out at evaluation ({k}, undecodable)", "images": v, "patients": ""}
             for k, v in flow.get("left_out_at_evaluation", {}).items() if v]
    return rows


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if x is not None and np.isfinite(x) else "n/a"


def _dist(counts: Mapping[str, int], labels: Mapping[str, str] | None = None) -> str:
    total = max(sum(counts.values()), 1)
    return ", ".join(f"{(labels or {}).get(k, k)} {v} ({100 * v / total:.0f}%)" for k, v in counts.items())


def table_one_rows(table: Mapping[str, Any]) -> pd.DataFrame:
    """Table 1: one column per partition."""
    spec = [("patients", lambda r: str(r["patients"])), ("images", lambda r: str(r["images"])),
            ("age, median (IQR), per image", lambda r: f"{r['age_median']:.1f} ({r['age_q1']:.1f}-{r['age_q3']:.1f})"),
            ("sex (patients)", lambda r: _dist(r.get("sex_patients", {}))),
            ("age group (images)", lambda r: _dist(r["age_group_images"])),
            ("fracture rate", lambda r: _pct(r["fracture_rate"])),
            ("cast", lambda r: _pct(r.get("cast_share", float("nan")))),
            ("initial exam (vs follow-up)", lambda r: _pct(r.get("initial_exam_share", float("nan")))),
            ("projection", lambda r: _dist(r.get("projection", {}), PROJECTIONS)),
            ("device", lambda r: _dist(r.get("device_manufacturer", {})))]
    frame = pd.DataFrame({"characteristic": [name for name, _ in spec]})
    for part, r in table.items():
        frame[part] = [fn(r) for _, fn in spec]
    return frame


def error_rows(by: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for col, values in by.items():
        for value, e in values.items():
            rows.append({"by": col, "value": PROJECTIONS.get(value, value) if col == "projection" else value,
                         "images": e["images"], "FN / positives": f"{e['fn']} / {e['positives']} ({_pct(e['fn_rate'])})",
                         "FP / negatives": f"{e['fp']} / {e['negatives']} ({_pct(e['fp_rate'])})"})
    return rows


def confident_rows(errors_: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"rank": i + 1, "kind": e["kind"], "image": Path(e["image"]).name, "patient": e["patient_id"],
             "study": e["study"], "probability (calibrated)": f"{e['probability']:.3f}",
             "raw": f"{e.get('raw_probability', float('nan')):.3f}", "predicted group": e["predicted_group"],
             "true group": e["true_group"]} for i, e in enumerate(errors_)]


NET_BENEFIT_AT = (0.1, 0.2, 0.3, 0.5, 0.7)


def net_benefit_rows(curve: Mapping[str, Sequence[float]]) -> list[dict[str, str]]:
    ts = [round(t, 2) for t in curve["threshold"]]
    keys = [k for k in curve if k != "threshold"]
    return [{"threshold probability": f"{t:.2f}",
             **{k: f"{curve[k][ts.index(t)]:.3f}" for k in keys}} for t in NET_BENEFIT_AT if t in ts]


def scope_lines(result: Mapping[str, Any]) -> list[str]:
    return [
        "- **Reference standard:** the fracture label is the dataset's radiologist annotation "
        "(GRAZPEDWRI-DX: `fracture_visible`, annotated by radiologists at one hospital); no second reading or "
        "follow-up imaging was used to confirm it, and the annotators are not blinded to anything the model sees.",
        "- **Validation:** internal validation on one centre's data (a fixed, patient-level test set drawn from the "
        "same source as training); there is no external test set, so transport to other hospitals, devices or "
        "populations is untested.",
        "- **Phantom:** " + ("this run uses the synthetic phantom: the numbers show that the method runs end to end, "
                             "not clinical performance." if result.get("flow", {}).get("phantom")
                             else "this run uses real data, not the phantom."),
        "- **Intended use:** a research comparison of age-routed and pooled fracture detection on wrist radiographs "
        "of children and adolescents; not a cleared device.",
    ]


# (checklist item, where the report answers it, or "not addressed: why")
CHECKLIST = (
    ("CLAIM: data sources, eligibility, exclusions and patient flow", "Patient flow"),
    ("CLAIM / TRIPOD+AI: characteristics of each partition", "Table 1"),
    ("CLAIM: partitions disjoint at patient level", "Patient flow (patient-level splits; checked in every stage)"),
    ("CLAIM / STARD: reference standard and its rationale", "Scope and reference standard"),
    ("CLAIM: performance metrics with confidence intervals", "Fracture detection per image / per study"),
    ("CLAIM: comparison with a baseline, statistical test of the difference",
     "The Answer in detail; Paired differences; Training budgets"),
    ("CLAIM: robustness to training randomness", "Training seeds"),
    ("CLAIM / TRIPOD+AI: subgroup performance (age, sex, device, projection, cast, initial vs follow-up)",
     f"By {subset_titles(True)}; Subgroups"),
    ("CLAIM: failure analysis", "Error analysis"),
    ("CLAIM: explainability (saliency maps)", "Error analysis; Figures (Grad-CAM)"),
    ("TRIPOD+AI: calibration (plot, slope, intercept) and recalibration", "Calibration"),
    ("TRIPOD+AI: clinical utility (net benefit)", "Clinical utility"),
    ("TRIPOD+AI: sample size / precision", "The Answer in detail (smallest detectable difference)"),
    ("CLAIM / TRIPOD+AI: external validation", "not addressed: one centre's data only (Scope)"),
    ("TRIPOD+AI: missing data", "partly: empty flag cells read as 'no' (dataset convention); undecodable images "
                                "are counted in the flow"),
    ("CLAIM: reader study / comparison with clinicians", "not addressed: no reader data"),
    ("TRIPOD+AI: fairness beyond sex and age (ethnicity, socioeconomic)", "not addressed: not in the data"),
)


def summary_lines(result: Mapping[str, Any], summary: str, figures: Mapping[str, Path],
                  report_dir: Path) -> list[str]:
    """The Summary section: the short Answer (``summary``), the key systems' table and the ROC."""
    lines = ["## Summary", "", summary, "",
             markdown_table(summary_rows(result)),
             "Image level at the validation threshold; study level: max of the images' probabilities, threshold "
             "chosen on validation studies. 95% CIs by patient bootstrap; first training seed's models.", ""]
    if "roc" in figures:
        lines += [figure_link(figures["roc"], report_dir, "roc"), ""]
    lines += ["Details below: the Answer in detail, training seeds, scope, patient flow, Table 1, the "
              "per-image and per-study tables, subgroups, error analysis, clinical utility, calibration, the "
              "checklist.", ""]
    return lines


def checklist_lines(result: Mapping[str, Any], figures: Mapping[str, Path], report_dir: Path) -> list[str]:
    """Scope, flow, Table 1, error analysis, clinical utility, the checklist."""
    def fig(key: str) -> list[str]:
        return [figure_link(figures[key], report_dir, key), ""] if key in figures else []

    lines = ["## Scope and reference standard", "", *scope_lines(result), "",
             "## Patient flow", "", markdown_table(flow_rows(result["flow"])),
             result["flow"]["note"] + ".", "", *fig("flow"),
             "## Table 1: characteristics per partition", "",
             "Sex per patient (first image); everything else per image.", "",
             markdown_table(table_one_rows(result["table_one"]))]
    ea = result["error_analysis"]
    lines += ["## Error analysis (hard-routed system at its validation threshold)", "",
              "False negatives among positives and false positives among negatives, by the first AO/OTA code of "
              "`ao_classification`, projection, cast and true age group.", "", markdown_table(error_rows(ea["by"])),
              f"The {len(ea['most_confident'])} most confident errors (calibrated probability farthest from the "
              "label; errors at the validation threshold of the raw probabilities):", "",
              markdown_table(confident_rows(ea["most_confident"])) if ea["most_confident"] else "none", "",
              *fig("gradcam_errors"),
              "## Clinical utility: decision curve", "",
              "Net benefit per image, TP/n - FP/n * pt/(1-pt), on the calibrated probabilities, against treating "
              "every image as fractured (treat all) and none.", "",
              markdown_table(net_benefit_rows(result["net_benefit"]["curve"])), *fig("decision_curve"),
              "## Reporting checklist (CLAIM 2024, TRIPOD+AI, STARD): evaluation items", "",
              markdown_table([{"item": item, "where": where} for item, where in CHECKLIST])]
    return lines


def write_report(report_dir: Path, result: Mapping[str, Any], summary: str, figures: Mapping[str, Path]) -> Path:
    """report.md: the Answer (``result["conclusion"]``, and ``summary`` in short), the tables,
    and links to the figures."""
    sysres, thr = result["systems"], result["thresholds"]
    age = result["age_classifier"]
    names = age["names"]
    study = result["study_level"]
    lines = [
        "# Evaluation: age-routed fracture detection on the fixed test set", "",
        *summary_lines(result, summary, figures, report_dir),
        "## The Answer in detail", "", result["conclusion"], "",
        f"Test set: `{result['inputs']['test_csv']}`: {result['n_test_images']} images of "
        f"{result['n_test_patients']} patients, fracture rate {result['test_prevalence']:.2f}. "
        f"Thresholds chosen on `{result['inputs']['val_csv']}` ({result['threshold_method']}) and applied "
        f"unchanged to test. 95% CIs: percentile bootstrap over patients, {result['n_boot']} resamples, seed "
        f"{result['seed']}. Evaluation wall time {result['wall_time_s']:.1f} s on {result['device']}.", "",
    ]
    if result["notes"]:
        lines += ["**Notes:**", ""] + [f"- {n}" for n in result["notes"]] + [""]
    if result.get("seeds"):
        sd = result["seeds"]
        lines += ["## Training seeds", "",
                  f"Each training seed retrains the group models and their control from the same start and splits; "
                  f"each seed's routed system is compared with its own control on the same test images (the age classifier "
                  f"is trained once: it only routes, and both systems of a seed are scored on the same routing). When the "
                  f"group models and the control continue one pooled model, that shared start is not retrained, so "
                  f"its own training randomness is not in the seed spread. Interval "
                  f"for the mean: {sd['interval_method']} (SE {sd['se']:.4f}, df {sd['dof']:.1f}). Verdict: "
                  f"{sd['verdict']}.", "", markdown_table(seed_rows(sd))]
    lines += checklist_lines(result, figures, report_dir)
    lines += ["## Training budgets", "",
              "What each system's models cost in training, from their checkpoints. Two systems have an equal "
              f"budget when they start from the same weights, train with the same settings and epoch cap, and "
              f"see the same number of training images (within "
              f"{100 * result['equal_budget']['images_tolerance']:.0f}%).",
              "", markdown_table(budget_rows(result)),
              "## Fracture detection per image, whole test set", "", markdown_table(metric_rows(sysres, thr)),
              "## Fracture detection per study", "",
              f"A study ({study['unit']}) is positive if any of its images is; its probability is the max or the "
              "mean of its images' probabilities, and thresholds are chosen on validation studies the same way.", ""]
    for how, agg in study["aggregations"].items():
        lines += [f"### {how} of the image probabilities ({agg['n_studies']} studies, {agg['n_patients']} patients, "
                  f"fracture rate {agg['prevalence']:.2f})", "",
                  markdown_table(metric_rows(agg["systems"], agg["thresholds"],
                                             keys=("auroc", "sensitivity", "specificity", "f1"))),
                  markdown_table(comparison_rows(agg["comparisons"], ("auroc", "sensitivity", "specificity")))]
    lines += [f"## By {subset_titles(True)}", "",
              "A group's numbers come from the images whose TRUE age is in that group, whichever model the system "
              "sent them to. Cast images are an easy shortcut (a cast goes with a fracture most of the time), so the "
              "no-cast rows are the harder test.", "",
              markdown_table(subset_rows(sysres, [k for k in result["subsets"] if k != "overall"]))]
    if result["subgroups"]:
        lines += [f"## Subgroups: {subset_titles(False, last=', ')}", "",
                  f"AUROC with 95% CI per subset; subsets under {systems.MIN_SUBSET_IMAGES} images or with one class "
                  "are listed, not scored. "
                  "Sex from `gender`; an empty `initial_exam` means a follow-up exam.",
                  "", markdown_table(subgroup_rows(result["subgroups"]))]
    lines += ["## Paired differences (same patient resamples)", "",
              markdown_table(comparison_rows(result["comparisons"]))]
    if result["comparisons_by_age_group"]:
        lines += ["Per true age group:", "", markdown_table(
            [{"age group": sub, **row} for sub, comp in result["comparisons_by_age_group"].items()
             for row in comparison_rows(comp, ("auroc", "f1"))])]
    cal = result["calibration"]
    lines += ["## Calibration", "",
              f"{cal['method']}; {cal['form']}. The class-balanced sampler trains at 50% fractures, so raw "
              "probabilities carry a prior shift that one temperature cannot undo; the prior-shift correction and "
              "Platt recalibration can. Expected calibration error (ECE, "
              f"{cal['n_bins']} equal-width bins), Brier score, calibration slope (1 ideal) and intercept "
              "(calibration-in-the-large, 0 ideal) on the test set. Age classifier (top-label, temperature) ECE "
              f"{cal['age_classifier']['ece_before']:.3f} -> {cal['age_classifier']['ece_after']:.3f}.", "",
              *calibration_shape(cal),
              "Chosen per model (on validation):", "", markdown_table(calibration_choice_rows(cal)),
              markdown_table(calibration_detail_rows(cal)), *calibration_gaps(cal),
              *([figure_link(figures["reliability"], report_dir, "reliability"), ""] if "reliability" in figures else []),
              "## Age-group classifier (router) on the test set", "",
              f"Accuracy {age['accuracy']:.3f}, macro-F1 {fmt_ci(age['macro_f1'], age.get('macro_f1_ci'))}, balanced "
              f"accuracy {age['balanced_accuracy']:.3f}. Rows: true group; columns: predicted group.", ""]
    cm = pd.DataFrame(age["confusion_matrix"], columns=[f"pred {n}" for n in names])
    cm.insert(0, "true", names)
    lines.append(markdown_table(cm))
    rep = age["classification_report"]
    lines.append(markdown_table([
        {"group": n, "precision": rep[n]["precision"], "recall": rep[n]["recall"],
         "f1": rep[n]["f1-score"], "support": int(rep[n]["support"])} for n in names]))
    mis = result["misrouted"]
    lines += [f"Misrouted test images: {mis['n']} of {mis['n_total']}.", ""]
    if mis.get("metrics"):
        lines.append(markdown_table([
            {"system on misrouted images": s, "n": v["n"], "accuracy": v["accuracy"], "auroc": v["auroc"]}
            for s, v in mis["metrics"].items()]))
    lines += ["## Thresholds (chosen on validation)", "",
              markdown_table([{"system": s, "threshold": threshold_text(s, thr),
                               "val sensitivity": t["val_metrics"]["sensitivity"],
                               "val specificity": t["val_metrics"]["specificity"],
                               "val AUROC": t["val_metrics"]["auroc"]} for s, t in thr.items()]),
              "## Figures", ""]
    for key, path in figures.items():
        lines += [f"### {CAPTIONS.get(key, key)}", "", figure_link(path, report_dir, key), ""]
    lines += ["## Models", "", markdown_table(model_rows(result["models"]))]
    lines += environment_lines(result.get("environment"))
    return io_utils.write_text("\n".join(lines), report_dir / columns.REPORT_MD)


def environment_lines(env: Mapping[str, Any] | None) -> list[str]:
    """The run environment section: machine, threads, lock and package versions."""
    if not env:
        return []
    mach, lock = env["machine"], env["lock"]
    lock_text = ("not found" if lock["sha256"] is None else
                 f"`{lock['sha256'][:12]}`, " + ("installed from it" if lock["matches"] else
                                                  "the running environment was NOT installed from it"))
    return ["## Run environment", "",
            f"{mach['cpu']} ({mach['cpu_count']} CPUs, native bf16: {'yes' if mach['cpu_native_bf16'] else 'no'}), "
            f"GPU: {', '.join(mach['gpus']) or 'none'}; torch threads {mach['torch_threads']} "
            f"(inter-op {mach['torch_interop_threads']}); {mach['platform']}. Lock (requirements.lock): {lock_text}.",
            "", markdown_table([{"package": k, "version": v} for k, v in env["versions"].items()]), ""]


def print_summary(result: Mapping[str, Any], summary: str) -> None:
    """The side-by-side tables on the terminal, then the Answer (and ``summary``, in short)."""
    sysres, thr = result["systems"], result["thresholds"]
    print("\n== Fracture detection on the test set, per image (95% CI, patient bootstrap) ==")
    print(text_table([{"system": s, "thr": threshold_text(s, thr),
                       **{k: fmt_ci(r["overall"][k], r["overall"]["ci"].get(k))
                          for k in ("auroc", "f1", "sensitivity", "specificity")}} for s, r in sysres.items()]))
    agg = result["study_level"]["aggregations"]["max"]
    print(f"\n== Per study ({agg['n_studies']} studies, max of the image probabilities) ==")
    print(text_table([{"system": s, "thr": threshold_text(s, agg["thresholds"]),
                       **{k: fmt_ci(r[k], r["ci"].get(k)) for k in ("auroc", "sensitivity", "specificity")}}
                      for s, r in agg["systems"].items()]))
    print(f"\n== AUROC by {subset_titles(True, ' / ', ' / ')} ==")
    subs = [k for k in result["subsets"] if k != "overall"]
    print(text_table([{"system": s, **{k: fmt_ci(r[k]["auroc"], r[k]["ci"].get("auroc")) for k in subs}}
                      for s, r in sysres.items() if systems.SYSTEMS[s].base is None]))
    print("\n== Calibration (test ECE before -> after the recalibration chosen on validation) ==")
    print(text_table(calibration_rows(result["calibration"])))
    age = result["age_classifier"]
    print(f"\nage classifier (test): accuracy {age['accuracy']:.3f}, macro-F1 "
          f"{fmt_ci(age['macro_f1'], age.get('macro_f1_ci'))}; confusion (rows true): {age['confusion_matrix']}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\n{result['conclusion']}")
    print(f"\nSummary: {summary}")
    print(f"evaluation wall time: {result['wall_time_s']:.1f} s")
