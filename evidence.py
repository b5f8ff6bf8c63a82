"""What the evaluation may conclude: routing against its equal-budget control over several
training seeds, and clinical utility (net benefit). No rendering here; report.py words it.

Across seeds. Each seed k trains the routed system and its control from the same start and
splits; on the one fixed test set they differ by d_k (AUROC, routed minus control). The
Answer is the mean d over the N seeds. Its uncertainty has two independent sources:

  test sample  the paired patient bootstrap of the seed-mean (every seed's systems scored on
               the same patient resamples), variance V_test;
  training     the spread of d_k between seeds, sample variance s^2, so s^2 / N for the mean
               (the test set is fixed, so this spread is training alone).

The test sample is drawn independently of the training randomness, so the variances add:
SE^2 = V_test + s^2 / N. The interval is mean +/- t * SE with Welch-Satterthwaite degrees
of freedom (only the seed part is estimated from N values), which widens it properly when
there are few seeds; resampling 3 seeds with replacement would understate their spread.
With one seed the interval is the test bootstrap alone and covers no training variation.
A start that every seed shares (the pooled model the group models and the control continue)
is not resampled: its training randomness is outside the interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

import metrics

HELPED, HURT, NO_EVIDENCE, INCONSISTENT, ONE_SEED = (
    "helped", "hurt", "no evidence of a difference", "inconsistent across training seeds", "one training seed")


def verdict(diffs: Sequence[float], lo: float, hi: float) -> str:
    """"helped"/"hurt" only when the interval excludes 0 and every seed's difference has the
    interval's sign; seeds that disagree in sign are "inconsistent"; one seed cannot show that
    a result holds across training."""
    d = np.asarray(diffs, float)
    if d.size < 2:
        return ONE_SEED
    if not (np.all(d > 0) or np.all(d < 0)):
        return INCONSISTENT
    if lo > 0 and np.all(d > 0):
        return HELPED
    if hi < 0 and np.all(d < 0):
        return HURT
    return NO_EVIDENCE


@dataclass
class SeedSystems:
    """One training seed's test probabilities of the routed system and of its control."""

    seed: int
    routed: np.ndarray
    control: np.ndarray


def combined_interval(mean: float, se_test: float, seed_sd: float, n_seeds: int,
                      alpha: float) -> dict[str, float]:
    """mean +/- t * sqrt(se_test^2 + seed_sd^2 / n) with Welch-Satterthwaite degrees of freedom."""
    seed_var = (seed_sd ** 2 / n_seeds) if n_seeds > 1 else 0.0
    se = float(np.sqrt(se_test ** 2 + seed_var))
    if seed_var > 0:
        dof = float(se ** 4 / (seed_var ** 2 / (n_seeds - 1)))
        q = float(scipy.stats.t.ppf(1 - alpha / 2, dof))
    else:
        dof, q = float("inf"), float(scipy.stats.norm.ppf(1 - alpha / 2))
    return {"se": se, "dof": dof, "lo": mean - q * se, "hi": mean + q * se}


def across_seeds(y: np.ndarray, patients: np.ndarray, runs: Sequence[SeedSystems],
                 boot: Mapping[str, float]) -> dict[str, object]:
    """Per-seed AUROC differences (routed - control) with their own patient-bootstrap
    intervals, their mean, the interval for the mean over test sample and training, the
    smallest detectable difference (both sources) and the verdict."""
    alpha = float(boot.get("alpha", 0.05))
    probs = [p for r in runs for p in (r.routed, r.control)]
    samples = metrics.bootstrap_samples(y, probs, [0.5] * len(probs), patients, int(boot["n_boot"]),
                                        int(boot["seed"]))
    per_seed, boot_diffs = [], []
    for k, run in enumerate(runs):
        a = metrics.binary_metrics(y, run.routed, 0.5)["auroc"]
        b = metrics.binary_metrics(y, run.control, 0.5)["auroc"]
        d = samples[2 * k]["auroc"] - samples[2 * k + 1]["auroc"]
        boot_diffs.append(d)
        ok = d[np.isfinite(d)]
        lo, hi = (np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if ok.size
                  else (float("nan"), float("nan")))
        per_seed.append({"seed": run.seed, "routed_auroc": a, "control_auroc": b, "diff": a - b,
                         "lo": float(lo), "hi": float(hi)})
    diffs = np.array([s["diff"] for s in per_seed])
    mean_boot = np.mean(boot_diffs, axis=0)
    mean_boot = mean_boot[np.isfinite(mean_boot)]
    se_test = float(mean_boot.std(ddof=1)) if mean_boot.size > 1 else float("nan")
    seed_sd = float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0
    mean = float(diffs.mean())
    if diffs.size > 1:
        interval = combined_interval(mean, se_test, seed_sd, diffs.size, alpha)
    else:  # one seed: the test bootstrap's own percentile interval
        interval = {"se": se_test, "dof": float("inf"), "lo": per_seed[0]["lo"], "hi": per_seed[0]["hi"]}
    return {"metric": "auroc", "seeds": [r.seed for r in runs], "per_seed": per_seed, "mean": mean,
            "se_test": se_test, "seed_sd": seed_sd, **interval,
            "min_detectable": metrics.min_detectable_difference(interval["se"], alpha),
            "same_sign": bool(np.all(diffs > 0) or np.all(diffs < 0)),
            "verdict": verdict(diffs, interval["lo"], interval["hi"]),
            "interval_method": "mean +/- t * sqrt(patient-bootstrap variance of the seed mean + between-seed "
                               "variance / N), Welch-Satterthwaite degrees of freedom"}


# --------------------------------------------------------------------------- net benefit
DECISION_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def net_benefit(y: Iterable[int], prob: Iterable[float], threshold: float) -> float:
    """Net benefit of treating the images with ``prob >= threshold``:
    TP/n - FP/n * pt / (1 - pt) (Vickers & Elkin 2006)."""
    yy, p = np.asarray(y, int), np.asarray(prob, float)
    pos = p >= threshold
    n = max(yy.size, 1)
    tp, fp = int(np.sum(pos & (yy == 1))), int(np.sum(pos & (yy == 0)))
    return tp / n - fp / n * threshold / (1 - threshold)


def decision_curve(y: Iterable[int], probs: Mapping[str, np.ndarray],
                   thresholds: Iterable[float] = DECISION_THRESHOLDS) -> dict[str, list[float]]:
    """Net benefit over threshold probabilities per system, plus treat-all and treat-none."""
    yy = np.asarray(y, int)
    ts = [float(t) for t in thresholds]
    prev = float(yy.mean()) if yy.size else float("nan")
    curve: dict[str, list[float]] = {"threshold": ts}
    for name, p in probs.items():
        curve[name] = [net_benefit(yy, p, t) for t in ts]
    curve["treat_all"] = [prev - (1 - prev) * t / (1 - t) for t in ts]
    curve["treat_none"] = [0.0] * len(ts)
    return curve
