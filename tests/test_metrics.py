"""Metrics agree with scikit-learn, the patient bootstrap is seeded and sensible, and the
operating threshold comes from validation data."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

import metrics

# fixed, hand-checkable input: 10 images, ties in the scores on purpose
Y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.6, 0.2, 0.4, 0.7])


def _data(n_pat: int = 60, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    """Patients with 1-4 images each; probability informative of the label."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_pat)
    pid = np.repeat([f"p{i:03d}" for i in range(n_pat)], per)
    y = rng.integers(0, 2, pid.size)
    prob = np.clip(0.35 * y + 0.65 * rng.random(pid.size) + shift, 0, 1)
    return pd.DataFrame({"patient_id": pid, "y": y, "prob": prob})


def test_binary_metrics_match_sklearn():
    m = metrics.binary_metrics(Y, P, threshold=0.4)
    pred = (P >= 0.4).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, pred))
    assert m["f1"] == pytest.approx(f1_score(Y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(Y, pred))
    assert m["specificity"] == pytest.approx(recall_score(Y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(precision_score(Y, pred))
    assert m["npv"] == pytest.approx(precision_score(Y, pred, pos_label=0))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert m["auprc"] == pytest.approx(average_precision_score(Y, P))
    assert m["confusion_matrix"] == confusion_matrix(Y, pred).tolist()
    # by hand: predicted positive at >= 0.4: images 1,3,4,5,6,8,9
    tn, fp, fn, tp = 2, 3, 1, 4
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["n"] == 10 and m["prevalence"] == pytest.approx(0.5)


def test_single_class_gives_nan_not_crash():
    m = metrics.binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], threshold=0.5)
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"]) and np.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]


def test_weighted_metrics_equal_sklearn_on_duplicated_rows():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    p = np.round(rng.random(80), 1)  # many ties
    w = rng.integers(0, 4, size=(4, 80))
    vec = metrics.weighted_binary_metrics(y, p, 0.5, w)
    for b in range(4):
        idx = np.repeat(np.arange(80), w[b])
        ref = metrics.binary_metrics(y[idx], p[idx], 0.5)
        for k in metrics.BINARY_METRICS:
            assert vec[k][b] == pytest.approx(ref[k], nan_ok=True), k


def test_bootstrap_deterministic_and_contains_point():
    df = _data()
    a = metrics.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, metrics.BootstrapSpec(300, 7))
    b = metrics.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, metrics.BootstrapSpec(300, 7))
    c = metrics.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, metrics.BootstrapSpec(300, 8))
    assert a["ci"] == b["ci"]
    assert a["ci"]["auroc"] != c["ci"]["auroc"]
    for k in ("accuracy", "f1", "sensitivity", "specificity", "auroc", "auprc"):
        lo, hi = a["ci"][k]
        assert lo <= a[k] <= hi, k
        assert hi - lo > 0, k
    assert a["n_patients"] == df.patient_id.nunique()


def test_generic_bootstrap_resamples_whole_patients():
    df = _data(n_pat=30)
    seen = []

    def metric(rows: pd.DataFrame) -> float:
        seen.append(rows)
        return roc_auc_score(rows.y, rows.prob) if rows.y.nunique() == 2 else float("nan")

    point, lo, hi = metrics.patient_bootstrap_ci(df, metric, n_boot=50, seed=1)
    assert point == pytest.approx(roc_auc_score(df.y, df.prob))
    assert lo <= point <= hi
    sizes = df.groupby("patient_id").size()
    for rows in seen[1:]:
        # every drawn patient brings all its images (a multiple of its image count)
        counts = rows.groupby("patient_id").size()
        assert ((counts % sizes[counts.index]) == 0).all()
        assert rows.patient_id.nunique() <= 30
    # same seed, same interval; generic and vectorised paths draw the same resamples
    assert metrics.patient_bootstrap_ci(df, metric, n_boot=50, seed=1) == (point, lo, hi)
    fast = metrics.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, metrics.BootstrapSpec(50, 1))
    assert fast["ci"]["auroc"] == pytest.approx([lo, hi])


def test_youden_picks_max_of_tpr_minus_fpr():
    df = _data(n_pat=50, seed=2)
    t = metrics.choose_threshold(df.y, df.prob, "youden")
    fpr, tpr, thr = roc_curve(df.y, df.prob, drop_intermediate=False)
    j = tpr - fpr
    assert t == pytest.approx(thr[np.argmax(j)])
    pred = df.prob >= t
    sens = (pred & (df.y == 1)).sum() / (df.y == 1).sum()
    spec = (~pred & (df.y == 0)).sum() / (df.y == 0).sum()
    assert sens + spec - 1 == pytest.approx(j.max())


def test_sensitivity_target_threshold():
    df = _data(n_pat=50, seed=4)
    t = metrics.choose_threshold(df.y, df.prob, "sensitivity", target_sensitivity=0.95)
    m = metrics.binary_metrics(df.y, df.prob, t)
    assert m["sensitivity"] >= 0.95
    # the next higher score as threshold falls below the target: t is the highest such
    higher = np.sort(df.prob[df.prob > t].unique())
    if higher.size:
        assert metrics.binary_metrics(df.y, df.prob, higher[0])["sensitivity"] < 0.95
    with pytest.raises(ValueError):
        metrics.choose_threshold([1, 1], [0.2, 0.3])


def threshold_from_validation(val_y: Sequence[int], val_prob: Sequence[float], test_y: Sequence[int],
                              test_prob: Sequence[float]) -> tuple[float, dict[str, Any]]:
    """The threshold chosen on validation data, and the test metrics at it, unchanged."""
    thr = metrics.choose_threshold(val_y, val_prob)
    return thr, metrics.binary_metrics(test_y, test_prob, thr)


def test_threshold_comes_from_validation_not_test():
    val = _data(n_pat=60, seed=10)
    test = _data(n_pat=60, seed=11, shift=0.25)  # shifted scores: its own optimum differs
    t_val = metrics.choose_threshold(val.y, val.prob)
    t_test = metrics.choose_threshold(test.y, test.prob)
    assert t_val != pytest.approx(t_test)
    thr, test_metrics = threshold_from_validation(val.y, val.prob, test.y, test.prob)
    assert thr == pytest.approx(t_val)
    assert test_metrics["threshold"] == pytest.approx(t_val)
    assert test_metrics["f1"] == pytest.approx(metrics.binary_metrics(test.y, test.prob, t_val)["f1"])


def test_paired_difference_of_a_system_with_itself_is_zero():
    df = _data()
    d = metrics.paired_bootstrap_difference(df.y, [df.prob, df.prob], [0.5, 0.5], df.patient_id,
                                            metrics.BootstrapSpec(100, 0))
    assert d["auroc"]["diff"] == 0 and d["auroc"]["lo"] == 0 and d["auroc"]["hi"] == 0


def test_multiclass_summary():
    yt = [0, 0, 1, 1, 1, 2, 2, 2]
    yp = [0, 1, 1, 1, 2, 2, 2, 0]
    s = metrics.multiclass_summary(yt, yp, names=("a", "b", "c"))
    assert s["confusion_matrix"] == confusion_matrix(yt, yp).tolist()
    assert s["macro_f1"] == pytest.approx(f1_score(yt, yp, average="macro"))
    assert s["classification_report"]["b"]["recall"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- evidence helpers
def test_study_aggregation_on_a_hand_made_table():
    images = pd.DataFrame({
        "patient_id":   ["a", "a", "a", "b", "b", "c"],
        "study_number": [1, 1, 2, 1, 1, 1],
        "fracture":     [0, 1, 0, 0, 0, 1],
        "prob":         [0.2, 0.6, 0.3, 0.1, 0.5, 0.9],
        "group":        [1, 1, 2, 0, 2, 1],
    })
    most = metrics.aggregate_studies(images, ["prob"], "max", group_cols=["group"])
    assert most[["patient_id", "study_number"]].values.tolist() == [["a", 1], ["a", 2], ["b", 1], ["c", 1]]
    assert most["prob"].tolist() == [0.6, 0.3, 0.5, 0.9]
    assert most["fracture"].tolist() == [1, 0, 0, 1]  # positive if any image is
    assert most["n_images"].tolist() == [2, 1, 2, 1]
    assert most["group"].tolist() == [1, 2, 0, 1]  # b's tie 0/2 -> the smaller group
    mean = metrics.aggregate_studies(images, ["prob"], "mean")
    np.testing.assert_allclose(mean["prob"], [0.4, 0.3, 0.3, 0.9])
    # without a study column every patient is one study
    per_patient = metrics.aggregate_studies(images, ["prob"], "max", study_cols=["patient_id"])
    assert per_patient["prob"].tolist() == [0.6, 0.5, 0.9] and per_patient["fracture"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="median"):
        metrics.aggregate_studies(images, ["prob"], "median")


def test_per_group_thresholds_follow_each_group_models_scores():
    rng = np.random.default_rng(3)
    n = 600
    group = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n)
    # the same separation in every group, around a different centre: group 2's model scores high
    prob = np.clip(np.array([0.2, 0.45, 0.7])[group] + 0.2 * (y - 0.5) + rng.normal(0, 0.05, n), 0, 1)
    single = metrics.choose_threshold(y, prob)
    per, fell_back = metrics.choose_group_thresholds(y, prob, group, 3, fallback=single)
    assert fell_back == []
    assert per[0] < per[1] < per[2]
    for g, centre in enumerate((0.2, 0.45, 0.7)):
        assert abs(per[g] - centre) < 0.1
    rows = metrics.per_row_thresholds(group, per)
    assert metrics.binary_metrics(y, prob, rows)["accuracy"] > metrics.binary_metrics(y, prob, single)["accuracy"] + 0.1
    # a group whose validation rows hold one class keeps the single threshold, and says so
    y_one = np.where(group == 1, 1, y)
    per, fell_back = metrics.choose_group_thresholds(y_one, prob, group, 3, fallback=0.5)
    assert fell_back == [1] and per[1] == 0.5


def test_temperature_fit_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits three times too large
    t = metrics.fit_temperature(y, overconfident)
    assert 2.5 < t < 3.5
    before = metrics.expected_calibration_error(y, overconfident)
    after = metrics.expected_calibration_error(y, metrics.apply_temperature(overconfident, t))
    assert after < before / 2
    # scaling never reorders: AUROC is unchanged
    assert roc_auc_score(y, metrics.apply_temperature(overconfident, t)) == pytest.approx(roc_auc_score(y, overconfident))
    # multi-class: softmax probabilities from logits twice too large
    logits = rng.normal(0, 2, (3000, 3))
    labels = np.array([rng.choice(3, p=np.exp(l) / np.exp(l).sum()) for l in logits])
    sharp = np.exp(2 * logits) / np.exp(2 * logits).sum(1, keepdims=True)
    t3 = metrics.fit_temperature(labels, sharp)
    assert 1.6 < t3 < 2.4
    assert metrics.top_label_calibration_error(labels, metrics.apply_temperature(sharp, t3)) < \
        metrics.top_label_calibration_error(labels, sharp)


def test_expected_calibration_error_by_hand():
    # bin [0.1, 0.2): p 0.15, 0.15, observed 1 of 2 -> |0.5 - 0.15| * 2; bin [0.9, 1]: p 0.95, observed 1
    y = [0, 1, 1]
    p = [0.15, 0.15, 0.95]
    assert metrics.expected_calibration_error(y, p, n_bins=10) == pytest.approx((2 * 0.35 + 0.05) / 3)


def test_min_detectable_difference_from_the_bootstrap_spread():
    df = _data(n_pat=80, seed=4)
    other = np.clip(df.prob + np.random.default_rng(1).normal(0, 0.1, len(df)), 0, 1)
    d = metrics.paired_bootstrap_difference(df.y, [df.prob, other], [0.5, 0.5], df.patient_id,
                                            metrics.BootstrapSpec(300, 0))
    se = d["auroc"]["se"]
    assert se > 0
    assert metrics.min_detectable_difference(se) == pytest.approx(2.8016 * se, rel=1e-3)
    # a bigger test set (each patient twice, as distinct patients) narrows it
    twice = pd.concat([df, df.assign(patient_id=df.patient_id + "b")])
    d2 = metrics.paired_bootstrap_difference(twice.y, [twice.prob, np.concatenate([other, other])], [0.5, 0.5],
                                             twice.patient_id, metrics.BootstrapSpec(300, 0))
    assert d2["auroc"]["se"] < se


def test_patient_bootstrap_gives_all_images_of_a_patient_the_same_weight():
    rng = np.random.default_rng(5)
    per = rng.integers(1, 6, 25)
    pid = np.repeat([f"p{i}" for i in range(25)], per).astype(object)
    pid[::3] = [p + " " for p in pid[::3]]  # a stray space: still the same patient
    df = pd.DataFrame({"patient_id": pid, "image": np.arange(pid.size), "y": rng.integers(0, 2, pid.size),
                       "prob": rng.random(pid.size)})
    patients = pd.Series(pid).str.strip()
    groups = [np.asarray(idx) for idx in patients.groupby(patients).groups.values()]
    resampled = []

    def metric(rows: pd.DataFrame) -> float:
        resampled.append(rows)
        return 0.5

    n_boot = 30
    metrics.patient_bootstrap_ci(df, metric, n_boot=n_boot, seed=3)
    assert len(resampled) == n_boot + 1  # the point estimate, then the resamples
    vec = metrics.bootstrap_samples(df.y, [df.prob], [0.5], df.patient_id, n_boot=n_boot, seed=3)[0]
    for b, rows in enumerate(resampled[1:]):
        weight = np.bincount(rows.image, minlength=len(df))
        for idx in groups:
            assert len(set(weight[idx])) == 1, (b, idx, weight[idx])  # one weight per patient
        assert sum(weight[idx[0]] for idx in groups) == len(groups)  # 25 patients drawn per resample
        # the vectorised path weights images exactly so: its metrics equal those of these rows
        ref = metrics.binary_metrics(rows.y, rows.prob, 0.5)
        for k in metrics.BINARY_METRICS:
            assert vec[k][b] == pytest.approx(ref[k], nan_ok=True), (b, k)
