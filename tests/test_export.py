"""export.py and predict.py on its folder: timm rebuilds each model, onnxruntime matches
PyTorch (demo models and a small timm Swin, fused attention on and off, batch 1 and N), and
predict.py gives the same calibrated probabilities from the export as from the run and as
evaluate.py's test_predictions.csv.

CPU only: random demo models at 48 px on a few 16-bit PNGs (the numbers are meaningless;
that every path gives the same numbers is what is checked).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import timm
import torch

import bundle
import calibration
import columns
import evaluate
import export
import models
import predict

IMG = 48


def _wrist_like(rng: np.random.Generator, h: int = 70, w: int = 50) -> np.ndarray:
    img = rng.normal(8000, 800, (h, w))
    img[:, w // 3: 2 * w // 3] += 30000 * rng.uniform(0.5, 1.5)
    return np.clip(img, 0, 65535).astype(np.uint16)


def _save_ckpt(path: Path, arch: str, kind: str, n_classes: int, seed: int, age_group: int | None = None) -> None:
    torch.manual_seed(seed)
    model = models.create_model(arch, num_classes=n_classes, in_chans=1, img_size=IMG)
    names = ["0-7 y", "8-14 y", "15-19 y"] if kind == "age" else (
        ["fracture"] if n_classes == 1 else ["no fracture", "fracture"])
    extra = {} if age_group is None else {"age_group": age_group}
    spec = models.ModelSpec(model_name=arch, kind=kind, class_names=names, img_size=IMG, mean=0.449, std=0.226,
                            age_bounds=[8.0, 15.0])
    models.save_checkpoint(path, models.make_checkpoint(model, spec, metrics={"val_f1": 0.5}, epoch=1, **extra))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with random checkpoints (a Swin age classifier, CNN fracture models,
    group 2 served by the pooled model), evaluated by evaluate.py and exported."""
    root = tmp_path_factory.mktemp("exportrun")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for split, n_pat in (("val", 15), ("test", 12)):
        rows = []
        for p in range(n_pat):
            age = [4.0, 11.0, 16.5][p % 3] + rng.uniform(-1, 1)
            for view in range(2):
                path = root / "images" / f"{split}_{p:03d}_{view}.png"
                cv2.imwrite(str(path), _wrist_like(rng))
                rows.append({"image_path": str(path), "patient_id": f"{split}{p}", "age": age,
                             "age_group": int(age >= 8) + int(age >= 15), "fracture": int((p + view) % 2 == 0),
                             "split": split, "cast": int(p % 5 == 0)})
        pd.DataFrame(rows).to_csv(root / (columns.TEST_CSV if split == "test" else columns.VAL_CSV), index=False)
    mdir = root / columns.MODELS_DIR
    _save_ckpt(mdir / "age_classifier.pt", "swin_demo", "age", 3, 0)
    _save_ckpt(mdir / "fracture_classifier_agegroup0.pt", "cnn_demo", "fracture", 1, 1, age_group=0)
    _save_ckpt(mdir / "fracture_classifier_agegroup1.pt", "cnn_demo", "fracture", 1, 2, age_group=1)
    _save_ckpt(mdir / "fracture_classifier_pooled.pt", "cnn_demo", "fracture", 2, 3)
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--out-dir", str(root), "--n-boot", "20", "--n-cam", "0", "--batch-size", "8"]))
    export.main(export.get_args_parser().parse_args(["--out-dir", str(root), "--parity-images", "6"]))
    return root


def _predict(models_dir: Path, images: list[str], out: Path, *extra: str) -> pd.DataFrame:
    predict.main(predict.get_args_parser().parse_args(
        [*images, "--models", str(models_dir), "--output", str(out), "--device", "cpu", "--batch-size", "5",
         *extra]))
    return pd.read_csv(out)


def test_timm_builds_each_exported_model_with_the_checkpoints_logits(exported):
    export_dir = exported / columns.EXPORT_DIR
    system = json.loads((export_dir / columns.SYSTEM_JSON).read_text())
    assert set(system["models"]) == {"age_classifier", "agegroup0", "agegroup1", "pooled"}
    assert system["served_by"]["2"]["model"] == "pooled"
    x = torch.randn(3, 1, IMG, IMG)
    for key, entry in system["models"].items():
        folder = export_dir / entry["folder"]
        stem = folder.name
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["pretrained_cfg"]["input_size"] == [1, IMG, IMG]
        assert cfg["pretrained_cfg"]["mean"] == [0.449] and cfg["pretrained_cfg"]["std"] == [0.226]
        assert cfg["model_args"]["in_chans"] == 1 and cfg["label_names"] == entry["class_names"]
        built = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        ckpt = models.build_from_checkpoint(exported / columns.MODELS_DIR / f"{stem}.pt")
        with torch.no_grad():
            torch.testing.assert_close(built(x), ckpt(x), rtol=0, atol=1e-6)
        assert entry["timm_rebuild_max_abs_logit_diff"] <= 1e-5
    assert "percentile" in " ".join(system["preprocessing"]["steps"])
    assert system["calibration"]["models"]["agegroup2"] and system["thresholds"]["hard_per_group"]["values"]


def test_onnxruntime_matches_pytorch_on_the_exported_models(exported):
    export_dir = exported / columns.EXPORT_DIR
    system = json.loads((export_dir / columns.SYSTEM_JSON).read_text())
    # the Swin age classifier was checked with fused attention on and off, at batch N and 1
    checks = system["models"]["age_classifier"]["onnx"]["parity"]["checks"]
    assert set(checks) == {f"fused attention {s}, batch {b}" for s in ("on", "off") for b in (6, 1)}
    g = torch.Generator().manual_seed(1)
    for key, entry in system["models"].items():
        par = entry["onnx"]["parity"]
        assert 0 <= par["max_abs_prob_diff"] <= par["tolerance"] == 1e-4 and par["n_images"] == 6
        folder = export_dir / entry["folder"]
        ort = bundle.OnnxModel(folder / "model.onnx")
        ref = bundle.load_exported_model(folder, torch.device("cpu"), "torch").model
        for n in (1, 5):  # the batch dimension is dynamic
            x = torch.randn(n, 1, IMG, IMG, generator=g)
            np.testing.assert_allclose(bundle.probabilities(ort, x), bundle.probabilities(ref, x), atol=1e-5)


def test_onnx_parity_of_a_small_timm_swin_with_fused_attention_on_and_off(tmp_path):
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=2, in_chans=1,
                             img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4)).eval()
    path = bundle.export_onnx(swin, tmp_path / "swin.onnx", 64)
    x = torch.randn(4, 1, 64, 64)
    par = export.onnx_parity(swin, path, x)
    assert set(par["checks"]) == {f"fused attention {s}, batch {b}" for s in ("on", "off") for b in (4, 1)}
    assert par["max_abs_prob_diff"] < 1e-5, par
    assert all(m.fused_attn for m in swin.modules() if hasattr(m, "fused_attn"))  # left as the trainers use it


def test_predict_on_the_export_equals_the_run_and_test_predictions(exported, tmp_path):
    test = pd.read_csv(exported / columns.PREDICTIONS_CSV)
    images = test["image_path"].tolist()
    run = _predict(exported / columns.MODELS_DIR, images, tmp_path / "run.csv")
    exp = _predict(exported / columns.EXPORT_DIR, images, tmp_path / "export.csv")
    onnx = _predict(exported / columns.EXPORT_DIR, images, tmp_path / "onnx.csv", "--backend", "onnxruntime")
    probs = ["fracture_prob", "fracture_prob_raw", "age_group_prob_0", "age_group_prob_1", "age_group_prob_2"]
    for col in ("age_group_label", "fracture_model", "fracture_label", "threshold"):
        assert run[col].tolist() == exp[col].tolist() == onnx[col].tolist(), col
    np.testing.assert_allclose(exp[probs].to_numpy(), run[probs].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(onnx[probs].to_numpy(), run[probs].to_numpy(), rtol=0, atol=1e-4)
    assert (run["calibration"] != "none").all() and (onnx["backend"] == "onnxruntime").all()

    # the calibrated probability is evaluate.py's for the same image; the raw one sits beside it
    by_path = test.set_index("image_path").loc[run["image_path"]]
    np.testing.assert_allclose(run["fracture_prob"], by_path["prob_hard_calibrated"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(run["fracture_prob_raw"], by_path["prob_hard"], rtol=0, atol=1e-6)
    assert not np.allclose(run["fracture_prob"], run["fracture_prob_raw"])  # the calibration did something
    thr = json.loads((exported / columns.MODELS_DIR / columns.THRESHOLDS_JSON).read_text())["thresholds"]
    assert (run["threshold"] == thr["hard"]["value"]).all()
    assert (run["fracture_label"] == (run["fracture_prob_raw"] >= run["threshold"])).all()
    assert (run["fracture_label"] == by_path["pred_hard"].to_numpy()).all()

    # soft routing: calibrated as evaluate.py calibrates it
    soft = _predict(exported / columns.EXPORT_DIR, images, tmp_path / "soft.csv", "--routing", "soft")
    np.testing.assert_allclose(soft["fracture_prob"], by_path["prob_soft_calibrated"], rtol=0, atol=1e-6)

    # per-group thresholds, one per predicted age group
    per = _predict(exported / columns.EXPORT_DIR, images, tmp_path / "per.csv", "--per-group-thresholds")
    values = {int(g): t for g, t in thr["hard_per_group"]["values"].items()}
    assert per["threshold"].tolist() == [values[g] for g in per["age_group_label"]]
    assert (per["fracture_label"] == by_path["pred_hard_per_group"].to_numpy()).all()


def test_predict_onnxruntime_refuses_gradcam_and_a_run_folder(exported, tmp_path):
    image = pd.read_csv(exported / columns.TEST_CSV)["image_path"].iloc[0]
    with pytest.raises(predict.errors.DataError) as err:
        _predict(exported / columns.EXPORT_DIR, [image], tmp_path / "p.csv", "--backend", "onnxruntime",
                 "--cam", str(tmp_path / "cams"))
    assert "Grad-CAM" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(predict.errors.DataError, match="export folder"):
        _predict(exported / columns.MODELS_DIR, [image], tmp_path / "p.csv", "--backend", "onnxruntime")


def test_a_calibration_fitted_for_other_weights_is_detected(exported, tmp_path):
    params = calibration.read_params(exported / columns.MODELS_DIR / columns.CALIBRATION_JSON)
    mdir = exported / columns.MODELS_DIR
    current = {"age_classifier": mdir / "age_classifier.pt", "agegroup0": mdir / "fracture_classifier_agegroup0.pt"}
    assert calibration.stale_models(params, current) == []
    other = tmp_path / "age_classifier.pt"
    _save_ckpt(other, "swin_demo", "age", 3, seed=99)
    assert calibration.stale_models(params, {**current, "age_classifier": other}) == [
        "age_classifier (age_classifier.pt changed since the calibration was fitted)"]


def test_model_card_has_the_hugging_face_sections(exported):
    card = (exported / columns.EXPORT_DIR / columns.MODEL_CARD_MD).read_text()
    for heading in ("## Model details", "## Intended use", "### Out-of-scope use", "## Training data",
                    "## Evaluation", "### Study level", "### Calibration", "## Limitations and biases",
                    "## How to use", "## Licence and citation"):
        assert heading in card, heading
    assert "Not a medical device" in card and "cast" in card and "CC BY 4.0" in card
    metrics = json.loads((exported / columns.METRICS_JSON).read_text())
    auroc = metrics["systems"]["hard"]["overall"]["auroc"]
    assert f"| hard | {auroc:.3f}" in card


def test_benchmark_onnx_section_times_both_backends(tmp_path):
    import benchmark

    result = benchmark.main(benchmark.get_args_parser().parse_args(
        ["--device", "cpu", "--sections", "onnx", "--quick", "--batch-size", "4", "--img-size", "32",
         "--out", str(tmp_path / "b.json")]))
    rows = result["onnx"]["rows"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {(b, n) for b in ("pytorch", "onnxruntime")
                                                               for n in (1, 4)}
    assert all(r["images_per_s"] > 0 for r in rows) and result["onnx"]["max_abs_prob_diff"] < 1e-5
