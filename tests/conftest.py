"""Shared fixtures: a tiny phantom dataset and its stage 1 + 2 splits.

- ``tiny_phantom`` (session): a directory holding a phantom GRAZPEDWRI-DX layout
  (``dataset.csv`` + ``images/``), 40 patients at 64 px, seed 0. Read-only by
  convention: tests that damage images work on copies.
- ``tiny_splits`` (session): an output directory where stages 1 and 2 ran on
  ``tiny_phantom`` (``age_test.csv``, ``age_pool.csv``, ``age_train_tmp.csv``,
  ``age_val_tmp.csv`` and the manifests). Tests that write into a split directory
  (e.g. stage 3 adding predictions) should use ``fresh_splits``.
- ``fresh_splits`` (function): a private copy of ``tiny_splits``.
- ``shared_dir``: ``../shared`` next to the repository, or skip.
- ``one_thread`` (autouse): torch runs single-threaded in every test.
- ``real_metadata`` (session): the real GRAZPEDWRI-DX ``dataset.csv`` loaded and
  validated without looking at images (only two of them are in ``../shared``).
- ``damage_idat(path)``: corrupt a PNG's pixel data and leave everything else intact.
- ``fit_config(out_dir, **changes)``: the demo preset's fracture config for ``engine.fit``
  on tiny tensors: fp32, default memory format, quiet, writing under ``out_dir``.
- ``write_png_bomb(path)``: a small PNG whose header claims 50000 x 50000 pixels.
- ``assert_one_line(exc, file, row, *words)``: the error is one line naming file (and row).
"""
from __future__ import annotations

import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # flat top-level modules, importable however pytest is started
    sys.path.insert(0, str(REPO))

import columns  # noqa: E402

TINY_PATIENTS = 40
TINY_IMG_SIZE = 64


def damage_idat(path: Path) -> Path:
    """Flip the middle half of the first IDAT chunk's bytes: signature, IHDR, the chunk
    lengths and the IEND at the end stay intact, so the cheap checks pass, but the pixels
    can no longer be decoded (a file damaged on disk or in transfer)."""
    data = bytearray(path.read_bytes())
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", bytes(data[pos:pos + 8]))
        if kind == b"IDAT":
            start = pos + 8 + length // 4
            data[start:start + length // 2] = bytes(b ^ 0xFF for b in data[start:start + length // 2])
            path.write_bytes(bytes(data))
            return path
        pos += 12 + length
    raise ValueError(f"{path}: no IDAT chunk")


def fit_config(out_dir: Path, **changes):
    """The demo preset's fracture config with ``changes``, in fp32 and the default memory
    format (the same numbers on every CPU), quiet, its run folder ``out_dir``."""
    import argparse
    import dataclasses

    import presets

    cfg = presets.resolve_config(argparse.Namespace(), "fracture")
    return dataclasses.replace(cfg, **{"amp": "off", "channels_last": False, "quiet": True, "out_dir": out_dir,
                                       **changes})


def default_sigint() -> None:
    """``preexec_fn`` for a child that must take Ctrl-C as a terminal delivers it: a suite
    started as a background job (``cmd &`` without job control) inherits SIGINT ignored, the
    child would too, and Python then installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_png_bomb(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A well-formed PNG of a few bytes (valid chunks and CRCs, a tiny IDAT) whose
    IHDR claims ``width`` x ``height`` 8-bit gray pixels: a decoder would allocate them all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def assert_one_line(exc: BaseException, file: Path | str, row: int | None, *words: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg, msg
    prefix = f"{file}:{row}: " if row is not None else f"{file}: "
    assert msg.startswith(prefix), msg
    for w in words:
        assert w in msg, msg


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: runs for many minutes (the paper preset on the CPU); "
                                       "`make test` skips these, `make test-slow` runs them")


@pytest.fixture(autouse=True)
def one_thread():
    """On 2 shared cores, intra-op threads fighting other processes make tiny models
    ~20x slower; one thread keeps the suite fast and changes no result."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phantom import generate_phantom

    out = tmp_path_factory.mktemp("tiny_phantom")
    generate_phantom(out, n_patients=TINY_PATIENTS, img_size=TINY_IMG_SIZE, seed=0, progress=False)
    return out


def run_stages_1_2(data_dir: Path, out_dir: Path, *extra1: str) -> dict:
    """Run stage 1 then stage 2 (default flags) on ``data_dir``; return both results."""
    import age_split_testset
    import generate_age_trainval_split

    r1 = age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--data-csv", str(data_dir / columns.DATASET_CSV), "--out-dir", str(out_dir), *extra1]))
    r2 = generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(
        ["--out-dir", str(out_dir)]))
    return {"stage1": r1, "stage2": r2}


@pytest.fixture(scope="session")
def tiny_splits(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_splits")
    run_stages_1_2(tiny_phantom, out)
    return out


@pytest.fixture
def fresh_splits(tiny_splits: Path, tmp_path: Path) -> Path:
    out = tmp_path / "splits"
    shutil.copytree(tiny_splits, out, ignore=shutil.ignore_patterns(".run.lock"))
    return out


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    shared = REPO.parent / "shared"
    if not (shared / "grazpedwri-dx" / columns.DATASET_CSV).is_file():
        pytest.skip("../shared/grazpedwri-dx is not present")
    return shared


@pytest.fixture(scope="session")
def real_metadata(shared_dir: Path):
    import tables
    data = shared_dir / "grazpedwri-dx"
    return tables.validate_frame(tables.load_grazpedwri(data / columns.DATASET_CSV, data), checks=tables.Checks(images=False))
