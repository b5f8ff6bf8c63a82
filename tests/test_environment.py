"""The lock, the environment record and the note for checkpoints made under other versions."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

import columns
import environment
import inference
import models

ROOT = Path(__file__).resolve().parents[1]


def _lock_pins() -> dict[str, Version]:
    """The lock's pins that apply to this interpreter and platform."""
    env = default_environment()
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: not an exact pin"
            pins[req.name.lower()] = Version(spec.version)
    return pins


def test_lock_pins_satisfy_the_loose_ranges() -> None:
    # A requirements.txt edited without `make lock` shows here, not on a user's machine.
    pins = _lock_pins()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = req.name.lower()
            assert name in pins, f"{name} is in requirements.txt but not in requirements.lock"
            assert req.specifier.contains(pins[name], prereleases=True), f"lock has {name}=={pins[name]}, outside {req}"


def test_installed_versions_are_the_locked_ones_in_a_locked_venv() -> None:
    state = environment.lock_state()
    if not state["matches"]:
        pytest.skip("not running in a venv installed from this lock (make test-latest, or your own environment)")
    pins = _lock_pins()
    for pkg, version in environment.versions().items():
        if pkg != "python":
            assert Version(version) == pins[pkg], f"{pkg} {version} installed, {pins[pkg]} locked"


def test_lock_state_follows_the_stamp(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.0.0\n")
    sha = environment.file_sha256(lock)
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
    assert environment.lock_state(lock, tmp_path) == {"sha256": sha, "installed_from": None, "matches": False}
    (tmp_path / environment.STAMP_NAME).write_text(sha + "\n")
    assert environment.lock_state(lock, tmp_path)["matches"]
    lock.write_text("numpy==2.0.1\n")  # the lock moved on, the venv did not
    assert not environment.lock_state(lock, tmp_path)["matches"]


def test_describe_records_versions_machine_and_threads() -> None:
    env = environment.describe()
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["machine"]["torch_threads"] == torch.get_num_threads()
    assert isinstance(env["machine"]["cpu_native_bf16"], bool) and env["machine"]["cpu"]


def test_version_note_names_what_moved() -> None:
    current = environment.versions()
    assert environment.version_note({"a.pt": dict(current)}) is None
    old = dict(current, numpy="1.0.0", unknown_pkg="9")
    note = environment.version_note({"a.pt": old, "b.pt": dict(current)})
    assert note is not None and "a.pt" in note and "b.pt" not in note
    assert f"numpy 1.0.0 (now {current['numpy']})" in note and "unknown_pkg" not in note


def test_routed_models_note_a_checkpoint_from_other_versions(tmp_path: Path) -> None:
    models_dir = tmp_path / columns.MODELS_DIR
    models_dir.mkdir()

    def save(stem: str, kind: str, names: list[str], **extra) -> None:
        model = models.create_model("cnn_demo", num_classes=len(names), in_chans=1)
        spec = models.ModelSpec(model_name="cnn_demo", kind=kind, class_names=names, img_size=32, mean=0.5,
                                std=0.25, age_bounds=columns.AGE_BOUNDS)
        ckpt = models.make_checkpoint(model, spec, **extra)
        models.save_checkpoint(models_dir / f"{stem}.pt", ckpt)

    save(columns.AGE_MODEL, "age", list(columns.AGE_GROUP_NAMES))
    save(columns.fracture_model(columns.POOLED_ROLE), "fracture", ["normal", "fracture"])
    routed = inference.load_routed_models(models_dir, torch.device("cpu"))
    assert not any("other versions" in n for n in routed.notes)
    ckpt = models.load_checkpoint(models_dir / f"{columns.AGE_MODEL}.pt")
    assert ckpt["environment"]["lock"]["sha256"] == environment.lock_state()["sha256"]
    ckpt["versions"] = dict(ckpt["versions"], torch="1.0.0")
    models.save_checkpoint(models_dir / f"{columns.AGE_MODEL}.pt", ckpt)
    routed = inference.load_routed_models(models_dir, torch.device("cpu"))
    (note,) = [n for n in routed.notes if "other versions" in n]
    assert "age_classifier.pt" in note and "torch 1.0.0" in note
