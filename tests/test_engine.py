"""engine.py: early stopping, metrics, checkpoints and in-process resume on tiny tensors;
presets.py: preset < YAML < command line."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import engine
import metrics
import models
import presets
import recipe
import train_config
from conftest import fit_config
from models import build_from_checkpoint, create_model, load_checkpoint

CLASSES = ("neg", "pos")
SPEC = models.ModelSpec(model_name="cnn_demo", kind="fracture", class_names=list(CLASSES), img_size=16, mean=0.5,
                        std=0.25, age_bounds=[8.0, 15.0])
SETTINGS = {"model": "cnn_demo", "img_size": 16, "classes": list(CLASSES), "train data": "synthetic"}



def _data(n: int = 48, seed: int = 0, learnable: bool = True) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    if learnable:
        x[y == 1] += 1.0
    return TensorDataset(x, y)


class InterruptAfter(Dataset):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the n-th item fetched."""

    def __init__(self, base: Dataset, n: int) -> None:
        self.base, self.n, self.count = base, n, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.count += 1
        if self.count == self.n:
            raise KeyboardInterrupt
        return self.base[i]


def _fit(tmp_path, epochs: int, *, train_ds=None, lr: float = 3e-3, patience: int = 10, resume: bool = False,
         force: bool = False, settings=None, init_seed: int = 0, sgd_lr0: bool = False):
    engine.seed_everything(init_seed)
    model = create_model("cnn_demo", num_classes=2)
    engine.seed_everything(0)
    ds = train_ds if train_ds is not None else _data()
    train_loader = DataLoader(ds, batch_size=16, sampler=RandomSampler(ds))
    val_loader = DataLoader(_data(seed=1), batch_size=16)
    if sgd_lr0:
        for m in model.modules():  # BatchNorm running statistics would still change at lr 0
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
    else:
        opt = recipe.build_optimizer(model, lr, 0.01)
    sched = recipe.build_scheduler(opt, "cosine", epochs, warmup_epochs=1)
    files = engine.RunFiles.from_stem(tmp_path, "m")
    cfg = fit_config(tmp_path, epochs=epochs, metric="f1", patience=patience, resume=resume, force=force)
    learner = engine.Learner(model, recipe.make_criterion("focal", 2), opt, sched)
    result = engine.fit(learner, engine.Loaders(train_loader, val_loader), cfg, torch.device("cpu"), files,
                        engine.CheckpointRecord(SPEC, settings or SETTINGS))
    return result, files


def test_early_stopping_counts_patience_and_handles_nan():
    es = engine.EarlyStopping(patience=2, mode="max")
    assert es.step(float("nan"), 1)  # the first epoch is always the best, even NaN
    assert es.step(0.5, 2)  # a number beats a NaN best
    assert not es.step(0.5, 3) and not es.should_stop  # equal is not better
    assert es.step(0.6, 4) and es.bad_epochs == 0
    assert not es.step(float("nan"), 5)
    assert not es.step(0.59, 6) and es.should_stop
    assert (es.best, es.best_epoch) == (0.6, 4)
    low = engine.EarlyStopping(patience=1, mode="min", min_delta=0.1)
    low.step(1.0, 1)
    assert not low.step(0.95, 2) and low.should_stop  # within min_delta: no improvement
    restored = engine.EarlyStopping(patience=2)
    restored.load_state_dict(es.state_dict())
    assert (restored.best, restored.best_epoch, restored.bad_epochs) == (0.6, 4, 2)


def test_fit_stops_early_when_val_metric_stops_improving(tmp_path, capsys):
    # lr 0: the val metric is the same every epoch, so epoch 1 stays best and training
    # must stop after `patience` more epochs, not run all 10
    result, files = _fit(tmp_path, epochs=10, patience=2, sgd_lr0=True)
    assert result["epochs_run"] == 3 and result["stopped_early"] and result["best_epoch"] == 1
    assert "Early stopping at epoch 3" in capsys.readouterr().out
    hist = pd.read_csv(files.metrics_csv)
    assert list(hist.columns) == list(engine.HISTORY_COLUMNS)
    assert hist["epoch"].tolist() == [1, 2, 3]
    assert hist["val_f1"].nunique() == 1
    assert not files.last.exists()  # the resumable state is dropped once finished
    ckpt = load_checkpoint(files.best, expect={"kind": "fracture", "num_classes": 2})
    assert ckpt["finished"] and ckpt["epoch"] == 1 and ckpt["metrics"]["val_n"] == 48
    assert ckpt["settings"] == SETTINGS
    build_from_checkpoint(ckpt)


def test_fit_keeps_best_epoch_and_logs(tmp_path, capsys):
    result, files = _fit(tmp_path, epochs=3)
    out = capsys.readouterr().out
    assert "[Epoch 1] Train Loss" in out and "[Epoch 3] Val Loss" in out and "true pos" in out
    hist = pd.read_csv(files.metrics_csv)
    best = hist.loc[hist["val_f1"].idxmax()]
    assert result["best_epoch"] == int(best["epoch"])
    assert result["best_metrics"]["val_f1"] == pytest.approx(best["val_f1"])
    assert hist["lr"].iloc[0] < hist["lr"].iloc[1]  # warm-up then cosine
    assert (hist["images_per_s"] > 0).all()


def test_resume_after_interrupt_gives_the_uninterrupted_result(tmp_path, capsys):
    straight, _ = _fit(tmp_path / "a", epochs=3)
    # Ctrl-C in the middle of epoch 2's training (epoch 1 = 48 train + 48 val fetches)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", epochs=3, train_ds=InterruptAfter(_data(), 48 + 20))
    out = capsys.readouterr().out
    assert "Interrupted during epoch 2. State of epoch 1 is saved" in out
    files = engine.RunFiles.from_stem(tmp_path / "b", "m")
    state = load_checkpoint(files.last)
    assert state["epoch"] == 1 and "optimizer" in state and "rng" in state and state["sampler_epoch"] == 1

    # different essential settings: refused, naming the setting
    with pytest.raises(engine.ResumeError, match="img_size: saved 16, now 32"):
        _fit(tmp_path / "b", epochs=3, resume=True, settings={**SETTINGS, "img_size": 32})

    resumed, _ = _fit(tmp_path / "b", epochs=3, resume=True, init_seed=123)
    assert "Resuming from epoch 2" in capsys.readouterr().out
    a = pd.DataFrame(straight["history"]).drop(columns=["seconds", "images_per_s"])
    b = pd.DataFrame(resumed["history"]).drop(columns=["seconds", "images_per_s"])
    # optimizer, schedule, RNG (sampler order) restored: the same numbers as without the interruption
    pd.testing.assert_frame_equal(a, b)

    # finished: --resume does not retrain; --force with changed settings starts over
    again, _ = _fit(tmp_path / "b", epochs=3, resume=True)
    assert "already trained" in capsys.readouterr().out and again["best_epoch"] == resumed["best_epoch"]
    _fit(tmp_path / "b", epochs=1, resume=True, force=True, settings={**SETTINGS, "img_size": 32})
    assert "--force" in capsys.readouterr().out
    assert load_checkpoint(files.best)["settings"]["img_size"] == 32


CHANGED_SETTINGS = [
    ("model", "swin_demo", "model: saved 'cnn_demo', now 'swin_demo'"),
    ("classes", ["neg", "pos", "unsure"], "classes: saved ['neg', 'pos'], now ['neg', 'pos', 'unsure']"),
    ("train data", "other rows", "train data: saved 'synthetic', now 'other rows'"),
]


def test_resume_refused_for_changed_model_classes_and_data(tmp_path, capsys):
    files = engine.RunFiles.from_stem(tmp_path, "m")
    with pytest.raises(KeyboardInterrupt):  # an unfinished run: state of epoch 1 in `last`
        _fit(tmp_path, epochs=2, train_ds=InterruptAfter(_data(), 48 + 20))
    for key, value, shown in CHANGED_SETTINGS:
        with pytest.raises(engine.ResumeError) as err:
            _fit(tmp_path, epochs=2, resume=True, settings={**SETTINGS, key: value})
        assert str(err.value).startswith(f"{files.last}: cannot resume, essential settings differ: {shown}.")
    assert load_checkpoint(files.last)["epoch"] == 1  # refused before anything was trained or saved
    _fit(tmp_path, epochs=2, resume=True)  # the same settings resume and finish
    assert "Resuming from epoch 2" in capsys.readouterr().out
    for key, value, shown in CHANGED_SETTINGS:  # a finished model is not silently kept either
        with pytest.raises(engine.ResumeError) as err:
            _fit(tmp_path, epochs=2, resume=True, settings={**SETTINGS, key: value})
        assert str(err.value).startswith(f"{files.best}: cannot resume, essential settings differ: {shown}.")


def test_ctrl_c_right_after_an_epoch_is_reported_keeps_that_epoch(tmp_path, monkeypatch, capsys):
    # the H100 smoke run once lost a reported epoch: SIGINT landed between its Val line and
    # its save. Ctrl-C at the moment epoch 2's Val line is printed must keep epoch 2.
    printed = engine.log

    def log_then_interrupt(*parts: object) -> None:
        printed(*parts)
        if str(parts[0]).startswith("[Epoch 2] Val"):
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "log", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, epochs=3)
    assert "State of epoch 2 is saved" in capsys.readouterr().out
    assert load_checkpoint(engine.RunFiles.from_stem(tmp_path, "m").last)["epoch"] == 2


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = metrics.compute_metrics(probs, labels)
    assert m["f1"] == pytest.approx(f1_score(labels, p1 > 0.5))
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p1))
    assert np.sum(m["confusion_matrix"]) == 200 and m["n"] == 200
    labels3 = rng.integers(0, 3, 90)
    probs3 = rng.dirichlet([1, 1, 1], 90)
    m3 = metrics.compute_metrics(probs3, labels3)
    assert m3["f1"] == pytest.approx(f1_score(labels3, probs3.argmax(1), average="macro"))
    assert m3["auroc"] == pytest.approx(roc_auc_score(labels3, probs3, multi_class="ovr"))
    assert math.isnan(metrics.compute_metrics(probs[:5], np.ones(5, int))["auroc"])  # one class: undefined
    # one-logit and two-logit heads give the same [N, 2] probabilities
    z = torch.randn(7)
    two = engine.to_probs(torch.stack([torch.zeros(7), z], 1))
    assert torch.allclose(engine.to_probs(z), two, atol=1e-6)


def test_focal_alpha_two_class_equals_binary_focal():
    from torchvision.ops import sigmoid_focal_loss

    z = torch.randn(32)
    y = torch.randint(0, 2, (32,))
    two_logits = torch.stack([torch.zeros(32), z], 1)
    ours = recipe.make_criterion("focal", 2, 0.25, 2.0)(two_logits, y)
    ref = sigmoid_focal_loss(z, y.float(), alpha=0.25, gamma=2.0, reduction="mean")
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def _parse(argv: list[str]) -> argparse.Namespace:
    return presets.add_training_args(argparse.ArgumentParser()).parse_args(argv)


def test_config_precedence_preset_yaml_cli(tmp_path):
    cfg = presets.resolve_config(_parse([]), "age")
    assert cfg.preset == "demo" and cfg.model == presets.DEMO_RECIPE["model"] and cfg.loss == "ce"
    paper = presets.resolve_config(_parse(["--preset", "paper"]), "fracture")
    assert (paper.model, paper.img_size, paper.lr, paper.batch_size) == (
        "swin_large_patch4_window12_384.ms_in22k", 384, 1e-5, 16)
    assert paper.loss == "focal" and (paper.focal_alpha, paper.focal_gamma) == (0.25, 2.0) and paper.pretrained
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: paper\nbatch-size: 8\nepochs: 3\nfracture:\n  epochs: 7\n")
    cfg = presets.resolve_config(_parse(["--config", str(yml), "--epochs", "2", "--no-pretrained"]), "fracture")
    assert (cfg.preset, cfg.batch_size, cfg.epochs, cfg.pretrained) == ("paper", 8, 2, False)
    assert presets.resolve_config(_parse(["--config", str(yml)]), "fracture").epochs == 7
    assert presets.resolve_config(_parse(["--config", str(yml)]), "age").epochs == 3
    yml.write_text("batch_sise: 8\n")
    with pytest.raises(SystemExit, match="unknown option 'batch_sise'"):
        presets.resolve_config(_parse(["--config", str(yml)]), "age")
    argv = presets.explicit_training_argv(_parse(["--epochs", "2", "--no-pretrained", "--quiet"]))
    assert argv == ["--epochs", "2", "--no-pretrained", "--quiet"]


def test_each_training_option_is_one_typed_field_with_its_flag_help_and_preset_values():
    actions = {a.dest: a for a in presets.add_training_args(argparse.ArgumentParser())._actions}
    for f in train_config.options():
        action = actions[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.help.replace("%%", "%").startswith(f.metadata["help"]), f.name
        assert all(f.name in presets.PRESETS[p] for p in presets.PRESETS), f.name
    assert all(set(values) == set(train_config.TRAIN_KEYS) for values in presets.PRESETS.values())
    # a value the field's parser refuses is refused on the command line
    with pytest.raises(SystemExit):
        _parse(["--drop-path", "1.0"])
    # the record: every command-line key, the effective training values and the preset
    args = _parse(["--epochs", "2"])
    record = presets.resolve_config(args, "fracture").record()
    assert set(record) == set(vars(args)) | {"preset"}
    assert (record["epochs"], record["metric"], record["preset"], record["resume"]) == (2, "auroc", "demo", False)


def test_fused_adamw_takes_the_same_steps_as_the_default():
    # the fused kernel is what build_optimizer picks on CUDA; on the CPU it is asked for
    # explicitly (torch >= 2.4 has it there too) to check that timm passes the flag through
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 2, (16,))

    def flat(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    params = []
    for fused in (None, True):
        torch.manual_seed(1)
        model = create_model("cnn_demo", num_classes=2)
        start = flat(model)
        opt = recipe.build_optimizer(model, lr=1e-2, weight_decay=0.05, fused=fused)
        assert bool(opt.defaults.get("fused")) is bool(fused)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        params.append(flat(model))
        assert (params[-1] - start).abs().max() > 1e-3  # the steps moved the weights
    # the same update up to float rounding, which Adam's 1/sqrt(v) amplifies on tiny gradients
    torch.testing.assert_close(params[1], params[0], rtol=1e-3, atol=1e-4)
