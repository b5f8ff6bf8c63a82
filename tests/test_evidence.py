"""The seed-aware verdict, net benefit and the recalibration methods, against hand
computations and scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
from sklearn.linear_model import LogisticRegression

import evidence
import metrics
import recalibration


# --------------------------------------------------------------------------- verdict
@pytest.mark.parametrize("diffs, lo, hi, expected", [
    ([-0.01, -0.03, -0.02], -0.04, -0.005, evidence.HURT),        # all agree, interval below 0
    ([0.02, 0.01, 0.03], 0.004, 0.035, evidence.HELPED),          # all agree, interval above 0
    ([-0.007, -0.037, -0.021], -0.05, 0.01, evidence.NO_EVIDENCE),  # agree, interval across 0
    ([-0.02, 0.01, -0.03], -0.04, -0.001, evidence.INCONSISTENT),  # interval below 0 but seeds disagree
    ([0.01, -0.01], -0.03, 0.03, evidence.INCONSISTENT),
    ([-0.02], -0.03, -0.01, evidence.ONE_SEED),                   # one seed never says helped/hurt
])
def test_verdict_on_hand_made_seed_results(diffs, lo, hi, expected):
    assert evidence.verdict(diffs, lo, hi) == expected


def test_combined_interval_adds_seed_spread_with_t_quantile():
    # Hand computation: se_test 0.01, seed sd 0.02 over 3 seeds -> seed var 0.0004/3.
    seed_var = 0.02 ** 2 / 3
    se = np.sqrt(0.01 ** 2 + seed_var)
    dof = se ** 4 / (seed_var ** 2 / 2)
    q = scipy.stats.t.ppf(0.975, dof)
    got = evidence.combined_interval(-0.02, 0.01, 0.02, 3, 0.05)
    assert got["se"] == pytest.approx(se)
    assert got["dof"] == pytest.approx(dof)
    assert got["lo"] == pytest.approx(-0.02 - q * se)
    assert got["hi"] == pytest.approx(-0.02 + q * se)
    # wider than the test bootstrap alone would be
    assert got["hi"] - got["lo"] > 2 * 1.96 * 0.01


def _toy_seed_runs(shifts, n_pat=120, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_pat), 2).astype(str)
    y = rng.integers(0, 2, patients.size)
    base = y + rng.normal(0, 0.8, y.size)
    runs = [evidence.SeedSystems(seed=k, routed=scipy.special.expit(base + s * y + rng.normal(0, 0.3, y.size)),
                                 control=scipy.special.expit(base + rng.normal(0, 0.3, y.size)))
            for k, s in enumerate(shifts)]
    return y, patients, runs


def test_across_seeds_reports_each_seed_and_a_consistent_gain():
    y, patients, runs = _toy_seed_runs([1.5, 1.5, 1.5])
    got = evidence.across_seeds(y, patients, runs, metrics.BootstrapSpec(200, 0, 0.05))
    assert [s["seed"] for s in got["per_seed"]] == [0, 1, 2]
    for s, run in zip(got["per_seed"], runs):
        a = metrics.binary_metrics(y, run.routed)["auroc"]
        b = metrics.binary_metrics(y, run.control)["auroc"]
        assert s["diff"] == pytest.approx(a - b)
    assert got["mean"] == pytest.approx(np.mean([s["diff"] for s in got["per_seed"]]))
    assert got["lo"] > 0 and got["verdict"] == evidence.HELPED
    assert got["min_detectable"] > 0


def test_across_seeds_one_seed_gives_no_verdict_word():
    y, patients, runs = _toy_seed_runs([1.5])
    got = evidence.across_seeds(y, patients, runs, metrics.BootstrapSpec(200, 0, 0.05))
    assert got["verdict"] == evidence.ONE_SEED
    assert got["lo"] == got["per_seed"][0]["lo"]


# --------------------------------------------------------------------------- net benefit
def test_net_benefit_matches_hand_computation():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.6, 0.55, 0.4, 0.65])
    # pt 0.5: predicted positive 0.9 0.8 0.7 0.6 0.55 0.65 -> TP 4 (0.9, 0.8, 0.55, 0.65), FP 2
    assert evidence.net_benefit(y, p, 0.5) == pytest.approx(4 / 10 - 2 / 10 * 1.0)
    # pt 0.25: positive all but 0.2 and 0.1 -> TP 5, FP 3; odds 1/3
    assert evidence.net_benefit(y, p, 0.25) == pytest.approx(5 / 10 - 3 / 10 * (0.25 / 0.75))
    curve = evidence.decision_curve(y, {"m": p}, [0.25, 0.5])
    assert curve["m"] == pytest.approx([5 / 10 - 0.1, 0.4 - 0.2])
    assert curve["treat_all"] == pytest.approx([0.5 - 0.5 / 3, 0.0])
    assert curve["treat_none"] == [0.0, 0.0]


# --------------------------------------------------------------------------- calibration
def test_slope_intercept_match_scikit_learn_logistic_regression():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 2000)
    y = rng.binomial(1, scipy.special.expit(0.6 * z + 0.4))
    p = scipy.special.expit(z)
    got = recalibration.slope_intercept(y, p)
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z[:, None], y)
    assert got["slope"] == pytest.approx(ref.coef_[0, 0], abs=1e-4)
    # calibration-in-the-large: with logit(p) as offset the fitted intercept solves the score
    # equation mean(sigmoid(z + b)) = mean(y)
    assert np.mean(scipy.special.expit(z + got["intercept"])) == pytest.approx(y.mean(), abs=1e-6)
    platt = recalibration.fit("platt", y, p)
    assert platt["a"] == pytest.approx(ref.coef_[0, 0], abs=1e-4)
    assert platt["b"] == pytest.approx(ref.intercept_[0], abs=1e-4)


def test_temperature_minimises_log_loss_on_a_grid():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, 1500)
    y = rng.binomial(1, scipy.special.expit(z / 2.5))
    p = scipy.special.expit(z)
    got = recalibration.fit("temperature", y, p)
    assert got["b"] == 0.0
    grid = np.linspace(1.0, 4.0, 301)
    best = grid[np.argmin([recalibration.log_loss(y, scipy.special.expit(z / t)) for t in grid])]
    assert 1 / got["a"] == pytest.approx(best, abs=0.02)
    # a model that ranks backwards still gets a positive temperature (ranking kept)
    assert recalibration.fit("temperature", 1 - y, p)["a"] > 0


def _balanced_toy(n, rng):
    y = rng.binomial(1, 0.65, n)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.2)[:, None]
    return x, y, np.repeat(np.arange(n // 2), 2)[:n]


def test_prior_shift_recalibration_lowers_ece_of_a_balanced_trained_toy():
    rng = np.random.default_rng(3)
    x_tr, y_tr, _ = _balanced_toy(3000, rng)
    x_val, y_val, g_val = _balanced_toy(1000, rng)
    x_te, y_te, _ = _balanced_toy(3000, rng)
    # class_weight="balanced" is the sampler's 50 % prior in the likelihood
    model = LogisticRegression(class_weight="balanced").fit(x_tr, y_tr)
    p_val, p_te = model.predict_proba(x_val)[:, 1], model.predict_proba(x_te)[:, 1]
    ece_raw = metrics.expected_calibration_error(y_te, p_te)
    prior = recalibration.fit("prior", y_val, p_val)
    assert prior["a"] == 1.0
    assert prior["b"] == pytest.approx(scipy.special.logit(y_val.mean()), abs=1e-9)
    ece_prior = metrics.expected_calibration_error(y_te, recalibration.apply(p_te, prior))
    temp = recalibration.fit("temperature", y_val, p_val)
    ece_temp = metrics.expected_calibration_error(y_te, recalibration.apply(p_te, temp))
    assert ece_raw > 0.05
    assert ece_prior < 0.5 * ece_raw
    assert ece_prior < ece_temp  # one temperature cannot move the base rate
    choice = recalibration.choose_method(y_val, p_val, g_val)
    assert choice.method in ("prior", "platt")
    assert set(choice.cv_log_loss) == set(recalibration.METHODS)
