"""Figures (PNG, matplotlib Agg) and Markdown helpers for the evaluation report.

Every figure is written atomically through :mod:`io_utils`, so a report directory never
holds a half-written PNG. Functions take plain arrays and DataFrames, not models, so they
can be reused for any run's CSVs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from io_utils import atomic_write  # noqa: E402

# One colour per system, the same in every figure.
SYSTEM_COLORS = {
    "hard": "tab:blue", "soft": "tab:green", "oracle": "tab:purple", "pooled": "tab:orange",
}
_FALLBACK_COLORS = ["tab:red", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
_DPI = 110


def _color(name: str, i: int) -> str:
    return SYSTEM_COLORS.get(name, _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI,
                                                          bbox_inches="tight"))
    finally:
        plt.close(fig)


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


# --------------------------------------------------------------------------- ROC
def plot_roc_panels(
    panels: Mapping[str, Mapping[str, tuple]],
    path: str | os.PathLike,
    title: str = "ROC curves",
) -> Path:
    """ROC curves of several systems per panel (e.g. overall and per age group).

    ``panels``: panel title -> system name -> ``(y_true, prob)`` or ``(y_true, prob,
    threshold)``; a threshold is drawn as the system's operating point. A panel whose labels
    hold one class only says so instead of drawing a curve.
    """
    rows, cols = _grid(max(len(panels), 1), 2 if len(panels) == 4 else 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax, (ptitle, systems) in zip(axes.flat, panels.items()):
        ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
        n_info = ""
        for i, (name, spec) in enumerate(systems.items()):
            y, p = np.asarray(spec[0]).astype(int), np.asarray(spec[1], float)
            n_info = f"n={y.size}, pos={int(y.sum())}"
            if not 0 < y.sum() < y.size:
                ax.text(0.5, 0.5, "one class only:\nno ROC curve", ha="center", va="center",
                        transform=ax.transAxes, color="0.3")
                break
            fpr, tpr, _ = roc_curve(y, p)
            color = _color(name, i)
            ax.plot(fpr, tpr, color=color, lw=1.8,
                    label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
            if len(spec) > 2 and spec[2] is not None:
                pred = p >= spec[2]
                sens = (pred & (y == 1)).sum() / max((y == 1).sum(), 1)
                fpr_t = (pred & (y == 0)).sum() / max((y == 0).sum(), 1)
                ax.plot([fpr_t], [sens], "o", color=color, ms=6, mec="k", mew=0.6)
        ax.set_title(f"{ptitle}  ({n_info})", fontsize=10)
        ax.set_xlabel("1 - specificity (FPR)")
        ax.set_ylabel("sensitivity (TPR)")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title}  (dots: operating point at the validation threshold)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- confusion
def plot_confusion_matrices(
    matrices: Mapping[str, Any],
    path: str | os.PathLike,
    class_names: Sequence[str] | Mapping[str, Sequence[str]] = ("no fracture", "fracture"),
    title: str | None = None,
    max_cols: int = 4,
) -> Path:
    """Annotated confusion matrices (rows true, columns predicted), count and row %.

    ``class_names`` is one list for all panels or a mapping panel -> list.
    """
    rows, cols = _grid(max(len(matrices), 1), max_cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, cm) in zip(axes.flat, matrices.items()):
        cm = np.asarray(cm, dtype=float)
        names = class_names[name] if isinstance(class_names, Mapping) else class_names
        row_sum = cm.sum(1, keepdims=True)
        frac = np.divide(cm, row_sum, out=np.zeros_like(cm), where=row_sum > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, f"{int(cm[i, j])}\n{100 * frac[i, j]:.0f}%", ha="center",
                        va="center", fontsize=9, color="white" if frac[i, j] > 0.55 else "black")
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
    for ax in list(axes.flat)[len(matrices):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- training
_METRIC_HINTS = ("acc", "f1", "auroc", "auc", "sens", "spec", "prec", "recall", "ppv", "npv")
# The metric that the trainers early-stop on, in order of preference, for the best-epoch mark.
_BEST_PRIORITY = ("val_macro_f1", "val_f1", "val_auroc", "val_acc", "val_accuracy")


def _base(col: str) -> str:
    low = col.lower()
    for prefix in ("train_", "val_", "valid_", "test_"):
        if low.startswith(prefix):
            return low[len(prefix):]
    return low


def read_history(source: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """A per-epoch metrics table from a CSV path or DataFrame (numeric columns only)."""
    df = source.copy() if isinstance(source, pd.DataFrame) else pd.read_csv(source)
    num = df.apply(pd.to_numeric, errors="coerce")
    keep = [c for c in num.columns if num[c].notna().any()]
    num = num[keep]
    if "epoch" not in num.columns:
        num.insert(0, "epoch", np.arange(1, len(num) + 1))
    return num


def plot_training_curves(
    histories: Mapping[str, str | os.PathLike | pd.DataFrame],
    path: str | os.PathLike,
    title: str = "Training curves",
) -> Path:
    """Loss and metric curves per model: one row per model, loss left, metrics right.

    Tolerant to missing columns: every ``*loss*`` column is a loss, every column whose
    name mentions acc/f1/auroc/... is a metric; train columns dashed, val solid. The best
    epoch of the early-stopping metric (val macro-F1, F1, AUROC or accuracy) is marked.
    """
    n = max(len(histories), 1)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.0 * n), squeeze=False)
    for (name, src), (ax_l, ax_m) in zip(histories.items(), axes):
        try:
            h = read_history(src)
        except Exception as exc:  # a missing or unreadable history must not lose the report
            ax_l.text(0.5, 0.5, f"{name}: no history ({type(exc).__name__})", ha="center",
                      transform=ax_l.transAxes)
            ax_l.axis("off")
            ax_m.axis("off")
            continue
        ep = h["epoch"]
        losses = [c for c in h.columns if "loss" in c.lower()]
        mets = [c for c in h.columns if c != "epoch" and c not in losses
                and any(t in c.lower() for t in _METRIC_HINTS)]
        bases: dict[str, str] = {}
        for c in losses + mets:  # train_x and val_x share a colour: dashed train, solid val
            bases.setdefault(_base(c), f"C{len(bases) % 10}")
        for ax, cols in ((ax_l, losses), (ax_m, mets)):
            for c in cols:
                ax.plot(ep, h[c], ls="--" if c.lower().startswith("train") else "-",
                        marker=".", color=bases[_base(c)], label=c)
        monitored = [c for c in _BEST_PRIORITY if c in h.columns and h[c].notna().any()]
        if monitored:
            m = monitored[0]
            best = int(h[m].idxmax())
            ax_m.axvline(ep[best], color="0.5", ls=":", lw=1)
            ax_m.text(0.02, 0.03, f"best {m} {h[m][best]:.3f} (epoch {ep[best]})",
                      transform=ax_m.transAxes, fontsize=8, color="0.3")
        ax_l.set_title(f"{name}: loss", fontsize=10)
        ax_m.set_title(f"{name}: metrics", fontsize=10)
        ax_m.set_ylim(-0.02, 1.02)
        for ax in (ax_l, ax_m):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best", ncol=2)
        if not losses:
            ax_l.text(0.5, 0.5, "no loss columns", ha="center", transform=ax_l.transAxes)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- calibration
def plot_calibration(
    curves: Mapping[str, tuple],
    path: str | os.PathLike,
    n_bins: int = 10,
    title: str = "Calibration (reliability) on the test set",
) -> Path:
    """Reliability diagram (quantile bins) with the probability histogram below."""
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.6, 6.6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1, label="perfectly calibrated")
    for i, (name, (y, p)) in enumerate(curves.items()):
        y, p = np.asarray(y).astype(int), np.asarray(p, float)
        color = _color(name, i)
        if 0 < y.sum() < y.size:
            bins = max(2, min(n_bins, y.size // 10))
            frac_pos, mean_pred = calibration_curve(y, p, n_bins=bins, strategy="quantile")
            brier = float(np.mean((p - y) ** 2))
            ax.plot(mean_pred, frac_pos, marker="o", ms=4, color=color,
                    label=f"{name} (Brier {brier:.3f})")
        axh.hist(p, bins=20, range=(0, 1), histtype="step", color=color, lw=1.5, label=name)
    ax.set_ylabel("observed fracture rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    axh.set_xlabel("predicted fracture probability")
    axh.set_ylabel("images")
    axh.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Grad-CAM
def plot_cam_grid(
    items: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "Grad-CAM examples",
) -> Path:
    """A grid: per example the image (top) and the Grad-CAM overlay (bottom).

    Each item: ``image`` (HxW float in [0, 1], the original image in its display window),
    ``cam`` (HxW in [0, 1], the same size), ``caption`` (above the column) and ``overlay``
    (text written on the overlay, e.g. the predicted age group, probability and threshold).
    """
    n = max(len(items), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.9 * n, 7.0), squeeze=False)
    for j, item in enumerate(items):
        img = np.asarray(item["image"], float)
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(item.get("caption", ""), fontsize=8)
        axes[1, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(np.asarray(item["cam"], float), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        if item.get("overlay"):
            axes[1, j].text(0.02, 0.98, item["overlay"], transform=axes[1, j].transAxes, va="top", ha="left",
                            fontsize=7, color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if items:
        axes[0, 0].set_ylabel("image", fontsize=9)
        axes[1, 0].set_ylabel("Grad-CAM", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Markdown
def fmt_ci(value: float, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    """``0.912 [0.880, 0.940]``; ``n/a`` for NaN."""
    if value is None or not np.isfinite(value):
        return "n/a"
    s = f"{value:.{digits}f}"
    if ci is not None and len(ci) == 2 and all(np.isfinite(ci)):
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def markdown_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]],
                   columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table from a DataFrame or a list of dicts (values via ``str``)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    cols = list(columns) if columns is not None else list(df.columns)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = "n/a" if not np.isfinite(v) else f"{v:.3f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines) + "\n"


def text_table(rows: pd.DataFrame | Sequence[Mapping[str, Any]],
               columns: Sequence[str] | None = None) -> str:
    """The same table aligned for a terminal."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    cols = list(columns) if columns is not None else list(df.columns)
    cells = [[str(c) for c in cols]] + [[str(r[c]) for c in cols] for _, r in df.iterrows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def figure_link(path: str | os.PathLike, report_dir: str | os.PathLike, alt: str) -> str:
    """A Markdown image link relative to the report's directory."""
    rel = os.path.relpath(Path(path), Path(report_dir))
    return f"![{alt}]({Path(rel).as_posix()})"


def existing(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The paths that exist (helper for optional figures)."""
    return [Path(p) for p in paths if Path(p).exists()]
