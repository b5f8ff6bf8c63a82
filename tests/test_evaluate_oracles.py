"""Stage 5's scoring steps checked against answers derived independently.

Each test builds a small table by hand, runs one named step of ``evaluate.py`` (or the
whole scoring on hand-made model outputs), and compares with what scikit-learn, numpy or
a brute-force loop written here gives. The tables are made so that the plausible wrong
version of each step (thresholds chosen on test, subgroups by predicted group, images
instead of patients, differences the wrong way round, ...) gives a different number.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

import columns
import evaluate
import evidence
import inference
import metrics
import recalibration
import scoring
import systems
import test_evaluate  # its _probe_ckpt registers and saves the routing_probe_* models

NAMES = ("0-7 y", "8-14 y", "15-19 y")
AGES = (4.0, 11.0, 16.5)


# --------------------------------------------------------------------------- independent oracles
def youden_oracle(y: np.ndarray, p: np.ndarray) -> float:
    """Brute force: every distinct probability as a threshold (predict positive at p >= t);
    the largest sensitivity + specificity - 1, the highest threshold among ties."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    best_j, best_t = -np.inf, None
    for t in sorted(set(p.tolist()), reverse=True):
        pred = p >= t
        j = pred[y == 1].mean() - pred[y == 0].mean()
        if j > best_j + 1e-12:
            best_j, best_t = j, t
    return float(best_t)


def ece_oracle(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with a plain loop over equal-width bins."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (p >= lo) & ((p < hi) if b < n_bins - 1 else (p <= hi))
        if inside.any():
            total += inside.sum() * abs(y[inside].mean() - p[inside].mean())
    return total / len(y)


def scale_oracle(p: np.ndarray, t: float) -> np.ndarray:
    logit = np.log(p) - np.log1p(-p)
    return 1 / (1 + np.exp(-logit / t))


def temperature_oracle(y: np.ndarray, p: np.ndarray) -> float:
    """The temperature with the smallest mean log loss on a fine grid (all grid points at
    once; scikit-learn's log_loss agrees at the minimum)."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    scaled = np.clip(scale_oracle(p[None, :], grid[:, None]), 1e-15, 1 - 1e-15)
    losses = -(y * np.log(scaled) + (1 - y) * np.log1p(-scaled)).mean(1)
    best = int(np.argmin(losses))
    assert losses[best] == pytest.approx(log_loss(y, scaled[best], labels=[0, 1]))
    return float(grid[best])


# --------------------------------------------------------------------------- hand-made systems
def _lm(name: str, init: dict | None = None, images: int | None = 1000, **schedule) -> inference.LoadedModel:
    cfg = {"model": "cnn_demo", "img_size": 48, "epochs": 4, "lr": 0.002, "scheduler": "cosine",
           "warmup_epochs": 0, "batch_size": 32, "sampler": "balanced", "loss": "focal",
           "focal_alpha": 0.25, "focal_gamma": 2.0, "weight_decay": 0.05, **schedule}
    meta = {"init": init if init is not None else {"kind": "random", "seed": 42}, "images_seen": images,
            "epochs_run": 4, "epochs_max": 4, "epoch": 4, "config": cfg}
    return inference.LoadedModel(model=nn.Identity(), name=name, img_size=48, mean=0.5, std=0.25,
                                 num_classes=1, path=Path(f"{name}.pt"), meta=meta)


def _routed(control: bool = False) -> inference.RoutedModels:
    start = {"kind": "checkpoint", "checkpoint": "fracture_classifier_pooled.pt"}
    return inference.RoutedModels(
        age=_lm("age_classifier"), groups={g: _lm(f"agegroup{g}", start, 400) for g in range(3)},
        pooled=_lm("pooled", images=2000), age_bounds=(8.0, 15.0),
        pooled_continued=_lm("pooled_continued", start, 1200) if control else None)


def _split(rng: np.random.Generator, true: np.ndarray, pred: np.ndarray, patients: list[str],
           studies: list[int], y: np.ndarray, pooled: np.ndarray, control: bool = False) -> systems.Split:
    n = len(true)
    age_probs = np.full((n, 3), 0.1)
    age_probs[np.arange(n), pred] = 0.8
    group_probs = np.clip(rng.uniform(0.05, 0.95, (n, 3)) * 0.5 + 0.5 * y[:, None] * 0.9, 0.02, 0.98)
    inf = {"age_probs": age_probs, "group_probs": group_probs, "pooled": pooled,
           "pooled_continued": np.clip(pooled * 0.9 + 0.05, 0.01, 0.99) if control else None}
    df = pd.DataFrame({"image_path": [f"img{i}.png" for i in range(n)], "patient_id": patients,
                       "study_number": studies, "age": [AGES[g] for g in true], "age_group": true,
                       "fracture": y, "gender": ["M" if int(p[1:]) < 8 else "F" for p in patients]})
    return systems.Split(df, y, true, inf, systems.system_probs(inf, true))


def _table(seed: int, n_patients: int, misrouted: tuple[int, ...]) -> tuple:
    """Per patient two studies of two images; true group = patient % 3; the listed
    patients (all of true group 0) are predicted as group 1."""
    rng = np.random.default_rng(seed)
    true, pred, pats, studies = [], [], [], []
    for p in range(n_patients):
        for study in (1, 2):
            for _ in range(2):
                true.append(p % 3)
                pred.append(1 if p in misrouted else p % 3)
                pats.append(f"P{p}")
                studies.append(study)
    y = (rng.uniform(size=len(true)) < 0.45).astype(int)
    y[:2], y[2:4] = 1, 0  # both classes in every case
    return rng, np.array(true), np.array(pred), pats, studies, y


def _args(**kw) -> argparse.Namespace:
    base = {"target_sensitivity": None, "threshold_method": "youden", "n_boot": 30, "seed": 0, "alpha": 0.05,
            "study_col": "study_number"}
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def scored():
    """evaluate.score on hand-made validation and test outputs whose thresholds differ: the
    pooled model's probabilities are overconfident on validation and ranked differently on test."""
    rng, true, pred, pats, studies, y = _table(1, 12, ())
    val_pooled = np.where(y == 1, rng.uniform(0.35, 0.99, len(y)), rng.uniform(0.01, 0.6, len(y)))
    val = _split(rng, true, pred, pats, studies, y, val_pooled, control=True)
    rng, true, pred, pats, studies, y = _table(2, 12, (0, 3))
    test_pooled = np.where(y == 1, rng.uniform(0.2, 0.9, len(y)), rng.uniform(0.1, 0.7, len(y)))
    test = _split(rng, true, pred, pats, studies, y, test_pooled, control=True)
    routed = _routed(control=True)
    notes: list[str] = []
    result, extra = evaluate.score(_args(), routed, val, test, notes)
    return SimpleNamespace(result=result, extra=extra, val=val, test=test, routed=routed, notes=notes)


# --------------------------------------------------------------------------- thresholds
def test_image_thresholds_are_chosen_on_validation_only(scored):
    for s in ("hard", "soft", "oracle", "pooled", "pooled_continued"):
        on_val = youden_oracle(scored.val.y, scored.val.out.prob[s])
        on_test = youden_oracle(scored.test.y, scored.test.out.prob[s])
        assert scored.result["thresholds"][s]["value"] == pytest.approx(on_val), s
        assert scored.result["systems"][s]["threshold"] == pytest.approx(on_val), s
        if s == "pooled":
            assert abs(on_val - on_test) > 0.01  # choosing on test would show
    # the test metrics are those at the validation threshold
    t = scored.result["thresholds"]["pooled"]["value"]
    pred = scored.test.out.prob["pooled"] >= t
    tp = int((pred & (scored.test.y == 1)).sum())
    assert scored.result["systems"]["pooled"]["overall"]["sensitivity"] == pytest.approx(tp / scored.test.y.sum())


def test_per_group_thresholds_use_the_validation_rows_each_group_model_decided(scored):
    per = scored.result["thresholds"]["hard_per_group"]["values"]
    prob, group = scored.val.out.prob["hard"], scored.val.df["age_group"].to_numpy()  # val: routed = true
    for g in range(3):
        rows = group == g
        assert per[g] == pytest.approx(youden_oracle(scored.val.y[rows], prob[rows])), g


def _study_table(split: systems.Split, system: str) -> pd.DataFrame:
    frame = pd.DataFrame({"patient": split.df["patient_id"], "study": split.df["study_number"],
                          "y": split.y, "p": split.out.prob[system]})
    return frame.groupby(["patient", "study"], sort=False).agg(y=("y", "max"), p=("p", "max")).reset_index()


def test_study_thresholds_are_chosen_on_validation_studies(scored):
    agg = scored.result["study_level"]["aggregations"]["max"]
    assert agg["n_studies"] == 24 and agg["n_patients"] == 12  # two studies per patient
    assert scored.result["study_level"]["unit"] == "patient_id + study_number"
    for s in ("pooled", "hard"):
        val, test = _study_table(scored.val, s), _study_table(scored.test, s)
        on_val, on_test = youden_oracle(val.y, val.p), youden_oracle(test.y, test.p)
        assert agg["thresholds"][s]["value"] == pytest.approx(on_val), s
        if s == "pooled":
            assert abs(on_val - on_test) > 0.01
        assert agg["systems"][s]["auroc"] == pytest.approx(roc_auc_score(test.y, test.p)), s
        pred = test.p.to_numpy() >= on_val
        assert agg["systems"][s]["specificity"] == pytest.approx((~pred[test.y == 0]).mean()), s


def test_study_outputs_key_on_patient_and_study_number():
    df = pd.DataFrame({"patient_id": ["A", "A", "A", "A", "B", "B"], "study_number": [1, 1, 2, 2, 1, 1]})
    y = np.array([0, 0, 1, 0, 0, 1])
    out = systems.SplitOutputs(prob={"pooled": np.array([0.1, 0.3, 0.9, 0.2, 0.4, 0.6])}, group={})
    studies, agg = scoring.study_outputs(df, y, out, "study_number", "max")
    assert studies[["patient_id", "fracture"]].values.tolist() == [["A", 0], ["A", 1], ["B", 1]]
    np.testing.assert_allclose(agg.prob["pooled"], [0.3, 0.9, 0.6])
    _, mean = scoring.study_outputs(df, y, out, "study_number", "mean")
    np.testing.assert_allclose(mean.prob["pooled"], [0.2, 0.55, 0.5])
    one, _ = scoring.study_outputs(df, y, out, None, "max")  # no study column: one study per patient
    assert len(one) == 2


# --------------------------------------------------------------------------- subsets and patients
def test_age_group_rows_are_picked_by_the_true_group(scored):
    true = scored.test.true_group
    assert (scored.test.inf["age_probs"].argmax(1) != true).sum() == 8  # two misrouted patients
    for g, name in enumerate(NAMES):
        rows = true == g
        entry = scored.result["systems"]["hard"][f"age {name}"]
        assert entry["n"] == rows.sum(), name
        assert entry["auroc"] == pytest.approx(roc_auc_score(scored.test.y[rows],
                                                             scored.test.out.prob["hard"][rows])), name


def test_sex_subset_has_every_metric_on_its_own_rows_and_a_small_one_is_listed(scored):
    male = scored.test.df["gender"].to_numpy() == "M"  # 8 patients of 4 images; the 16 female images are too few
    entry = scored.result["systems"]["pooled"]["sex M"]
    assert entry["n"] == male.sum() == 32 and entry["n_patients"] == 8
    assert entry["auroc"] == pytest.approx(roc_auc_score(scored.test.y[male], scored.test.out.prob["pooled"][male]))
    t = scored.result["thresholds"]["pooled"]["value"]
    pred = scored.test.out.prob["pooled"][male] >= t
    assert entry["specificity"] == pytest.approx((~pred[scored.test.y[male] == 0]).mean())
    assert "sex M" in scored.result["subsets"] and "sex F" not in scored.result["subsets"]
    assert "subset sex F: fewer than 30 images, so it is listed, not scored" in scored.notes
    # the AUROC-only subgroup of the same column scores the one and lists the other
    assert "auroc" in scored.result["subgroups"]["gender"]["M"]
    assert scored.result["subgroups"]["gender"]["F"]["too_small"] == "fewer than 30 images"


def test_every_subset_comes_from_the_one_specification():
    n = 90
    df = pd.DataFrame({"gender": ["M"] * 50 + ["F"] * 39 + ["O"], "cast": [1] * 20 + [0] * 70,
                       "projection": ["1"] * 60 + ["2"] * 30})
    true = np.arange(n) % 3
    y = (np.arange(n) % 2 == 0).astype(int)
    y[60:] = 1  # projection 2: fractures only
    found = {s.name: s for s in systems.build_subsets(systems.TestRows(df, true, NAMES), y)}
    full = [s.name for s in found.values() if s.spec.full]
    assert full == ["overall", *[f"age {name}" for name in NAMES], "cast", "no cast", "sex F", "sex M", "sex O"]
    np.testing.assert_array_equal(found["sex F"].mask, df["gender"].eq("F"))
    np.testing.assert_array_equal(found[f"age {NAMES[1]}"].mask, true == 1)
    assert found["sex O"].too_small == "fewer than 30 images" and found["sex M"].too_small is None
    assert "sex O" not in systems.full_masks(found.values()) and "cast" in systems.full_masks(found.values())
    by_value = {(s.spec.kind, s.name): s.too_small for s in found.values() if not s.spec.full}
    assert by_value[("projection", "1")] is None and by_value[("projection", "2")] == "one class only"


def test_bootstrap_resamples_patients_not_images(scored):
    assert list(scored.test.patients) == scored.test.df["patient_id"].tolist()
    overall = scored.result["systems"]["hard"]["overall"]
    assert overall["n"] == 48 and overall["n_patients"] == 12
    agg = scored.result["study_level"]["aggregations"]["max"]["systems"]["hard"]
    assert agg["n_patients"] == 12


# --------------------------------------------------------------------------- paired differences
def test_paired_differences_are_a_minus_b_with_their_sign():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1])
    good = np.where(y == 1, 0.9, 0.1) + np.linspace(0, 0.05, 12)
    bad = np.array([0.8, 0.3, 0.6, 0.4, 0.2, 0.7, 0.5, 0.45, 0.9, 0.1, 0.35, 0.55])
    out = systems.SplitOutputs(prob={"hard": good, "pooled": bad}, group={})
    patients = np.array([f"P{i // 2}" for i in range(12)])
    thr = {"hard": 0.5, "pooled": 0.5}
    data = scoring.Labelled(y, out, patients)
    found = scoring.compare_systems(data, thr, [("hard", "pooled")], metrics.BootstrapSpec(200, 0, 0.05))
    d = found["hard_minus_pooled"]
    expected = roc_auc_score(y, good) - roc_auc_score(y, bad)
    assert expected > 0.3
    assert d["auroc"]["diff"] == pytest.approx(expected)
    assert 0 < d["auroc"]["lo"] <= d["auroc"]["hi"]
    acc = lambda p: ((p >= 0.5) == y).mean()  # noqa: E731
    assert d["accuracy"]["diff"] == pytest.approx(acc(good) - acc(bad))
    # per-row thresholds follow the rows of the mask they are given
    mask = np.arange(12) < 8
    thr_rows = {"hard": np.full(12, 0.5), "pooled": np.full(12, 0.5)}
    part = scoring.compare_systems(data, thr_rows, [("hard", "pooled")], metrics.BootstrapSpec(50, 0, 0.05), mask)
    assert part["hard_minus_pooled"]["auroc"]["diff"] == pytest.approx(
        roc_auc_score(y[mask], good[mask]) - roc_auc_score(y[mask], bad[mask]))


def test_score_reports_routing_minus_pooled(scored):
    comp = scored.result["comparisons"]["hard_minus_pooled"]["auroc"]["diff"]
    y = scored.test.y
    assert comp == pytest.approx(roc_auc_score(y, scored.test.out.prob["hard"])
                                 - roc_auc_score(y, scored.test.out.prob["pooled"]))


# --------------------------------------------------------------------------- equal budgets
def _budget(init: dict, images: int, served_by_pooled: tuple = (), **schedule) -> dict:
    lm = _lm("m", init, images, **schedule)
    b = evidence.model_budget(lm)
    return {"models": [b], "groups_served_by_pooled": list(served_by_pooled), "init": init, "images_seen": images,
            "epochs_max": b["epochs_max"]}


def test_two_random_starts_with_other_seeds_are_not_the_same_start():
    a = _budget({"kind": "random", "seed": 1}, 1000)
    assert evidence.budget_differences(a, _budget({"kind": "random", "seed": 1}, 1000)) == []
    why = evidence.budget_differences(a, _budget({"kind": "random", "seed": 2}, 1000))
    assert len(why) == 1 and "start from different weights" in why[0] and "seed 2" in why[0]
    other_ckpt = _budget({"kind": "checkpoint", "checkpoint": "other.pt"}, 1000)
    same_ckpt = _budget({"kind": "checkpoint", "checkpoint": "fracture_classifier_pooled.pt"}, 1000)
    ckpt = _budget({"kind": "checkpoint", "checkpoint": "fracture_classifier_pooled.pt"}, 1000)
    assert evidence.budget_differences(ckpt, same_ckpt) == []
    assert evidence.budget_differences(ckpt, other_ckpt)


# The tolerance is relative to the larger count: 1,110 vs 1,000 differ by 9.9 % of 1,110.
@pytest.mark.parametrize("other, equal", [(1000, True), (1090, True), (1110, True), (1112, False), (1500, False),
                                          (899, False), (901, True), (2000, False)])
def test_images_seen_within_ten_percent_only(other, equal):
    init = {"kind": "random", "seed": 1}
    a = _budget(init, 1000)
    why = evidence.budget_differences(a, _budget(init, other))
    assert (why == []) == equal, why
    if not equal:
        assert f"{other:,}" in why[0]


@pytest.mark.parametrize("key, value", [("sampler", "random"), ("loss", "ce"), ("lr", 0.001),
                                        ("focal_gamma", 1.0), ("epochs", 5), ("scheduler", "plateau")])
def test_other_settings_are_not_the_same_budget(key, value):
    init = {"kind": "random", "seed": 1}
    why = evidence.budget_differences(_budget(init, 1000), _budget(init, 1000, **{key: value}))
    assert len(why) == 1 and key in why[0]


def test_equal_budget_reference_is_the_control_only_when_it_matches(scored):
    eb = scored.result["equal_budget"]
    # the group models started from the pooled checkpoint and saw 3 x 400 images; the control
    # too; the pooled model saw 2000 images from random weights
    assert eb["reference"] == "pooled_continued" and eb["differences"]["pooled_continued"] == []
    assert any("different weights" in w for w in eb["differences"]["pooled"])


# --------------------------------------------------------------------------- calibration
def _calibration_case():
    rng = np.random.default_rng(3)
    n = 400
    y_val = (rng.uniform(size=n) < 0.5).astype(int)
    # overconfident on validation: right 75 % of the time with p 0.97
    right = rng.uniform(size=n) < 0.75
    val_p = np.where(right == (y_val == 1), 0.97, 0.03)
    y_test = (rng.uniform(size=n) < 0.5).astype(int)
    test_p = np.where(y_test == 1, rng.uniform(0.3, 0.95, n), rng.uniform(0.05, 0.7, n))
    true_val, true_test = rng.integers(0, 3, n), rng.integers(0, 3, n)

    def inf(p, true):
        age = np.full((n, 3), 0.1)
        age[np.arange(n), true] = 0.8
        return {"age_probs": age, "group_probs": np.repeat(p[:, None], 3, 1), "pooled": p, "pooled_continued": None}

    return inf(val_p, true_val), inf(test_p, true_test), y_val, y_test, true_val, true_test


def _calibration_split(inf: dict, y: np.ndarray, true: np.ndarray) -> systems.Split:
    df = pd.DataFrame({"patient_id": [f"P{i // 2}" for i in range(len(y))]})  # two images a patient
    return systems.Split(df=df, y=y, true_group=true, inf=inf, out=systems.system_probs(inf, true))


def _sigmoid_map(p: np.ndarray, ab: dict) -> np.ndarray:
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / (1 - np.clip(p, 1e-7, 1 - 1e-7)))
    return 1 / (1 + np.exp(-(ab["a"] * z + ab["b"])))


def test_recalibrations_are_fitted_on_validation_and_ece_is_before_and_after():
    inf_val, inf_test, y_val, y_test, true_val, true_test = _calibration_case()
    val, test = _calibration_split(inf_val, y_val, true_val), _calibration_split(inf_test, y_test, true_test)
    result, after, by_method = recalibration.calibrate(val, test, SimpleNamespace(n_groups=3))
    temps = result["temperatures"]
    expected = temperature_oracle(y_val, inf_val["pooled"])
    on_test = temperature_oracle(y_test, inf_test["pooled"])
    assert expected > 1.5 and abs(expected - on_test) > 0.5  # fitting on test would show
    assert temps["pooled"] == pytest.approx(expected, rel=0.01)
    for g in range(3):  # a group model on the validation images routed to its group
        rows = inf_val["age_probs"].argmax(1) == g
        assert temps[f"agegroup{g}"] == pytest.approx(temperature_oracle(y_val[rows], inf_val["pooled"][rows]),
                                                      rel=0.01), g
    cand = result["candidates"]["pooled"]
    # prior shift: the validation prevalence against the sampler's 50 %, by hand
    prior_b = np.log(y_val.mean() / (1 - y_val.mean()))
    assert cand["prior"] == pytest.approx({"a": 1.0, "b": prior_b})
    # Platt: scikit-learn's unpenalised logistic regression of the validation labels on the logit
    from sklearn.linear_model import LogisticRegression

    z_val = np.log(inf_val["pooled"] / (1 - inf_val["pooled"]))[:, None]
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z_val, y_val)
    assert cand["platt"]["a"] == pytest.approx(lr.coef_[0, 0], rel=1e-3)
    assert cand["platt"]["b"] == pytest.approx(lr.intercept_[0], abs=1e-3)
    z_test = np.log(inf_test["pooled"] / (1 - inf_test["pooled"]))[:, None]
    lr_test = LogisticRegression(C=np.inf, max_iter=1000).fit(z_test, y_test)
    assert abs(lr_test.coef_[0, 0] - cand["platt"]["a"]) > 0.2  # fitting on test would show

    ece = result["systems"]["pooled"]
    assert ece["ece_before"] == pytest.approx(ece_oracle(y_test, inf_test["pooled"]))
    chosen = result["chosen"]["pooled"]
    mapped = _sigmoid_map(inf_test["pooled"], cand[chosen])
    assert result["params"]["pooled"] == pytest.approx(cand[chosen])
    assert ece["ece_after"] == pytest.approx(ece_oracle(y_test, mapped))
    assert abs(ece["ece_after"] - ece["ece_before"]) > 0.01
    assert ece["brier_after"] == pytest.approx(np.mean((mapped - y_test) ** 2))
    np.testing.assert_allclose(after.prob["pooled"], mapped, rtol=1e-9)
    scaled = scale_oracle(inf_test["pooled"], temps["pooled"])
    np.testing.assert_allclose(by_method["temperature"].prob["pooled"], scaled, rtol=1e-6)
    assert ece["temperature"]["ece"] == pytest.approx(ece_oracle(y_test, scaled), abs=1e-6)
    hard = scale_oracle(inf_test["pooled"], 1.0)  # every group model outputs the pooled values here
    assert result["systems"]["hard"]["ece_before"] == pytest.approx(ece_oracle(y_test, hard))


# --------------------------------------------------------------------------- end to end, with studies
LOGITS = (-2.0, 0.0, 2.0)  # the fracture model of group g outputs sigmoid(LOGITS[g]) for every image


def _e2e_rows(split: str, img_dir: Path) -> list[dict]:
    """Six patients, two studies each, two images per study. The image's band is the age
    classifier's prediction; labels make validation and test choose different thresholds."""
    # (true group, [bands of study 1], [bands of study 2], [label study 1], [label study 2])
    plan = {"val": [(0, [0, 0], [0, 1], 0, 1), (1, [1, 1], [2, 2], 0, 1), (2, [2, 1], [0, 0], 1, 0),
                    (0, [1, 0], [0, 0], 1, 0), (1, [1, 2], [1, 1], 1, 0), (2, [2, 2], [1, 0], 1, 1)],
            "test": [(0, [0, 0], [2, 0], 0, 1), (1, [1, 0], [1, 1], 0, 0), (2, [2, 2], [1, 1], 1, 0),
                     (0, [0, 1], [0, 0], 1, 0), (1, [2, 1], [1, 1], 1, 0), (2, [2, 2], [0, 0], 1, 0)]}
    rows = []
    for p, (true, s1, s2, y1, y2) in enumerate(plan[split]):
        for study, bands, label in ((1, s1, y1), (2, s2, y2)):
            for k, band in enumerate(bands):
                path = test_evaluate._square_png(img_dir / f"{split}_{p}_{study}_{k}.png", band, size=48)
                rows.append({"image_path": str(path), "patient_id": f"{split}P{p}", "study_number": study,
                             "age": AGES[true], "age_group": true, "fracture": label, "split": split,
                             "band": band})
    return rows


def test_evaluate_end_to_end_with_several_studies_per_patient(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    frames = {}
    for split, name in (("val", columns.VAL_CSV), ("test", columns.TEST_CSV)):
        frames[split] = pd.DataFrame(_e2e_rows(split, img_dir))
        frames[split].drop(columns="band").to_csv(tmp_path / name, index=False)
    mdir = tmp_path / columns.MODELS_DIR
    test_evaluate._probe_ckpt(mdir / "age_classifier.pt", "routing_probe_age", "age", list(NAMES))
    for g, logit in enumerate(LOGITS):
        test_evaluate._probe_ckpt(mdir / f"fracture_classifier_agegroup{g}.pt", "routing_probe_fracture", "fracture",
                    ["fracture"], logit)
    test_evaluate._probe_ckpt(mdir / "fracture_classifier_pooled.pt", "routing_probe_fracture", "fracture",
                              ["fracture"], 0.5)
    written = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--out-dir", str(tmp_path), "--n-boot", "20", "--n-cam", "0", "--batch-size", "8", "--device", "cpu"]))
    res = json.loads(Path(written["metrics"]).read_text())

    sig = 1 / (1 + np.exp(-np.array(LOGITS)))
    studies = {}
    for split, df in frames.items():
        df = df.assign(p=sig[df.band])  # the hard system: the predicted (band's) group's model
        studies[split] = df.groupby(["patient_id", "study_number"], sort=False).agg(
            y=("fracture", "max"), p=("p", "max"), mean=("p", "mean")).reset_index()
        if split == "test":
            assert roc_auc_score(df.fracture, df.p) == pytest.approx(res["systems"]["hard"]["overall"]["auroc"])
            for g, name in enumerate(NAMES):
                assert res["systems"]["hard"][f"age {name}"]["n"] == (df.age_group == g).sum()
    level = res["study_level"]
    assert level["unit"] == "patient_id + study_number"
    for how in ("max", "mean"):
        val, test = studies["val"], studies["test"]
        col = "p" if how == "max" else "mean"
        agg = level["aggregations"][how]
        assert agg["n_studies"] == 12 and agg["n_patients"] == 6
        on_val = youden_oracle(val.y, val[col])
        assert agg["thresholds"]["hard"]["value"] == pytest.approx(on_val), how
        assert agg["systems"]["hard"]["auroc"] == pytest.approx(roc_auc_score(test.y, test[col])), how
        pred = test[col].to_numpy() >= on_val
        assert agg["systems"]["hard"]["sensitivity"] == pytest.approx(pred[test.y == 1].mean()), how
    val, test = studies["val"], studies["test"]
    assert youden_oracle(val.y, val.p) != youden_oracle(test.y, test.p)  # choosing on test would show
    pred = pd.read_csv(written["test_predictions"])
    np.testing.assert_allclose(pred.prob_hard, sig[frames["test"].band], rtol=1e-6)
