"""Metrics agree with scikit-learn, the patient bootstrap is seeded and sensible, and the
operating threshold comes from validation data."""
from __future__ import annotations

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

import metrics as M

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
    m = M.binary_metrics(Y, P, threshold=0.4)
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
    m = M.binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], threshold=0.5)
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"]) and np.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]


def test_weighted_metrics_equal_sklearn_on_duplicated_rows():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    p = np.round(rng.random(80), 1)  # many ties
    w = rng.integers(0, 4, size=(4, 80))
    vec = M.weighted_binary_metrics(y, p, 0.5, w)
    for b in range(4):
        idx = np.repeat(np.arange(80), w[b])
        ref = M.binary_metrics(y[idx], p[idx], 0.5)
        for k in M.BINARY_METRICS:
            assert vec[k][b] == pytest.approx(ref[k], nan_ok=True), k


def test_bootstrap_deterministic_and_contains_point():
    df = _data()
    a = M.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, n_boot=300, seed=7)
    b = M.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, n_boot=300, seed=7)
    c = M.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, n_boot=300, seed=8)
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

    point, lo, hi = M.patient_bootstrap_ci(df, metric, n_boot=50, seed=1)
    assert point == pytest.approx(roc_auc_score(df.y, df.prob))
    assert lo <= point <= hi
    sizes = df.groupby("patient_id").size()
    for rows in seen[1:]:
        # every drawn patient brings all its images (a multiple of its image count)
        counts = rows.groupby("patient_id").size()
        assert ((counts % sizes[counts.index]) == 0).all()
        assert rows.patient_id.nunique() <= 30
    # same seed, same interval; generic and vectorised paths draw the same resamples
    assert M.patient_bootstrap_ci(df, metric, n_boot=50, seed=1) == (point, lo, hi)
    fast = M.bootstrap_binary_metrics(df.y, df.prob, df.patient_id, 0.5, n_boot=50, seed=1)
    assert fast["ci"]["auroc"] == pytest.approx([lo, hi])


def test_youden_picks_max_of_tpr_minus_fpr():
    df = _data(n_pat=50, seed=2)
    t = M.choose_threshold(df.y, df.prob, "youden")
    fpr, tpr, thr = roc_curve(df.y, df.prob, drop_intermediate=False)
    j = tpr - fpr
    assert t == pytest.approx(thr[np.argmax(j)])
    pred = df.prob >= t
    sens = (pred & (df.y == 1)).sum() / (df.y == 1).sum()
    spec = (~pred & (df.y == 0)).sum() / (df.y == 0).sum()
    assert sens + spec - 1 == pytest.approx(j.max())


def test_sensitivity_target_threshold():
    df = _data(n_pat=50, seed=4)
    t = M.choose_threshold(df.y, df.prob, "sensitivity", target_sensitivity=0.95)
    m = M.binary_metrics(df.y, df.prob, t)
    assert m["sensitivity"] >= 0.95
    # the next higher score as threshold falls below the target: t is the highest such
    higher = np.sort(df.prob[df.prob > t].unique())
    if higher.size:
        assert M.binary_metrics(df.y, df.prob, higher[0])["sensitivity"] < 0.95
    with pytest.raises(ValueError):
        M.choose_threshold([1, 1], [0.2, 0.3])


def test_threshold_comes_from_validation_not_test():
    val = _data(n_pat=60, seed=10)
    test = _data(n_pat=60, seed=11, shift=0.25)  # shifted scores: its own optimum differs
    t_val = M.choose_threshold(val.y, val.prob)
    t_test = M.choose_threshold(test.y, test.prob)
    assert t_val != pytest.approx(t_test)
    # the evaluation's helper applies the validation threshold unchanged to test
    import evaluate

    thr, test_metrics = evaluate.threshold_from_validation(
        val.y, val.prob, test.y, test.prob, method="youden")
    assert thr == pytest.approx(t_val)
    assert test_metrics["threshold"] == pytest.approx(t_val)
    assert test_metrics["f1"] == pytest.approx(M.binary_metrics(test.y, test.prob, t_val)["f1"])


def test_paired_difference_of_a_system_with_itself_is_zero():
    df = _data()
    d = M.paired_bootstrap_difference(df.y, df.prob, df.prob, df.patient_id, 0.5, 0.5,
                                      n_boot=100, seed=0)
    assert d["auroc"]["diff"] == 0 and d["auroc"]["lo"] == 0 and d["auroc"]["hi"] == 0


def test_multiclass_summary():
    yt = [0, 0, 1, 1, 1, 2, 2, 2]
    yp = [0, 1, 1, 1, 2, 2, 2, 0]
    s = M.multiclass_summary(yt, yp, names=("a", "b", "c"))
    assert s["confusion_matrix"] == confusion_matrix(yt, yp).tolist()
    assert s["macro_f1"] == pytest.approx(f1_score(yt, yp, average="macro"))
    assert s["classification_report"]["b"]["recall"] == pytest.approx(2 / 3)


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
    M.patient_bootstrap_ci(df, metric, n_boot=n_boot, seed=3)
    assert len(resampled) == n_boot + 1  # the point estimate, then the resamples
    vec = M.bootstrap_samples(df.y, [df.prob], [0.5], df.patient_id, n_boot=n_boot, seed=3)[0]
    for b, rows in enumerate(resampled[1:]):
        weight = np.bincount(rows.image, minlength=len(df))
        for idx in groups:
            assert len(set(weight[idx])) == 1, (b, idx, weight[idx])  # one weight per patient
        assert sum(weight[idx[0]] for idx in groups) == len(groups)  # 25 patients drawn per resample
        # the vectorised path weights images exactly so: its metrics equal those of these rows
        ref = M.binary_metrics(rows.y, rows.prob, 0.5)
        for k in M.BINARY_METRICS:
            assert vec[k][b] == pytest.approx(ref[k], nan_ok=True), (b, k)
