"""logs.py: progress lines without a terminal, and TensorBoard scalars of a real fit."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import columns
import engine
import logs
import models
import recipe
from conftest import fit_config
from models import create_model

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<desc>.+): step (?P<step>\d+)/(?P<total>\d+) \| (loss (?P<loss>[\d.]+) \| )?"
                  r"(?P<rate>[\d.]+) img/s \| ETA \d+:\d\d:\d\d$")


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 1] += 1.0
    return TensorDataset(x, y)


def _fit(out: Path, epochs: int, resume: bool = False) -> dict:
    engine.seed_everything(0)
    model = create_model("cnn_demo", num_classes=2)
    train = _data(48, 0)
    opt = recipe.build_optimizer(model, 3e-3, 0.01)
    cfg = fit_config(out, epochs=epochs, metric="f1", patience=10, resume=resume, quiet=False)
    spec = models.ModelSpec(model_name="cnn_demo", kind="fracture", class_names=["neg", "pos"], img_size=16,
                            mean=0.5, std=0.25, age_bounds=[8.0, 15.0])
    learner = engine.Learner(model, recipe.make_criterion("focal", 2), opt,
                             recipe.build_scheduler(opt, "cosine", epochs))
    loaders = engine.Loaders(DataLoader(train, batch_size=16, sampler=RandomSampler(train)),
                             DataLoader(_data(32, 1), batch_size=16))
    return engine.fit(learner, loaders, cfg, torch.device("cpu"), engine.RunFiles.from_stem(out, "m"),
                      engine.CheckpointRecord(spec, {"model": "cnn_demo"}))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_progress_lines_when_stdout_is_not_a_terminal():
    code = ("import logs\n"
            "for _ in logs.Progress([[1, 2]] * 5, 'epoch 1 train', every_s=0):\n"
            "    pass\n")
    # a Python start importing torch: 8 s measured on 2 cores at load 15; 300 s (40x) only stops a hang
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # a line after every step but the last (the caller's epoch line follows that one)
    assert [LINE.match(line)["step"] for line in lines] == ["1", "2", "3", "4"], lines
    assert all(LINE.match(line)["total"] == "5" for line in lines)
    assert done.stderr == ""  # no tqdm bar drawn into a log


def test_progress_every_n_steps_shows_loss_and_a_terminal_gets_no_lines(capsys):
    bar = logs.Progress([torch.zeros(4, 1)] * 7, "predict", bar=False, every_s=1e9, every_steps=3)
    for i, _ in enumerate(bar):
        bar.set_loss(torch.tensor(0.5 + i))
    lines = capsys.readouterr().out.splitlines()
    assert [LINE.match(line)["step"] for line in lines] == ["3", "6"]
    assert LINE.match(lines[0])["loss"] == "2.5000" and float(LINE.match(lines[0])["rate"]) > 0
    assert bar.images == 28 and bar.estimate()[1] == 0.0
    for _ in logs.Progress(range(3), "x", enabled=False, every_s=0):
        pass
    assert capsys.readouterr().out == ""


def test_fit_prints_progress_lines_and_writes_tensorboard_scalars(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.0)
    result = _fit(tmp_path, epochs=2)
    out = capsys.readouterr().out
    found = [m.groupdict() for m in map(LINE.match, out.splitlines()) if m]
    assert {"epoch 1 train", "epoch 2 train", "epoch 1 val", "epoch 2 val"} <= {f["desc"] for f in found}
    assert all(f["loss"] for f in found if f["desc"].endswith("train"))

    scalars = _scalars(columns.RunDir(tmp_path).tensorboard_dir / "m")
    for tag in ("train/loss", "val/loss", "val/f1", "val/auroc", "train/acc", "lr", "train/images_per_s"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    history = result["history"]
    assert [v for _, v in scalars["val/loss"]] == [float(torch.tensor(r["val_loss"]).float()) for r in history]
    assert [v for _, v in scalars["lr"]] == [float(torch.tensor(r["lr"]).float()) for r in history]
    # 48 images in batches of 16: three steps per epoch, numbered across epochs
    assert [step for step, _ in scalars["train/step_loss"]] == [1, 2, 3, 4, 5, 6]
    # one projection of the whole training, after the first epoch's first steps
    notes = [line for line in out.splitlines() if line.startswith("estimate from the first")]
    assert len(notes) == 1 and "for 2 epoch(s)" in notes[0] and out.index(notes[0]) < out.index("[Epoch 1]")
    assert all(v > 0 for _, v in scalars["train/step_loss"])


def test_a_rate_below_one_image_a_second_reads_as_seconds_per_image():
    assert logs.format_rate(35.24) == "35.2 img/s"
    assert logs.format_rate(123 / 4140) == "33.7 s/img"  # Swin-L on 2 cores: not "0.0 img/s"
    assert logs.format_rate(float("nan")) == logs.format_rate(0.0) == "- img/s"


def test_the_first_steps_callback_comes_even_when_an_epoch_is_shorter():
    model = create_model("cnn_demo", num_classes=2)
    seen = []
    step = engine.StepContext(recipe.make_criterion("ce", 2), recipe.build_optimizer(model, 1e-3, 0.0),
                              engine.Compute(torch.device("cpu"), "off"))
    display = engine.Display(on_first=lambda bar: seen.append((bar.steps, bar.estimate()[0] > 0)))
    engine.train_one_epoch(model, DataLoader(_data(8, 0), batch_size=8), step, display=display)
    assert seen == [(1, True)]


def test_a_step_longer_than_the_interval_still_gets_a_line_every_interval(capsys):
    # each step sleeps 2 s against a 0.2 s interval (10x): a line must come while the first
    # step is still running, not only after it; the heartbeat wakes every 0.05 s
    for _ in logs.Progress(range(2), "evaluate test", bar=False, every_s=0.2):
        time.sleep(2.0)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("evaluate test: step 0/2") for line in lines), lines
    assert any(line.startswith("evaluate test: step 1/2") for line in lines), lines
    assert all("ETA" in line for line in lines)
