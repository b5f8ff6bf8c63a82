"""image_io.py's refusals of unusable image files: non-regular files, decompression bombs,
a full disk under the cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import columns
import image_io
import tables
from conftest import assert_one_line
from errors import DataError


def test_decompression_bomb_is_refused_in_one_line_or_set_aside(tiny_phantom: Path, tmp_path: Path) -> None:
    import age_split_testset
    from conftest import write_png_bomb

    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    df = tables.load_grazpedwri(data / columns.DATASET_CSV)
    bomb = write_png_bomb(Path(df.loc[5, "image_path"]))
    reason = "image too large to decode (50000x50000 px"
    assert image_io.check_image_file(bomb).startswith(reason)  # from the header: nothing is allocated
    with pytest.raises(DataError) as err:
        image_io.read_raw(bomb)
    assert_one_line(err.value, bomb, None, reason)
    args = ["--data-csv", str(data / columns.DATASET_CSV), "--out-dir", str(tmp_path / "out"), "--decode-check"]
    with pytest.raises(DataError) as err:
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(args))
    assert_one_line(err.value, data / columns.DATASET_CSV, 5, reason, str(bomb))
    res = age_split_testset.main(age_split_testset.get_args_parser().parse_args(args + ["--skip-bad"]))
    bad = pd.read_csv(res["rejected_csv"])
    assert bad["source_row"].tolist() == [5] and reason in bad["reason"][0]


_FULL_DISK_SCRIPT = r"""
import errno, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import errors, image_io
mnt, png = Path(sys.argv[2]), Path(sys.argv[3])
fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(1 << 16))
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
os.ftruncate(fd, os.fstat(fd).st_size - 8192)  # two pages free: less than one 96 px entry
os.close(fd)
try:
    image_io.ImageCache(mnt / "cache", 96).get(png)
    print("written")
except errors.DiskFullError as exc:
    print(f"DiskFullError: {exc}")
print("left:", sorted(p.name for p in mnt.rglob("*") if p.is_file() and p.name != "filler"))
"""


def test_a_full_disk_while_caching_is_one_line_and_leaves_no_partial_entry(tmp_path: Path) -> None:
    """On a real full filesystem (a 1 MB tmpfs in a user namespace, no root needed): np.save
    would report the short write without an errno, which no disk-full check recognises."""
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-r", "-m", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("unprivileged user and mount namespaces are not available")
    png = tmp_path / "scan.png"
    cv2.imwrite(str(png), np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"'
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", mount, "sh", str(mnt), sys.executable, "-c",
                           _FULL_DISK_SCRIPT, str(Path(__file__).resolve().parents[1]), str(mnt), str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"DiskFullError: {mnt / 'cache'}/") and "no space left on device" in lines[0], lines
    assert lines[1] == "left: []"  # neither the entry nor its temporary file


def test_fifo_socket_and_device_are_refused_not_read(tmp_path: Path) -> None:
    import socket

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    dev = tmp_path / "zero.png"
    dev.symlink_to("/dev/zero")  # reading it would never end
    try:
        for path, kind in ((fifo, "FIFO"), (sock_path, "socket"), (dev, "character device")):
            reason = image_io.check_image_file(path, decode=True)
            assert reason == f"image path is not a regular file ({kind}): {path}"
            with pytest.raises(DataError) as err:
                image_io.read_raw(path)
            assert_one_line(err.value, path, None, f"not a regular file ({kind})")
    finally:
        sock.close()
