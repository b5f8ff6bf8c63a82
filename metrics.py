"""Classification metrics, threshold choice and patient-level bootstrap intervals.

Point metrics come from scikit-learn. Confidence intervals resample *patients*, not
images: one patient contributes several correlated images (AP and lateral views, follow-up
studies), so resampling images would make the intervals too narrow. A patient drawn k times
brings all of its images k times.

The bootstrap is vectorised: a resample is a vector of per-image weights (how often the
image's patient was drawn), and every binary metric, AUROC and average precision included,
is computed for all resamples at once from weighted counts. This is exactly the metric of
the duplicated data set, so it matches scikit-learn on the resampled rows (tested), and
1,000 resamples of 3,000 images take well under a second per metric set.

Conventions:
- a predicted positive is ``prob >= threshold`` (the convention of ``roc_curve``);
- ratios with an empty denominator (e.g. sensitivity when there are no positives) are NaN,
  as are AUROC/AUPRC when only one class is present; NaN resamples are left out of the
  percentile interval and counted in ``n_boot_valid``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

import columns

#: Scalar metrics of :func:`binary_metrics` that get bootstrap intervals.
BINARY_METRICS: tuple[str, ...] = (
    "accuracy", "f1", "sensitivity", "specificity", "ppv", "npv", "auroc", "auprc", "brier",
)



@dataclass(frozen=True)
class BootstrapSpec:
    """A patient bootstrap: resamples, seed, and 1 - the confidence level of its intervals."""

    n_boot: int = 1000
    seed: int = 0
    alpha: float = 0.05


@dataclass(frozen=True)
class ThresholdRule:
    """How an operating threshold is chosen (:func:`choose_threshold`)."""

    method: str = "youden"
    target_sensitivity: float = 0.95


# Large enough that numpy does the work, small enough that a chunk of resample weights
# (chunk x n_images float64) stays around 100 MB on a full-size test set.
_MAX_CELLS_PER_CHUNK = 12_000_000


def _as_binary(y_true: Iterable) -> np.ndarray:
    y = np.asarray(y_true)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must be 0/1, got values {np.unique(y)[:5].tolist()}")
    return y.astype(int)


def _as_prob(prob: Iterable, n: int) -> np.ndarray:
    p = np.asarray(prob, dtype=float).reshape(-1)
    if p.shape[0] != n:
        raise ValueError(f"prob has {p.shape[0]} values for {n} labels")
    if not np.isfinite(p).all():
        raise ValueError("prob contains NaN or inf")
    return p


def binary_metrics(y_true: Iterable, prob: Iterable, threshold: float | np.ndarray = 0.5) -> dict[str, Any]:
    """Threshold and ranking metrics of a binary classifier (scikit-learn).

    Returns accuracy, f1, sensitivity, specificity, ppv, npv, auroc, auprc, brier,
    ``confusion_matrix`` ``[[tn, fp], [fn, tp]]``, ``n``, ``n_pos``, ``prevalence`` and the
    ``threshold``. Never raises on a single class present: the undefined entries are NaN.
    ``threshold`` may be one value per row (per-group thresholds); ``threshold`` is then
    reported as None.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, y.shape[0])
    pred = (p >= threshold).astype(int)
    n, n_pos = int(y.size), int(y.sum())
    nan = float("nan")
    out: dict[str, Any] = {"n": n, "n_pos": n_pos, "prevalence": n_pos / n if n else nan,
                           "threshold": float(threshold) if np.ndim(threshold) == 0 else None}
    if n == 0:
        out.update({k: nan for k in BINARY_METRICS})
        out["confusion_matrix"] = [[0, 0], [0, 0]]
        return out
    both = 0 < n_pos < n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["accuracy"] = float(accuracy_score(y, pred))
        out["f1"] = float(f1_score(y, pred, zero_division=np.nan))
        out["sensitivity"] = float(recall_score(y, pred, pos_label=1, zero_division=np.nan))
        out["specificity"] = float(recall_score(y, pred, pos_label=0, zero_division=np.nan))
        out["ppv"] = float(precision_score(y, pred, pos_label=1, zero_division=np.nan))
        out["npv"] = float(precision_score(y, pred, pos_label=0, zero_division=np.nan))
        out["auroc"] = float(roc_auc_score(y, p)) if both else nan
        out["auprc"] = float(average_precision_score(y, p)) if both else nan
        out["brier"] = float(brier_score_loss(y, p, pos_label=1)) if n else nan
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    return out


def choose_threshold(
    y_true: Iterable,
    prob: Iterable,
    method: str = "youden",
    target_sensitivity: float = 0.95,
) -> float:
    """Pick an operating threshold from (validation) labels and probabilities.

    ``youden``: the ROC point that maximises J = TPR - FPR; among ties the highest
    threshold (fewest false positives). ``sensitivity``: the highest threshold whose
    sensitivity is at least ``target_sensitivity`` (so the best specificity at that
    sensitivity). Use it on validation data and apply the result unchanged to test data.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, y.shape[0])
    if not 0 < y.sum() < y.size:
        raise ValueError("choose_threshold needs both classes in y_true")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    if method == "youden":
        i = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        # tpr is non-decreasing along the curve, so the first hit has the highest threshold
        i = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    else:
        raise ValueError(f"unknown threshold method {method!r} (youden|sensitivity)")
    t = float(thr[i])
    if not np.isfinite(t):  # roc_curve's first point predicts nothing positive
        t = float(np.nextafter(p.max(), np.inf))
    return t


# --------------------------------------------------------------------------- bootstrap
def patient_draws(patient_ids: Iterable, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image patient codes and the seeded patient draws.

    Returns ``codes`` (n_images,) in 0..P-1 and ``draws`` (n_boot, P): row b lists the P
    patients (with replacement) of resample b. Both bootstrap functions use these draws, so
    one seed gives the same resamples everywhere. Ids are compared as
    :func:`columns.patient_ids` gives them (``"P1 "`` is ``"P1"``).
    """
    codes, uniques = pd.factorize(columns.patient_ids(patient_ids), sort=True)
    n_pat = len(uniques)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_pat, 1), size=(n_boot, n_pat))
    return codes.astype(np.int64), draws


def _draw_counts(draws: np.ndarray, n_pat: int) -> np.ndarray:
    n_boot = draws.shape[0]
    flat = (draws + np.arange(n_boot)[:, None] * n_pat).ravel()
    return np.bincount(flat, minlength=n_boot * n_pat).reshape(n_boot, n_pat).astype(float)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(ok.size)


def patient_bootstrap_ci(
    df: pd.DataFrame,
    metric_fn: Callable[[pd.DataFrame], float],
    patient_col: str = "patient_id",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """``(point, lo, hi)`` of any ``metric_fn(rows) -> float`` by resampling patients.

    Generic but calls ``metric_fn`` once per resample; for the binary metrics use
    :func:`bootstrap_binary_metrics`, which does all resamples at once. The interval is the
    percentile interval of the resamples whose value is finite.
    """
    point = float(metric_fn(df))
    if len(df) == 0 or not np.isfinite(point):
        return point, float("nan"), float("nan")
    codes, draws = patient_draws(df[patient_col], n_boot, seed)
    n_pat = draws.shape[1]
    order = np.argsort(codes, kind="stable")  # images grouped by patient
    lens = np.bincount(codes, minlength=n_pat)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    values = np.empty(n_boot)
    for b in range(n_boot):
        d = draws[b]
        ln = lens[d]
        # positions of each drawn patient's images inside `order`, without a Python loop
        within = np.arange(ln.sum()) - np.repeat(np.cumsum(ln) - ln, ln)
        idx = order[np.repeat(starts[d], ln) + within]
        values[b] = metric_fn(df.iloc[idx])
    lo, hi, _ = _percentile_ci(values, alpha)
    return point, lo, hi


def weighted_binary_metrics(
    y_true: Iterable, prob: Iterable, threshold: float | np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of :data:`BINARY_METRICS` for each row of ``weights`` (B, n_images).

    Integer weights w make this the metric of the data set in which image i appears w_i
    times. AUROC counts positive/negative pairs (ties count one half), AUPRC is
    scikit-learn's average precision (step-wise, no interpolation).
    """
    y = _as_binary(y_true).astype(bool)
    p = _as_prob(prob, y.shape[0])
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    pred = p >= threshold
    cells = {
        "tp": (y & pred), "fp": (~y & pred), "fn": (y & ~pred), "tn": (~y & ~pred),
    }
    c = {k: w @ v.astype(float) for k, v in cells.items()}
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ps)) + 1])  # runs of tied scores
    ws = w[:, order]
    wpos = np.add.reduceat(ws * ys, starts, axis=1)
    wneg = np.add.reduceat(ws * ~ys, starts, axis=1)
    n_pos, n_neg = wpos.sum(1), wneg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tp + fp + fn + tn
        neg_below = n_neg[:, None] - np.cumsum(wneg, 1)  # scores sorted high to low
        auroc = (wpos * (neg_below + 0.5 * wneg)).sum(1) / (n_pos * n_neg)
        tps, fps = np.cumsum(wpos, 1), np.cumsum(wneg, 1)
        precision = tps / (tps + fps)
        d_recall = wpos / n_pos[:, None]
        auprc = np.where(d_recall > 0, d_recall * precision, 0.0).sum(1)
        both = (n_pos > 0) & (n_neg > 0)
        out = {
            "accuracy": (tp + tn) / n,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "auroc": np.where(both, auroc, np.nan),
            "auprc": np.where(both, auprc, np.nan),
            "brier": (w @ (p - y) ** 2) / n,
        }
    return out


def _chunks(n_boot: int, n_images: int) -> Iterable[slice]:
    step = max(1, _MAX_CELLS_PER_CHUNK // max(n_images, 1))
    for s in range(0, n_boot, step):
        yield slice(s, min(s + step, n_boot))


def bootstrap_samples(
    y_true: Iterable,
    probs: Sequence[Iterable],
    thresholds: Sequence[float | np.ndarray],
    patient_ids: Iterable,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Bootstrap distributions of :data:`BINARY_METRICS` for several systems.

    All systems share the same patient resamples, so differences between them are
    paired. Returns one dict metric -> array (n_boot,) per system.
    """
    y = _as_binary(y_true)
    codes, draws = patient_draws(patient_ids, n_boot, seed)
    if len(codes) != len(y):
        raise ValueError("patient_ids and y_true differ in length")
    out = [{k: np.empty(n_boot) for k in BINARY_METRICS} for _ in probs]
    for sl in _chunks(n_boot, len(y)):
        w = _draw_counts(draws[sl], draws.shape[1])[:, codes]
        for s, (prob, thr) in enumerate(zip(probs, thresholds)):
            vals = weighted_binary_metrics(y, prob, thr, w)
            for k in BINARY_METRICS:
                out[s][k][sl] = vals[k]
    return out


def bootstrap_binary_metrics(
    y_true: Iterable,
    prob: Iterable,
    patient_ids: Iterable,
    threshold: float | np.ndarray,
    boot: BootstrapSpec = BootstrapSpec(),
) -> dict[str, Any]:
    """:func:`binary_metrics` plus ``ci``: metric -> [lo, hi] from a patient bootstrap."""
    y = _as_binary(y_true)
    point = binary_metrics(y, prob, threshold)
    point["n_patients"] = int(columns.patient_ids(patient_ids).nunique())
    point["ci"], point["n_boot_valid"] = {}, {}
    if len(y) == 0 or boot.n_boot <= 0:
        return point
    samples = bootstrap_samples(y, [prob], [threshold], patient_ids, boot.n_boot, boot.seed)[0]
    for k in BINARY_METRICS:
        lo, hi, n_ok = _percentile_ci(samples[k], boot.alpha)
        point["ci"][k] = [lo, hi] if np.isfinite(point[k]) else [float("nan")] * 2
        point["n_boot_valid"][k] = n_ok
    point.update(n_boot=boot.n_boot, seed=boot.seed, alpha=boot.alpha)
    return point


def paired_bootstrap_difference(
    y_true: Iterable,
    probs: Sequence[Iterable],
    thresholds: Sequence[float | np.ndarray],
    patient_ids: Iterable,
    boot: BootstrapSpec = BootstrapSpec(),
) -> dict[str, dict[str, float]]:
    """Metric(a) - metric(b) on the same images, with a paired patient-bootstrap interval;
    ``probs`` and ``thresholds`` are a's and b's, in that order.

    Returns metric -> {"diff", "lo", "hi", "se", "p_le_0"}: ``se`` is the standard deviation
    of the resampled differences and ``p_le_0`` the fraction of resamples in which a did not
    beat b (a one-sided bootstrap p-value for "a > b"). Thresholds may be per row.
    """
    y = _as_binary(y_true)
    (prob_a, prob_b), (threshold_a, threshold_b) = probs, thresholds
    ma, mb = binary_metrics(y, prob_a, threshold_a), binary_metrics(y, prob_b, threshold_b)
    sa, sb = bootstrap_samples(y, [prob_a, prob_b], [threshold_a, threshold_b], patient_ids,
                               boot.n_boot, boot.seed)
    out = {}
    for k in BINARY_METRICS:
        d = sa[k] - sb[k]
        lo, hi, _ = _percentile_ci(d, boot.alpha)
        ok = d[np.isfinite(d)]
        out[k] = {"diff": float(ma[k] - mb[k]), "lo": lo, "hi": hi,
                  "se": float(ok.std(ddof=1)) if ok.size > 1 else float("nan"),
                  "p_le_0": float((ok <= 0).mean()) if ok.size else float("nan")}
    return out


# --------------------------------------------------------------------------- multi-class
def multiclass_summary(
    y_true: Iterable,
    y_pred: Iterable,
    labels: Sequence[int] = (0, 1, 2),
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Confusion matrix (rows true, columns predicted), accuracy, balanced accuracy,
    macro-F1 and scikit-learn's classification report (as a dict) for a multi-class task."""
    yt, yp = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    labels = list(labels)
    names = [str(x) for x in (names if names is not None else labels)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "labels": labels,
            "names": names,
            "n": int(yt.size),
            "confusion_matrix": confusion_matrix(yt, yp, labels=labels).tolist(),
            "accuracy": float(accuracy_score(yt, yp)) if yt.size else float("nan"),
            "balanced_accuracy": float(balanced_accuracy_score(yt, yp)) if yt.size else float("nan"),
            "macro_f1": float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0)),
            "classification_report": classification_report(
                yt, yp, labels=labels, target_names=names, output_dict=True, zero_division=0),
        }


def macro_f1(y_true: Iterable, y_pred: Iterable, labels: Sequence[int] = (0, 1, 2)) -> float:
    """Macro-averaged F1 over ``labels`` (absent classes count as F1 0)."""
    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), labels=list(labels),
                          average="macro", zero_division=0))


# --------------------------------------------------------------------------- per-group thresholds
def choose_group_thresholds(
    y_true: Iterable,
    prob: Iterable,
    groups: Iterable,
    n_groups: int,
    fallback: float,
    rule: ThresholdRule = ThresholdRule(),
) -> tuple[dict[int, float], list[int]]:
    """One threshold per group, each chosen (:func:`choose_threshold`) on that group's rows.

    ``groups`` says which group (model) decided each row. A group whose rows hold one class
    only (or no rows) cannot choose a threshold and gets ``fallback``; the second value
    lists those groups, so the caller can say so.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, y.shape[0])
    g = np.asarray(groups, dtype=int).reshape(-1)
    if g.shape[0] != y.shape[0]:
        raise ValueError(f"groups has {g.shape[0]} values for {y.shape[0]} labels")
    out: dict[int, float] = {}
    fell_back: list[int] = []
    for k in range(n_groups):
        mask = g == k
        if 0 < y[mask].sum() < mask.sum():
            out[k] = choose_threshold(y[mask], p[mask], rule.method, rule.target_sensitivity)
        else:
            out[k] = float(fallback)
            fell_back.append(k)
    return out, fell_back


def per_row_thresholds(groups: Iterable, thresholds: Mapping[int, float]) -> np.ndarray:
    """The threshold of each row's group (``thresholds`` maps group -> threshold)."""
    g = np.asarray(groups, dtype=int).reshape(-1)
    table = np.array([thresholds[k] for k in range(max(thresholds) + 1)], dtype=float)
    return table[g]


# --------------------------------------------------------------------------- study level
def aggregate_studies(frame: pd.DataFrame, prob_cols: Sequence[str], how: str = "max",
                      study_cols: Sequence[str] = ("patient_id", "study_number"),
                      group_cols: Sequence[str] = ()) -> pd.DataFrame:
    """One row per study from one row per image.

    A study is the unique combination of ``study_cols`` (patient id first). Each column in
    ``prob_cols`` becomes the ``how`` (``max`` or ``mean``) of its image probabilities; the
    label ``fracture`` is 1 if any image of the study is positive; ``patient_id`` is kept for
    the patient bootstrap and ``n_images`` counts the study's images. Each ``group_cols``
    column becomes the most frequent value among the study's images (the smallest on a tie),
    e.g. the age group whose model decided most of its images. Studies keep the order of
    their first image.
    """
    if how not in ("max", "mean"):
        raise ValueError(f"unknown study aggregation {how!r} (max|mean)")
    keys = list(study_cols)
    missing = [c for c in [*keys, "fracture", *prob_cols, *group_cols] if c not in frame.columns]
    if missing:
        raise ValueError(f"aggregate_studies: missing column(s) {', '.join(missing)}")
    grouped = frame.groupby(keys, sort=False, dropna=False)
    out = grouped[list(prob_cols)].agg(how)
    out["fracture"] = grouped["fracture"].max().astype(int)
    out["n_images"] = grouped.size()
    for col in group_cols:
        out[col] = grouped[col].agg(lambda s: int(s.value_counts().sort_index().idxmax()))
    out = out.reset_index()
    out["patient_id"] = out[keys[0]].astype(str)
    return out


# --------------------------------------------------------------------------- calibration
def expected_calibration_error(y_true: Iterable, prob: Iterable, n_bins: int = 10) -> float:
    """ECE of binary probabilities: the bin-size-weighted mean |observed rate - mean
    probability| over ``n_bins`` equal-width bins of the predicted probability."""
    y = _as_binary(y_true).astype(float)
    p = _as_prob(prob, y.shape[0])
    if y.size == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=y, minlength=n_bins) - np.bincount(bins, weights=p, minlength=n_bins))
    return float(gap.sum() / count.sum())


def top_label_calibration_error(labels: Iterable, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE of a multi-class model's confidence (its top probability) against being right."""
    probs = np.asarray(probs, float)
    correct = (probs.argmax(1) == np.asarray(labels, int)).astype(int)
    return expected_calibration_error(correct, probs.max(1), n_bins)


_EPS = 1e-7


def _logit(prob: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(prob, float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob: Iterable, temperature: float) -> np.ndarray:
    """Binary probabilities rescaled as ``sigmoid(logit(p) / T)``; (N, C) rows as
    ``softmax(log(p) / T)``. T > 1 softens over-confident outputs; ranking is unchanged."""
    p = np.asarray(prob, float)
    if p.ndim == 2:
        z = np.log(np.clip(p, 1e-12, 1.0)) / temperature
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-_logit(p) / temperature))


def fit_temperature(labels: Iterable, prob: Iterable) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` under
    :func:`apply_temperature` (Guo et al., 2017): binary labels with (N,) probabilities,
    or class indices with (N, C) probabilities. 1.0 when the data cannot tell (one class)."""
    from scipy.optimize import minimize_scalar

    p = np.asarray(prob, float)
    t = np.asarray(labels, int)
    if p.ndim == 1:
        y = _as_binary(t).astype(float)
        if not 0 < y.sum() < y.size:
            return 1.0
        z = _logit(p)

        def nll(log_t: float) -> float:
            s = z / np.exp(log_t)
            return float(np.mean(np.logaddexp(0.0, s) - y * s))
    else:
        if len(np.unique(t)) < 2:
            return 1.0
        z = np.log(np.clip(p, 1e-12, 1.0))

        def nll(log_t: float) -> float:
            s = z / np.exp(log_t)
            s = s - s.max(1, keepdims=True)
            return float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(t)), t]))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


# --------------------------------------------------------------------------- power
def min_detectable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at ``alpha`` detects with ``power``,
    given the standard error ``se`` of the estimated difference (normal approximation):
    ``(z_{1-alpha/2} + z_{power}) * se``."""
    from scipy.stats import norm

    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * se)


# --------------------------------------------------------------------------- training-time metrics
def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                           probs: np.ndarray | None = None) -> dict[str, Any]:
    """acc, f1 (binary F1 of class 1 for 2 classes, else macro-F1), auroc, confusion, n."""
    labels = np.asarray(labels).astype(int)
    preds = np.asarray(preds).astype(int)
    classes = list(range(num_classes))
    n = int(labels.size)
    out: dict[str, Any] = {"n": n, "acc": float("nan"), "f1": float("nan"), "auroc": float("nan")}
    if n:
        out["acc"] = float(accuracy_score(labels, preds))
        if num_classes == 2:
            out["f1"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))
        else:
            out["f1"] = float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0))
    if probs is not None and n and len(np.unique(labels)) == num_classes:
        if num_classes == 2:
            out["auroc"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            out["auroc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                               labels=classes))
    out["confusion_matrix"] = confusion_matrix(labels, preds, labels=classes).tolist()
    return out


def compute_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Metrics of ``[N, C]`` probabilities against integer labels."""
    probs = np.asarray(probs)
    return classification_metrics(labels, probs.argmax(1), probs.shape[1], probs)


def format_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    names = [str(c) for c in class_names]
    df = pd.DataFrame(matrix, index=[f"true {c}" for c in names], columns=[f"pred {c}" for c in names])
    return df.to_string()
