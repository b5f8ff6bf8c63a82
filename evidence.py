"""What the evaluation may conclude: which pooled system has the routed system's training
budget (its equal-budget control), routing against that control over several training seeds,
and clinical utility (net benefit). No rendering here; conclusion.py words it.

Like with like: each model's checkpoint records where its weights started, the epochs it ran
and the images it saw. Two systems have the same budget when they share the start, the
schedule and epoch cap, and the number of training images within :data:`IMAGES_TOLERANCE`.

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
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

import inference
import metrics
import systems

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
                 boot: metrics.BootstrapSpec) -> dict[str, object]:
    """Per-seed AUROC differences (routed - control) with their own patient-bootstrap
    intervals, their mean, the interval for the mean over test sample and training, the
    smallest detectable difference (both sources) and the verdict."""
    alpha = boot.alpha
    probs = [p for r in runs for p in (r.routed, r.control)]
    samples = metrics.bootstrap_samples(y, probs, [0.5] * len(probs), patients, boot.n_boot, boot.seed)
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


# --------------------------------------------------------------------------- training budgets
# The training settings that must agree for two systems to have the same training budget.
SCHEDULE_KEYS = ("model", "img_size", "epochs", "lr", "scheduler", "warmup_epochs", "batch_size",
                 "sampler", "loss", "focal_alpha", "focal_gamma", "weight_decay")
# Images seen in training may differ this much (relative) and still count as the same budget:
# the class-balanced sampler draws one epoch of rows per epoch, and early stopping and dropped
# last batches move the totals a little.
IMAGES_TOLERANCE = 0.10


def count_text(n: Any) -> str:
    """``12,345``, or "not recorded" for None."""
    return f"{int(n):,}" if n is not None else "not recorded"


def describe_init(init: Mapping[str, Any] | None) -> str:
    """Where a model's weights started, in words."""
    if not init:
        return "an unrecorded start"
    kind = init.get("kind")
    if kind == "random":
        return f"random weights (seed {init.get('seed')})"
    if kind == "pretrained":
        return f"pretrained weights ({init.get('source')})"
    if kind == "checkpoint":
        return (f"{init.get('checkpoint')} ({init.get('epochs_run')} epochs, "
                f"{count_text(init.get('images_seen'))} training images)")
    return str(dict(init))


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
    """Per system family (``routed`` for the routed systems, then each pooled one): its
    models' budgets and the images they saw in training (None if a model did not record it)."""
    serving = list({id(m): m for m in (routed.model_for_group(g) for g in range(routed.n_groups))}.values())
    budgets = {"routed": {"models": [model_budget(m) for m in serving],
                          "groups_served_by_pooled": [g for g in range(routed.n_groups)
                                                      if routed.model_for_group(g) is routed.pooled]}}
    for key in systems.POOLED_MODELS:
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
        ours, theirs = describe_init(routed_budget["init"]), describe_init(other["init"])
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
           for key in systems.REFERENCES if key in budgets}
    reference = next((key for key, reasons in why.items() if not reasons), None)
    return reference, why
