"""Rewrite the phantom's golden references (tests/golden/*.npz, *.csv) from the current code.

Run it only when a change to phantom.py is MEANT to change the images, and say so in the
commit; tests/test_phantom.py compares every later run with these files, within the
tolerances it states.

    python tests/golden/regenerate.py
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import columns  # noqa: E402
import phantom  # noqa: E402

# seed, n_patients, img_size, block (1 = every pixel, else block means)
CASES = ((3, 12, 64, 1), (0, 20, 256, 8), (16, 20, 160, 8))
LAYERS_CASE = (16, 20, 59, 160)  # seed, n_patients, row (plate with screws), img_size


def block_means(img: np.ndarray, block: int) -> np.ndarray:
    """Means of ``block`` x ``block`` tiles (edge rows/columns that do not fill a tile dropped)."""
    h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
    tiles = img[:h, :w].astype(np.float64).reshape(h // block, block, w // block, block)
    return tiles.mean(axis=(1, 3))


def case_name(seed: int, img_size: int) -> str:
    return f"phantom_seed{seed}_{img_size}px"


def main() -> None:
    for seed, n_patients, img_size, block in CASES:
        work = Path(tempfile.mkdtemp())
        try:
            csv_path = phantom.generate_phantom(work, n_patients=n_patients, img_size=img_size, seed=seed,
                                                progress=False)
            shutil.copyfile(csv_path, HERE / f"{case_name(seed, img_size)}.csv")
            stems = pd.read_csv(csv_path, encoding="utf-8-sig", dtype=str, keep_default_na=False)["filestem"]
            arrays = {}
            for stem in stems:
                img = cv2.imread(str(work / columns.IMAGES_DIR / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
                arrays[stem] = img if block == 1 else block_means(img, block).astype(np.float32)
            np.savez_compressed(HERE / f"{case_name(seed, img_size)}.npz", block=np.int64(block), **arrays)
        finally:
            shutil.rmtree(work)
    seed, n_patients, row, img_size = LAYERS_CASE
    df, hidden = phantom.draw_metadata(n_patients, seed=seed)
    layers: dict[str, np.ndarray] = {}
    phantom.render_image(df.iloc[row].to_dict(), hidden[row], img_size, layers=layers)
    np.savez_compressed(HERE / "phantom_layers.npz", **layers)


if __name__ == "__main__":
    main()
