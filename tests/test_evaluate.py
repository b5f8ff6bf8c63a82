"""Routed inference, evaluate.py end to end, predict.py on PNG and DICOM, Grad-CAM.

Everything runs on the CPU with tiny images (32-64 px) and randomly initialised demo
models (the numbers are meaningless; the plumbing is what is checked), plus hand-made
modules whose outputs reveal which one ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from timm.models import register_model
from torch import nn

import columns
import evaluate
import inference
import metrics
import models
import predict
import systems
import tables
from errors import DataError

IMG = 48  # demo model input size in these tests
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def _square_png(path: Path, band: int, size: int = 30) -> Path:
    """A black image with a bright square in the left, middle or right third."""
    img = np.zeros((size, size), np.uint8)
    w = size // 3
    img[10:20, band * w + 1: band * w + w - 1] = 255
    cv2.imwrite(str(path), img)
    return path


class BandAgeModel(nn.Module):
    """'Age classifier': the third of the image holding the bright square is the group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 3
        return 20 * torch.stack([x[..., i * w:(i + 1) * w].mean((1, 2, 3)) for i in range(3)], 1)


class ConstFracture(nn.Module):
    """'Fracture model' with a fixed logit; records the band of every image it sees."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += BandAgeModel()(x).argmax(1).tolist()
        return torch.full((x.shape[0], 1), self.logit)


class ProbeAge(BandAgeModel):
    """BandAgeModel as a timm architecture, so evaluate.py loads it from a real checkpoint."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.register_buffer("unused", torch.zeros(1))  # a checkpoint needs a non-empty state dict


class ProbeFracture(nn.Module):
    """A fracture 'model' whose one logit is its only weight: its output says which model ran."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(x.shape[0], 1)


@register_model
def routing_probe_age(pretrained: bool = False, **kwargs: object) -> nn.Module:
    return ProbeAge(**kwargs)


@register_model
def routing_probe_fracture(pretrained: bool = False, **kwargs: object) -> nn.Module:
    return ProbeFracture(**kwargs)


def _lm(model: nn.Module, name: str, nc: int) -> inference.LoadedModel:
    return inference.LoadedModel(model=model, name=name, img_size=30, mean=0.5, std=0.25, num_classes=nc)


def _save_ckpt(path: Path, kind: str, n_classes: int, seed: int, arch: str = "cnn_demo") -> Path:
    torch.manual_seed(seed)
    model = models.create_model(arch, num_classes=n_classes, in_chans=1, img_size=IMG)
    names = ["0-7 y", "8-14 y", "15-19 y"] if kind == "age" else (
        ["fracture"] if n_classes == 1 else ["no fracture", "fracture"])
    spec = models.ModelSpec(model_name=arch, kind=kind, class_names=names, img_size=IMG, mean=0.449, std=0.226,
                            age_bounds=[8.0, 15.0])
    ckpt = models.make_checkpoint(model, spec, metrics={"val_f1": 0.5}, epoch=1)
    return models.save_checkpoint(path, ckpt)


def _write_dicom(path: Path, arr: np.ndarray) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _wrist_like(rng: np.random.Generator, h: int = 70, w: int = 50) -> np.ndarray:
    """A 16-bit image with a bright 'bone' band and noise."""
    img = rng.normal(8000, 800, (h, w))
    img[:, w // 3: 2 * w // 3] += 30000
    return np.clip(img, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny split CSVs (16-bit PNGs) and random demo checkpoints; group 2 has no model."""
    root = tmp_path_factory.mktemp("evalrun")
    img_dir = root / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for split, n_pat in (("val", 18), ("test", 18)):
        rows = []
        for p in range(n_pat):
            age = [4.0, 11.0, 16.5][p % 3] + rng.uniform(-1, 1)
            cast = int(p % 4 == 0)
            for view in range(2):
                path = img_dir / f"{split}_{p:03d}_{view}.png"
                cv2.imwrite(str(path), _wrist_like(rng))
                rows.append({"image_path": str(path), "patient_id": f"{split}{p}", "age": age,
                             "age_group": int(age >= 8) + int(age >= 15),
                             "fracture": int((p + view) % 2 == 0 or cast), "split": split,
                             "cast": cast})
        name = columns.TEST_CSV if split == "test" else columns.VAL_CSV
        pd.DataFrame(rows).to_csv(root / name, index=False)
    mdir = root / columns.MODELS_DIR
    _save_ckpt(mdir / "age_classifier.pt", "age", 3, 0)
    _save_ckpt(mdir / "fracture_classifier_agegroup0.pt", "fracture", 1, 1)
    _save_ckpt(mdir / "fracture_classifier_agegroup1.pt", "fracture", 1, 2)
    _save_ckpt(mdir / "fracture_classifier_pooled.pt", "fracture", 2, 3)  # two-logit head
    pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.9, 0.7, 0.6], "val_loss": [1, 0.8, 0.75],
                  "val_f1": [0.5, 0.6, 0.62], "val_auroc": [0.6, 0.7, 0.71]}
                 ).to_csv(mdir / "fracture_classifier_agegroup0_metrics.csv", index=False)
    return root


# --------------------------------------------------------------------------- routing
def test_route_sends_each_image_to_its_predicted_groups_model(tmp_path):
    bands = [0, 1, 2, 2, 1, 0, 2]
    df = pd.DataFrame({"image_path": [str(_square_png(tmp_path / f"i{i}.png", b))
                                      for i, b in enumerate(bands)]})
    groups = {g: ConstFracture(logit) for g, logit in enumerate((-2.0, 0.5, 3.0))}
    routed = inference.RoutedModels(age=_lm(BandAgeModel(), "age_classifier", 3),
                            groups={g: _lm(m, f"agegroup{g}", 1) for g, m in groups.items()},
                            pooled=None, age_bounds=(8.0, 15.0))
    res = inference.route(routed, df, torch.device("cpu"), "hard", batch_size=3)
    assert res["age_group_label"].tolist() == bands
    expected = torch.sigmoid(torch.tensor([(-2.0, 0.5, 3.0)[b] for b in bands])).numpy()
    np.testing.assert_allclose(res["fracture_prob"], expected, rtol=1e-5)
    assert res["fracture_model"].tolist() == [f"agegroup{b}" for b in bands]
    for g, m in groups.items():  # hard routing: each model saw only its own group's images
        assert m.seen == [g] * bands.count(g)

    # soft: every model sees every image; the mix uses the age probabilities
    for m in groups.values():
        m.seen.clear()
    soft = inference.route(routed, df, torch.device("cpu"), "soft")
    age_p = soft[[f"age_group_prob_{g}" for g in range(3)]].to_numpy()
    mix = (age_p * torch.sigmoid(torch.tensor([-2.0, 0.5, 3.0])).numpy()).sum(1)
    np.testing.assert_allclose(soft["fracture_prob"], mix, rtol=1e-5)
    assert all(len(m.seen) == len(bands) for m in groups.values())


def test_missing_group_model_falls_back_to_pooled(tmp_path):
    bands = [2, 0, 2]
    df = pd.DataFrame({"image_path": [str(_square_png(tmp_path / f"i{i}.png", b))
                                      for i, b in enumerate(bands)]})
    pooled = ConstFracture(4.0)
    routed = inference.RoutedModels(age=_lm(BandAgeModel(), "age_classifier", 3),
                            groups={0: _lm(ConstFracture(-1.0), "agegroup0", 1),
                                    1: _lm(ConstFracture(1.0), "agegroup1", 1)},
                            pooled=_lm(pooled, "pooled", 1), age_bounds=(8.0, 15.0))
    res = inference.route(routed, df, torch.device("cpu"), "hard")
    assert res["fracture_model"].tolist() == ["pooled", "agegroup0", "pooled"]
    assert pooled.seen == [2, 2]
    routed.pooled = None
    with pytest.raises(models.CheckpointError, match="age group 2"):
        inference.route(routed, df, torch.device("cpu"), "hard")


def test_combine_routes_oracle_and_hard():
    age = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    grp = np.array([[0.1, 0.5, 0.9], [0.2, 0.6, 0.8], [0.3, 0.4, 0.7]])
    hard, used = inference.combine_routes(age, grp, "hard")
    np.testing.assert_allclose(hard, [0.1, 0.8, 0.4])
    oracle, used_o = inference.combine_routes(age, grp, "oracle", true_group=np.array([1, 1, 2]))
    np.testing.assert_allclose(oracle, [0.5, 0.6, 0.7])
    assert used_o.tolist() == [1, 1, 2]


def test_model_probs_under_bf16_autocast_stay_close(run_dir):
    device = torch.device("cpu")
    routed = inference.load_routed_models(run_dir / columns.MODELS_DIR, device)
    df = tables.read_split_csv(run_dir / columns.TEST_CSV).head(8)
    for lm in (routed.age, routed.pooled):
        for tta in (False, True):
            full = inference.model_probs(lm, df, device, tta)
            np.testing.assert_allclose(inference.model_probs(lm, df, device, tta, amp="bf16"), full, atol=0.01)


def test_a_model_trained_channels_last_runs_channels_last_with_the_same_probabilities(run_dir, tmp_path):
    device = torch.device("cpu")
    src = run_dir / columns.MODELS_DIR / "fracture_classifier_pooled.pt"
    ckpt = models.load_checkpoint(src)
    ckpt["config"] = {**ckpt["config"], "channels_last": True}
    cl_path = models.save_checkpoint(tmp_path / "cl.pt", ckpt)
    plain, cl = (inference.load_model(p, "pooled", device, "fracture") for p in (src, cl_path))
    assert not plain.channels_last and cl.channels_last
    convs = [m.weight for m in cl.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # (a 1-channel or 1x1 kernel is both)
    df = tables.read_split_csv(run_dir / columns.TEST_CSV).head(8)
    np.testing.assert_allclose(inference.model_probs(cl, df, device), inference.model_probs(plain, df, device),
                               rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize("arch", ["cnn_demo", "swin_demo"])
def test_gradcam_has_input_shape_and_is_finite(arch):
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=1, in_chans=1, img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    cams = inference.gradcam(model, x)
    assert cams.shape == (2, 64, 64)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    if arch == "swin_demo":  # timm 1.x Swin: NHWC block output, permuted, not reshaped
        layer, reshape = inference.cam_target(model)
        assert reshape is inference.nhwc_to_nchw
    # the TTA wrapper is explained through the same layer
    assert inference.gradcam(inference.HFlipTTA(model), x[:1]).shape == (1, 64, 64)


# --------------------------------------------------------------------------- predict.py
def _predict_args(paths, mdir, out, **kw) -> argparse.Namespace:
    argv = [*map(str, paths), "--models-dir", str(mdir), "--output", str(out)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return predict.get_args_parser().parse_args(argv)


def test_predict_png_and_dicom(run_dir, tmp_path):
    rng = np.random.default_rng(5)
    png = tmp_path / "in" / "wrist.png"
    png.parent.mkdir()
    cv2.imwrite(str(png), _wrist_like(rng))
    dcm = _write_dicom(tmp_path / "in" / "sub" / "wrist.dcm", _wrist_like(rng) // 16)
    mdir = run_dir / columns.MODELS_DIR
    out = tmp_path / "pred.csv"
    res = predict.main(_predict_args([png.parent], mdir, out, cam=tmp_path / "cams", tta=True))
    df = pd.read_csv(out)
    assert sorted(Path(p).name for p in df.image_path) == ["wrist.dcm", "wrist.png"]
    probs = df[[f"age_group_prob_{g}" for g in range(3)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert (df.fracture_label == (df.fracture_prob >= df.threshold)).all()
    # each image's probability is that of the model serving its predicted group (group 2: pooled), with TTA
    routed = inference.load_routed_models(mdir, torch.device("cpu"))
    serving = {0: "agegroup0", 1: "agegroup1", 2: "pooled"}
    assert df.fracture_model.tolist() == [serving[g] for g in df.age_group_label]
    for i, row in df.iterrows():
        lm = routed.model_for_group(int(row.age_group_label))
        one = pd.DataFrame({"image_path": [row.image_path]})
        assert row.fracture_prob == pytest.approx(float(inference.model_probs(lm, one, torch.device("cpu"), tta=True)[0]),
                                                  rel=1e-5)
        np.testing.assert_allclose(probs[i], inference.model_probs(routed.age, one, torch.device("cpu"), tta=True)[0],
                                   rtol=1e-5)
    for p in df.cam_path:  # over the original image (70 x 50), not the 48 px model input
        cam = cv2.imread(p)
        assert cam is not None and cam.shape == (70, 50, 3)
    assert res["n_images"] == 2 and len(res["cams"]) == 2

    # a threshold saved by evaluate.py is used; --threshold overrides it
    (mdir / columns.THRESHOLDS_JSON).write_text(json.dumps({"thresholds": {"hard": {"value": 0.25}}}))
    try:
        predict.main(_predict_args([png, dcm], mdir, out))
        assert (pd.read_csv(out).threshold == 0.25).all()
        predict.main(_predict_args([png], mdir, out, threshold=0.9))
        assert (pd.read_csv(out).threshold == 0.9).all()
    finally:
        (mdir / columns.THRESHOLDS_JSON).unlink()


def test_predict_cam_on_a_real_radiograph_has_its_size_and_says_the_prediction(run_dir, shared_dir, tmp_path):
    real = sorted((shared_dir / "grazpedwri-dx" / "images").glob("*.png"))[0]
    out = tmp_path / "pred.csv"
    predict.main(_predict_args([real], run_dir / columns.MODELS_DIR, out, cam=tmp_path / "cams"))
    row = pd.read_csv(out).iloc[0]
    overlay = cv2.imread(row.cam_path)
    assert overlay.shape == (*cv2.imread(str(real), cv2.IMREAD_UNCHANGED).shape[:2], 3)
    # the text box (white on black) in the top-left corner holds the prediction; below it, the image
    box = overlay[: overlay.shape[0] // 12, : overlay.shape[1] // 2]
    assert (box == 255).all(axis=2).sum() > 200 and (box == 0).all(axis=2).sum() > 2000
    assert not (overlay[overlay.shape[0] // 2:] == 255).all(axis=2).any()


def test_predict_errors_are_one_line(run_dir, tmp_path):
    mdir = run_dir / columns.MODELS_DIR
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError) as err:
        predict.main(_predict_args([bad], mdir, tmp_path / "p.csv"))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), _wrist_like(np.random.default_rng(1)))
    res = predict.main(_predict_args([bad, good], mdir, tmp_path / "p.csv", skip_bad=True))
    assert res["n_images"] == 1 and res["n_skipped"] == 1
    # a fracture checkpoint where the age classifier belongs
    wrong = tmp_path / "wrong_models"
    wrong.mkdir()
    (wrong / "age_classifier.pt").write_bytes(
        (mdir / "fracture_classifier_agegroup0.pt").read_bytes())
    with pytest.raises(models.CheckpointError, match="age_classifier.pt"):
        predict.main(_predict_args([good], wrong, tmp_path / "p.csv"))


def test_predict_refuses_degenerate_images(run_dir, tmp_path):
    mdir = run_dir / columns.MODELS_DIR
    flat = tmp_path / "flat.png"
    cv2.imwrite(str(flat), np.full((64, 64), 900, np.uint16))
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.array([[0, 255]], np.uint8))
    for bad, words in ((flat, "constant image"), (tiny, "image too small (2x1 px")):
        with pytest.raises(DataError) as err:
            predict.main(_predict_args([bad], mdir, tmp_path / "p.csv"))
        msg = str(err.value)
        assert words in msg and str(bad) in msg and "\n" not in msg, msg


def test_predict_skips_fifo_socket_and_device_without_hanging(run_dir, tmp_path):
    import socket

    folder = tmp_path / "scans"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), _wrist_like(np.random.default_rng(2)))
    os.mkfifo(folder / "scan.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    out = tmp_path / "pred.csv"
    try:
        done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(folder), "--models-dir",
                               str(run_dir / columns.MODELS_DIR), "--output", str(out), "--skip-bad",
                               # 66 s measured at load 15 on 2 cores; 600 s (9x) only stops a hang
                               "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=600)
    finally:
        sock.close()
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = sorted(line for line in done.stderr.splitlines() if line.startswith("skipped: "))
    # predict.py names files by their resolved path, so the link is reported as /dev/zero
    assert skipped == sorted(f"skipped: image path is not a regular file ({k}): {os.path.realpath(folder / n)}"
                             for n, k in (("scan.png", "FIFO"), ("sock.png", "socket"),
                                          ("zero.png", "character device")))
    assert pd.read_csv(out).image_path.map(lambda p: Path(p).name).tolist() == ["good.png"]


# --------------------------------------------------------------------------- evaluate.py
def test_evaluate_end_to_end(run_dir):
    args = evaluate.get_args_parser().parse_args(
        ["--out-dir", str(run_dir), "--n-boot", "60", "--n-cam", "2", "--batch-size", "16"])
    written = evaluate.main(args)
    for key in ("test_predictions", "metrics", "report", "thresholds"):
        assert Path(written[key]).exists(), key
    pred = pd.read_csv(written["test_predictions"])
    test = pd.read_csv(run_dir / columns.TEST_CSV)
    assert len(pred) == len(test)
    # every system's probability, row by row, from the models themselves
    device = torch.device("cpu")
    routed = inference.load_routed_models(run_dir / columns.MODELS_DIR, device)
    inf = evaluate.infer(routed, tables.read_split_csv(run_dir / columns.TEST_CSV), device)
    rows = np.arange(len(pred))
    label = inf["age_probs"].argmax(1)
    assert pred.age_group_label.tolist() == label.tolist()
    np.testing.assert_allclose(pred.prob_hard, inf["group_probs"][rows, label], rtol=1e-6)
    np.testing.assert_allclose(pred.prob_oracle, inf["group_probs"][rows, pred.age_group], rtol=1e-6)
    np.testing.assert_allclose(pred.prob_soft, (inf["age_probs"] * inf["group_probs"]).sum(1), rtol=1e-6)
    np.testing.assert_allclose(pred.prob_pooled, inf["pooled"], rtol=1e-6)
    serving = {0: "agegroup0", 1: "agegroup1", 2: "pooled"}
    assert pred.routed_model.tolist() == [serving[g] for g in label]

    res = json.loads(Path(written["metrics"]).read_text())
    assert any("group 2" in n and "pooled" in n for n in res["notes"])
    assert set(res["systems"]) == {"hard", "soft", "oracle", "pooled", "hard_per_group", "soft_per_group",
                                   "oracle_per_group"}
    ov = res["systems"]["hard"]["overall"]
    assert ov["n"] == len(test) and len(ov["ci"]["auroc"]) == 2
    assert {"overall", "age 0-7 y", "age 8-14 y", "age 15-19 y", "cast", "no cast"} <= set(
        res["systems"]["pooled"])
    assert "oracle_minus_hard" in res["comparisons"] and res["conclusion"]
    assert len(res["age_classifier"]["confusion_matrix"]) == 3
    # no control model and random demo checkpoints: nothing is equal-budget, and the Answer says so
    assert res["equal_budget"]["reference"] is None and "helped" not in res["conclusion"]
    assert "NOT an equal-budget comparison" in res["conclusion"]

    # thresholds come from the validation CSV, not from test; per-group ones from the
    # validation images each group model decided
    val = tables.read_split_csv(run_dir / columns.VAL_CSV)
    true_val = val["age_group"].to_numpy()
    val_out = systems.system_probs(evaluate.infer(routed, val, device), true_val)
    for s, prob in val_out.prob.items():
        t = metrics.choose_threshold(val["fracture"], prob)
        assert res["systems"][s]["threshold"] == pytest.approx(t)
        np.testing.assert_allclose(pred[f"threshold_{s}"], t)
    per, _ = metrics.choose_group_thresholds(val["fracture"], val_out.prob["hard"], val_out.group["hard"], 3,
                                             res["systems"]["hard"]["threshold"])
    saved = {int(k): v for k, v in res["thresholds"]["hard_per_group"]["values"].items()}
    assert saved == pytest.approx(per)
    np.testing.assert_allclose(pred["threshold_hard_per_group"], [per[g] for g in pred.age_group_label])
    assert (pred.pred_hard_per_group == (pred.prob_hard >= pred.threshold_hard_per_group)).all()
    saved = json.loads(Path(written["thresholds"]).read_text())
    assert saved["thresholds"]["hard"]["value"] == pytest.approx(res["systems"]["hard"]["threshold"])
    assert set(saved["thresholds"]["hard_per_group"]["values"]) == {"0", "1", "2"}

    # study level: one row per patient + study_number, for every system and both aggregations
    n_studies = test.groupby(["patient_id", "study_number"]).ngroups if "study_number" in test else \
        test.patient_id.nunique()
    for how in ("max", "mean"):
        agg = res["study_level"]["aggregations"][how]
        assert agg["n_studies"] == n_studies and set(agg["systems"]) == set(res["systems"])
    cal = res["calibration"]
    assert set(cal["systems"]) == {"hard", "soft", "oracle", "pooled"} and cal["temperatures"]["pooled"] > 0
    # the calibration contract: per model the chosen method and {a, b}; the CSV's calibrated
    # probabilities are sigmoid(a * logit(p) + b) of the chosen method
    assert set(cal["chosen"]) == {"age_classifier", "agegroup0", "agegroup1", "agegroup2", "pooled"}
    assert set(cal["chosen"].values()) <= {"temperature", "prior", "platt"}
    a, b = cal["params"]["pooled"]["a"], cal["params"]["pooled"]["b"]
    z = np.log(np.clip(pred.prob_pooled, 1e-7, 1 - 1e-7) / np.clip(1 - pred.prob_pooled, 1e-7, 1))
    np.testing.assert_allclose(pred.prob_pooled_calibrated, 1 / (1 + np.exp(-(a * z + b))), rtol=1e-6)
    for key in ("before", "temperature", "prior", "platt", "chosen"):
        assert {"ece", "brier", "slope", "intercept"} <= set(cal["systems"]["hard"][key])
    # the checklist sections
    assert {"flow", "table_one", "net_benefit", "error_analysis"} <= set(res)
    assert res["table_one"]["test"]["images"] == len(test)
    assert {"hard", "pooled", "treat_all", "treat_none"} <= set(res["net_benefit"]["curve"])
    assert len(res["error_analysis"]["most_confident"]) <= 10

    report = Path(written["report"]).read_text()
    for fig in written["figures"]:
        assert Path(fig).exists() and Path(fig).name in report
    names = {Path(f).name for f in written["figures"]}
    assert {"roc_by_age_group.png", "training_curves.png", "calibration.png",
            "gradcam_examples.png", "decision_curve.png", "reliability_per_system.png", "patient_flow.png",
            "gradcam_confident_errors.png"} <= names
    assert report.index("## Summary") < report.index("## The Answer in detail")


PROBE_LOGITS = (-2.0, 0.0, 2.0)  # fracture model of group g outputs sigmoid(PROBE_LOGITS[g])


def _probe_ckpt(path: Path, name: str, kind: str, classes: list[str], logit: float | None = None) -> None:
    model = models.create_model(name, num_classes=len(classes))
    if logit is not None:
        model.logit.data.fill_(logit)
    models.save_checkpoint(path, models.make_checkpoint(model, models.ModelSpec(
        model_name=name, kind=kind, class_names=classes, img_size=48, mean=0.5, std=0.25, age_bounds=[8.0, 15.0])))


def test_evaluate_hard_routing_follows_the_predicted_group(tmp_path):
    """An age model that misroutes known rows across all three groups: the hard system must use
    the model of the predicted group on every row, the oracle that of the true group."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    ages = (4.0, 11.0, 16.5)
    for split in ("val", "test"):
        rows = []
        for rep in range(2):
            for true in range(3):
                for band in range(3):  # every (true group, predicted group) pair, 6 of 9 misrouted
                    path = _square_png(img_dir / f"{split}_{rep}_{true}_{band}.png", band, size=48)
                    rows.append({"image_path": str(path), "patient_id": f"{split}{rep}{true}{band}",
                                 "age": ages[true] + 0.1 * rep, "age_group": true, "fracture": int(true == 2),
                                 "split": split})
        pd.DataFrame(rows).to_csv(tmp_path / (columns.TEST_CSV if split == "test" else columns.VAL_CSV),
                                  index=False)
    mdir = tmp_path / columns.MODELS_DIR
    _probe_ckpt(mdir / "age_classifier.pt", "routing_probe_age", "age", ["0-7 y", "8-14 y", "15-19 y"])
    for g, logit in enumerate(PROBE_LOGITS):
        _probe_ckpt(mdir / f"fracture_classifier_agegroup{g}.pt", "routing_probe_fracture", "fracture",
                    ["fracture"], logit)
    _probe_ckpt(mdir / "fracture_classifier_pooled.pt", "routing_probe_fracture", "fracture", ["fracture"], 0.5)

    written = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--out-dir", str(tmp_path), "--n-boot", "20", "--n-cam", "0", "--batch-size", "4", "--device", "cpu"]))
    pred = pd.read_csv(written["test_predictions"])
    band = pred.image_path.map(lambda p: int(Path(p).stem[-1]))
    sig = 1 / (1 + np.exp(-np.array(PROBE_LOGITS)))
    assert pred.age_group_label.tolist() == band.tolist()
    assert (pred.age_group != pred.age_group_label).sum() == 12 and set(pred.age_group) == {0, 1, 2}
    np.testing.assert_allclose(pred.prob_hard, sig[band], rtol=1e-6)  # the predicted group's model
    np.testing.assert_allclose(pred.prob_oracle, sig[pred.age_group], rtol=1e-6)  # the true group's
    np.testing.assert_allclose(pred.prob_pooled, 1 / (1 + np.exp(-0.5)), rtol=1e-6)
    assert pred.routed_model.tolist() == [f"agegroup{b}" for b in band]
    res = json.loads(Path(written["metrics"]).read_text())
    assert res["misrouted"]["n"] == 12 and res["misrouted"]["n_total"] == 18
    hard, oracle = (res["systems"][s]["overall"]["auroc"] for s in ("hard", "oracle"))
    assert oracle == 1.0 and hard == pytest.approx(0.5)  # the label follows the true group only


def _odd_copy(run_dir: Path, dest: Path) -> Path:
    """The inputs of ``run_dir`` (no outputs of earlier runs) with one test and one val row
    dropped: odd row counts, so DistributedSampler pads one rank with a duplicate."""
    outputs = (columns.THRESHOLDS_JSON, "report", columns.METRICS_JSON, columns.PREDICTIONS_CSV, columns.CACHE_DIR,
               ".run.lock")
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(*outputs))
    for name in (columns.TEST_CSV, columns.VAL_CSV):
        df = pd.read_csv(dest / name)
        df.iloc[:-1].to_csv(dest / name, index=False)
    return dest


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and columns.CACHE_DIR not in p.parts)


def test_evaluate_under_torchrun_matches_one_process(run_dir, tmp_path):
    flags = ["--n-boot", "20", "--n-cam", "1", "--batch-size", "8", "--device", "cpu"]
    single = _odd_copy(run_dir, tmp_path / "single")
    evaluate.main(evaluate.get_args_parser().parse_args(["--out-dir", str(single), *flags]))

    multi = _odd_copy(run_dir, tmp_path / "multi")
    result_json = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "evaluate.py"), "--out-dir", str(multi), *flags, "--result-json", str(result_json)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # the whole test: 142 s measured at load 15 on 2 cores; 900 s (6x) only stops a hang
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    test = pd.read_csv(multi / columns.TEST_CSV)
    assert len(test) % 2 == 1 and len(pd.read_csv(multi / columns.VAL_CSV)) % 2 == 1
    pred = pd.read_csv(multi / columns.PREDICTIONS_CSV)
    assert pred.image_path.tolist() == test.image_path.tolist()  # every row once, in order
    # the same probabilities (and so thresholds, labels, routing) as one process
    pd.testing.assert_frame_equal(pred, pd.read_csv(single / columns.PREDICTIONS_CSV),
                                  check_exact=False, rtol=1e-6, atol=1e-7)

    assert _files(multi) == _files(single)  # rank 1 wrote nothing of its own
    assert "gradcam_examples.png" in _files(multi / "report")
    assert json.loads((multi / columns.METRICS_JSON).read_text())["world_size"] == 2
    assert Path(json.loads(result_json.read_text())["test_predictions"]) == multi / columns.PREDICTIONS_CSV
    for line in ("evaluate: effective config", "sharded over 2 processes",
                 "== Fracture detection on the test set", "wrote " + str(multi / columns.METRICS_JSON)):
        assert log.count(line) == 1, line  # rank 0 alone prints
    assert not (multi / ".run.lock").exists()


# --------------------------------------------------------------------------- the Answer
def _answer_inputs(diff: float, lo: float, hi: float, reference: str | None,
                   seed_diffs: tuple[float, ...] | None = None) -> dict:
    """The slice of metrics.json that conclusion.answer reads, with a chosen hard-minus-pooled result
    (and per training seed ``seed_diffs``, by default three seeds of the same difference)."""
    import evidence

    def overall(auroc: float) -> dict:
        return {"overall": {"auroc": auroc, "ci": {"auroc": [auroc - 0.02, auroc + 0.02]}}}

    def comp(d: float, a: float, b: float) -> dict:
        entry = {"diff": d, "lo": a, "hi": b, "se": (b - a) / 3.92}
        return {k: entry for k in ("auroc", "f1", "sensitivity", "specificity")}

    systems = {"hard": overall(0.90), "pooled": overall(0.90 - diff)}
    comparisons = {"hard_minus_pooled": comp(diff, lo, hi), "oracle_minus_hard": comp(0.0, -0.01, 0.01)}
    budget = {"models": [{"model": "m", "epochs_run": 6, "epochs_max": 6,
                          "schedule": {"scheduler": "cosine", "lr": 0.002, "batch_size": 32,
                                       "sampler": "balanced", "loss": "focal"}}],
              "init": {"kind": "random", "seed": 42}, "images_seen": 1000, "epochs_max": 6}
    why = {"pooled": [] if reference == "pooled" else ["they saw 2,000 vs 1,000 training images"]}
    if reference == "pooled_continued":
        systems["pooled_continued"] = overall(0.90 - diff)
        comparisons["hard_minus_pooled_continued"] = comp(diff, lo, hi)
        why["pooled_continued"] = []
    study = {"n_studies": 10, "comparisons": {}, "systems": {}}
    diffs = seed_diffs if seed_diffs is not None else (diff, diff, diff)
    seeds = {"per_seed": [{"seed": 42 + k, "diff": d} for k, d in enumerate(diffs)], "mean": sum(diffs) / len(diffs),
             "lo": lo, "hi": hi, "se_test": 0.01, "seed_sd": 0.01, "min_detectable": 0.05,
             "verdict": evidence.verdict(diffs, lo, hi)}
    return {"systems": systems, "comparisons": comparisons, "alpha": 0.05, "n_boot": 100, "seeds": seeds,
            "equal_budget": {"reference": reference, "differences": why},
            "budgets": {"routed": budget, "pooled": budget, "pooled_continued": budget},
            "study_level": {"aggregations": {"max": study}},
            "misrouted": {"n": 1, "n_total": 10, "fraction": 0.1}, "age_classifier": {"macro_f1": 0.9}}


@pytest.mark.parametrize("reference", [None, "pooled", "pooled_continued"])
def test_answer_says_helped_only_for_an_equal_budget_comparison(reference):
    import conclusion

    clear_win = conclusion.answer(_answer_inputs(0.08, 0.05, 0.11, reference))
    if reference is None:
        assert "helped" not in clear_win and "hurt" not in clear_win
        assert "NOT an equal-budget comparison" in clear_win and "2,000 vs 1,000" in clear_win
    else:
        assert "Routing helped:" in clear_win and "equal training budget" in clear_win
        assert "+0.080 (seed 42), +0.080 (seed 43), +0.080 (seed 44)" in clear_win
        assert "Equal training budget: both start from random weights (seed 42)" in clear_win
    clear_loss = conclusion.answer(_answer_inputs(-0.08, -0.11, -0.05, reference))
    assert ("Routing hurt:" in clear_loss) == (reference is not None)
    unsure = conclusion.answer(_answer_inputs(0.01, -0.02, 0.04, reference))
    assert "helped" not in unsure and "hurt" not in unsure
    if reference is not None:
        assert "No evidence of a difference" in unsure
        assert "could detect is about 0.050" in unsure
    # a clear difference on the first seed that other seeds do not share is no finding
    mixed = conclusion.answer(_answer_inputs(-0.08, -0.11, -0.05, reference, (-0.08, 0.01, -0.03)))
    assert "hurt" not in mixed
    assert ("Inconsistent across training seeds" in mixed) == (reference is not None)
    one = conclusion.answer(_answer_inputs(-0.08, -0.11, -0.05, reference, (-0.08,)))
    assert "hurt" not in one
