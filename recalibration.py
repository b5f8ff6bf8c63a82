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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import scipy.optimize
import scipy.special
import sklearn.model_selection

import calibration
import metrics

METHODS = ("temperature", "prior", "platt")
# The class-balanced sampler draws each class equally often: the prevalence the models train at.
BALANCED_PREVALENCE = 0.5
_EPS = 1e-7
CV_FOLDS = 5


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
