"""Recalibration of binary fracture probabilities, and how well probabilities are calibrated.

Every recalibration here is one map on the logit, ``p_cal = sigmoid(a * logit(p) + b)``:

  temperature   a = 1 / T, b = 0 (rescales confidence; cannot move the base rate)
  prior         a = 1, b = logit(prevalence seen) - logit(prevalence trained at): removes the
                prior shift of a class-balanced sampler, which trains at 50 % fractures
  platt         a and b fitted by logistic regression of the label on logit(p)

All are fitted on validation only. Platt nests the other two, so it always wins on the data
it was fitted to; :func:`choose_method` therefore compares the methods by their
cross-validated log loss over patient folds of the validation set, and the winner is refitted
on all of it. Calibration slope and intercept (:func:`slope_intercept`) are the usual
logistic recalibration summaries (Van Calster et al. 2019): slope of ``y ~ logit(p)``, and
the intercept of ``y ~ offset(logit(p))`` (calibration-in-the-large).

Stage 5 (:func:`calibrate`) fits and chooses the recalibration of every model on its
validation rows and reports each system's calibration on test before and after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.optimize
import scipy.special
import sklearn.model_selection

import calibration
import inference
import metrics
import systems

METHODS = ("temperature", "prior", "platt")
# The class-balanced sampler draws each class equally often: the prevalence the models train at.
BALANCED_PREVALENCE = 0.5
_EPS = 1e-7
CV_FOLDS = 5
ECE_BINS = 10  # equal-width bins of the expected calibration error


# The map and the logit are calibration.py's, the ones predict.py applies.
logit = calibration.logit
apply = calibration.apply_binary


def log_loss(y: Iterable[int], prob: Iterable[float]) -> float:
    """Mean negative log-likelihood of binary labels."""
    yy = np.asarray(y, float)
    p = np.clip(np.asarray(prob, float), _EPS, 1 - _EPS)
    return float(-np.mean(yy * np.log(p) + (1 - yy) * np.log1p(-p)))


def _fit_logistic(y: np.ndarray, z: np.ndarray, fit_slope: bool, fit_intercept: bool) -> tuple[float, float]:
    """Unpenalised maximum likelihood of ``y ~ a * z + b`` with a or b held at 1 or 0."""
    def nll(theta: np.ndarray) -> float:
        a = theta[0] if fit_slope else 1.0
        b = theta[-1] if fit_intercept else 0.0
        s = a * z + b
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    start = np.array([1.0] * fit_slope + [0.0] * fit_intercept)
    res = scipy.optimize.minimize(nll, start, method="BFGS", options={"gtol": 1e-9})
    theta = res.x
    return (float(theta[0]) if fit_slope else 1.0), (float(theta[-1]) if fit_intercept else 0.0)


def _one_class(y: np.ndarray) -> bool:
    return not 0 < y.sum() < y.size


def fit(method: str, y: Iterable[int], prob: Iterable[float],
        trained_prevalence: float = BALANCED_PREVALENCE) -> dict[str, float]:
    """The ``{"a", "b"}`` of ``method`` fitted on ``y``/``prob`` (identity for one class)."""
    yy, z = np.asarray(y, float), logit(prob)
    if _one_class(yy):
        return {"a": 1.0, "b": 0.0}
    if method == "temperature":
        # bounded to T in [0.05, 20]: a temperature never reverses the ranking
        return {"a": 1.0 / metrics.fit_temperature(yy.astype(int), prob), "b": 0.0}
    if method == "prior":
        return {"a": 1.0, "b": float(scipy.special.logit(yy.mean()) - scipy.special.logit(trained_prevalence))}
    if method == "platt":
        a, b = _fit_logistic(yy, z, fit_slope=True, fit_intercept=True)
        return {"a": a, "b": b}
    raise ValueError(f"unknown recalibration method {method!r}; one of {METHODS}")


def cross_validated_log_loss(method: str, y: np.ndarray, prob: np.ndarray, groups: np.ndarray,
                             trained_prevalence: float = BALANCED_PREVALENCE) -> float:
    """Log loss of ``method`` on held-out patient folds (each fold fitted on the others)."""
    n_folds = min(CV_FOLDS, len(np.unique(groups)))
    if n_folds < 2:
        return float("nan")
    out = np.empty(len(y))
    for train, held in sklearn.model_selection.GroupKFold(n_splits=n_folds).split(prob, y, groups):
        out[held] = apply(prob[held], fit(method, y[train], prob[train], trained_prevalence))
    return log_loss(y, out)


@dataclass
class Choice:
    """The method chosen on validation, its parameters refitted on all validation rows, and
    every method's parameters and cross-validated log loss."""

    method: str
    params: dict[str, float]
    candidates: dict[str, dict[str, float]]
    cv_log_loss: dict[str, float]


def choose_method(y: Iterable[int], prob: Iterable[float], groups: Iterable[object],
                  trained_prevalence: float = BALANCED_PREVALENCE) -> Choice:
    """Fit every method on validation; choose the lowest cross-validated log loss (ties and
    undefined losses go to the earlier, simpler method in :data:`METHODS`)."""
    yy, p = np.asarray(y, float), np.asarray(prob, float)
    g = np.asarray([str(x) for x in groups])
    candidates = {m: fit(m, yy, p, trained_prevalence) for m in METHODS}
    losses = {m: (cross_validated_log_loss(m, yy, p, g, trained_prevalence) if not _one_class(yy)
                  else float("nan")) for m in METHODS}
    finite = {m: v for m, v in losses.items() if np.isfinite(v)}
    best = min(finite, key=lambda m: (finite[m], METHODS.index(m))) if finite else METHODS[0]
    return Choice(method=best, params=candidates[best], candidates=candidates, cv_log_loss=losses)


def slope_intercept(y: Iterable[int], prob: Iterable[float]) -> dict[str, float]:
    """Calibration slope (of ``y ~ logit(p)``; 1 is ideal, < 1 over-confident) and
    calibration-in-the-large (the intercept of ``y ~ offset(logit(p))``; 0 is ideal, > 0
    under-predicts). NaN for one class."""
    yy, z = np.asarray(y, float), logit(prob)
    if _one_class(yy):
        return {"slope": float("nan"), "intercept": float("nan")}
    slope, _ = _fit_logistic(yy, z, fit_slope=True, fit_intercept=True)
    _, intercept = _fit_logistic(yy, z, fit_slope=False, fit_intercept=True)
    return {"slope": slope, "intercept": intercept}


# --------------------------------------------------------------------------- per model, stage 5
METHOD_NAMES = {"temperature": "temperature scaling", "prior": "prior-shift correction",
                "platt": "Platt (logistic) recalibration"}


def _recalibrated(inf: Mapping[str, Any], params: Mapping[str, Mapping[str, float]], n_groups: int,
                  age_temperature: float) -> dict[str, Any]:
    """The models' outputs (:func:`evaluate.infer`) with each model's probabilities mapped by
    its ``{"a", "b"}``."""
    return {
        "age_probs": calibration.apply_calibration({"models": {calibration.AGE_KEY: {"a": 1.0 / age_temperature}}},
                                                   calibration.AGE_KEY, inf["age_probs"]),
        "group_probs": np.stack([calibration.apply_binary(inf["group_probs"][:, g], params[f"agegroup{g}"])
                                 for g in range(n_groups)], 1),
        **{key: calibration.apply_binary(inf[key], params[key])
           for key in systems.POOLED_MODELS if inf.get(key) is not None},
    }


def _model_rows(val: systems.Split, n_groups: int) -> dict[str, np.ndarray]:
    """Each fracture model's validation rows: a group's model those routed to it (the images
    it decides in hard routing), the pooled models all."""
    pred = val.inf["age_probs"].argmax(1)
    rows = {f"agegroup{g}": pred == g for g in range(n_groups)}
    for key in systems.POOLED_MODELS:
        if val.inf.get(key) is not None:
            rows[key] = np.ones(len(val.y), bool)
    return rows


def _model_probs(inf: Mapping[str, Any], key: str) -> np.ndarray:
    return inf["group_probs"][:, int(key.removeprefix("agegroup"))] if key.startswith("agegroup") else inf[key]


def calibration_summary(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """ECE, Brier, calibration slope and intercept of one set of probabilities."""
    return {"ece": metrics.expected_calibration_error(y, prob, ECE_BINS),
            "brier": float(np.mean((prob - y) ** 2)), **slope_intercept(y, prob)}


def calibrate(val: systems.Split, test: systems.Split, routed: inference.RoutedModels
              ) -> tuple[dict[str, Any], systems.SplitOutputs, dict[str, systems.SplitOutputs]]:
    """Recalibration per model, fitted on validation, applied to test.

    Per fracture model three maps of the logit (METHODS: temperature, prior-shift
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
        choices[key] = choose_method(val.y[rows], _model_probs(val.inf, key)[rows], patients[rows])
    chosen = {"age_classifier": "temperature", **{k: c.method for k, c in choices.items()}}
    params = {"age_classifier": {"a": 1.0 / age_t, "b": 0.0}, **{k: c.params for k, c in choices.items()}}
    outputs = {m: systems.system_probs(_recalibrated(test.inf, {k: c.candidates[m] for k, c in choices.items()},
                                                     routed.n_groups, age_t), test.true_group)
               for m in METHODS}
    after = systems.system_probs(_recalibrated(test.inf, params, routed.n_groups, age_t), test.true_group)
    per_system = {}
    for s, prob in test.out.prob.items():
        per_system[s] = {"before": calibration_summary(test.y, prob),
                          **{m: calibration_summary(test.y, outputs[m].prob[s]) for m in METHODS},
                          "chosen": calibration_summary(test.y, after.prob[s])}
        # the keys the report and older readers use
        per_system[s].update(ece_before=per_system[s]["before"]["ece"], ece_after=per_system[s]["chosen"]["ece"],
                             brier_before=per_system[s]["before"]["brier"],
                             brier_after=per_system[s]["chosen"]["brier"])
    age = {"ece_before": metrics.top_label_calibration_error(test.true_group, test.inf["age_probs"], ECE_BINS),
           "ece_after": metrics.top_label_calibration_error(
               test.true_group, metrics.apply_temperature(test.inf["age_probs"], age_t), ECE_BINS)}
    result = {"method": "per model the best of temperature scaling, prior-shift correction and Platt recalibration "
                        "(lowest cross-validated log loss over patient folds of validation), fitted on validation",
              "form": "calibrated = sigmoid(a * logit(p_raw) + b)", "n_bins": ECE_BINS,
              "chosen": chosen, "params": params,
              "candidates": {k: c.candidates for k, c in choices.items()},
              "cv_log_loss": {k: c.cv_log_loss for k, c in choices.items()},
              "temperatures": {"age_classifier": age_t,
                               **{k: 1.0 / c.candidates["temperature"]["a"] for k, c in choices.items()}},
              "systems": per_system, "age_classifier": age}
    return result, after, outputs
