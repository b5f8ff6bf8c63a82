"""The one dataset the stages share: the transforms and :class:`WristDataset`.

Rows come from ``tables`` (validated CSV frames); pixels from ``image_io`` (the reader and
the on-disk cache), so every stage feeds a model the same images in the same way.
"""
from __future__ import annotations

import os
from typing import Any

# albumentations checks PyPI for a newer release on import; the pipeline never reaches
# the network at run time (offline hospitals, CI), so that check is switched off.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

import image_io
from errors import DataError

def build_transforms(img_size: int, train: bool, mean: float, std: float) -> A.Compose:
    """Albumentations pipeline for one-channel radiographs already letterboxed to ``img_size``.

    Input: float32 HxW in [0, 1] (anything else is letterboxed to ``img_size`` first,
    a no-op for images from :class:`WristDataset`). Output: float32 tensor
    [1, H, W], ``(x - mean) / std``.
    Train: small affine (scale ±10 %, shift ±5 %, rotation ±10°), horizontal flip
    (left and right wrists mirror each other), brightness/contrast and gamma
    (exposure differences), slight Gaussian noise and blur. No colour or
    elastic transforms: they have no radiographic counterpart. Eval: normalise only.
    """
    size = [A.LongestMaxSize(max_size=img_size, interpolation=cv2.INTER_AREA),
            A.PadIfNeeded(img_size, img_size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0)]
    post = [A.Normalize(mean=float(mean), std=float(std), max_pixel_value=1.0), ToTensorV2()]
    if not train:
        return A.Compose(size + post)
    aug = [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.GaussNoise(std_range=(0.005, 0.03), p=0.2),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.8), p=0.1),
    ]
    return A.Compose(size + aug + post)


class WristDataset(Dataset):
    """One dataset for every stage: canonical frame rows -> (tensor [1,H,W], int label).

    ``target_col``: ``age_group``, ``age_group_label`` or ``fracture``; ``None``
    gives label -1 (inference). ``transform``: from :func:`build_transforms`
    (``None``: the [0, 1] image as a tensor). With ``cache_dir`` images come
    from an :class:`image_io.ImageCache`; without it they are decoded each time (both
    give identical pixels). Any failure while loading a sample is raised as a
    one-line ``DataError("<csv>:<row>: <reason>")``, where ``<csv>`` and
    ``<row>`` are ``df.attrs["source"]`` and the ``csv_row`` index.
    """

    def __init__(self, df: pd.DataFrame, target_col: str | None, transform: Any, img_size: int,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.source = str(df.attrs.get("source", "<DataFrame>"))
        if "image_path" not in df.columns:
            raise DataError.at(self.source, 1, "missing required column 'image_path'")
        self.rows = [int(r) if isinstance(r, (int, np.integer)) else r for r in df.index]
        self.paths = df["image_path"].astype(str).tolist()
        self.target_col = target_col
        if target_col is None:
            self.labels = [-1] * len(df)
        else:
            if target_col not in df.columns:
                raise DataError.at(self.source, 1, f"missing target column {target_col!r}")
            vals = pd.to_numeric(df[target_col], errors="coerce").astype("float64").to_numpy()
            bad = np.isnan(vals) | (vals < 0) | (np.mod(np.nan_to_num(vals), 1) != 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError.at(self.source, self.rows[i],
                                   f"label {target_col!r} must be an integer >= 0, got {df[target_col].iloc[i]!r}")
            self.labels = [int(v) for v in vals]
        self.transform = transform
        self.img_size = int(img_size)
        self.cache = image_io.ImageCache(cache_dir, img_size) if cache_dir is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> np.ndarray:
        """Sample ``i`` as float32 HxW in [0, 1], letterboxed to ``img_size``."""
        if self.cache is not None:
            arr = self.cache.get(self.paths[i])
        else:
            arr = image_io.load_resized(self.paths[i], self.img_size)
        return arr.astype(np.float32) * np.float32(1.0 / 65535.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            img = self.load_image(i)
            if self.transform is None:
                x = torch.from_numpy(img)[None]
            else:
                x = self.transform(image=img)["image"]
        except DataError as exc:
            raise DataError.at(self.source, self.rows[i], str(exc)) from None
        except Exception as exc:  # anything else still becomes one line naming the row
            raise DataError.at(self.source, self.rows[i],
                               f"{self.paths[i]}: {type(exc).__name__}: {exc}") from None
        return x, self.labels[i]

    def get_labels(self) -> list[int]:
        """Labels in order (torchsampler's ImbalancedDatasetSampler calls this)."""
        return list(self.labels)
