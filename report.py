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
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

import columns  # noqa: E402
import evidence  # noqa: E402
import metrics  # noqa: E402
from io_utils import atomic_write, write_text  # noqa: E402

# One colour per system, the same in every figure.
SYSTEM_COLORS = {
    "hard": "tab:blue", "soft": "tab:green", "oracle": "tab:purple", "pooled": "tab:orange",
    "pooled_continued": "tab:red",
}
_FALLBACK_COLORS = ["tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
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
    after: Mapping[str, tuple] | None = None,
) -> Path:
    """Reliability diagram (quantile bins) with the probability histogram below; legend
    entries give each system's ECE (``n_bins`` equal-width bins) and Brier score.

    ``curves``: system -> ``(y_true, prob)``. ``after``: the same after calibration (e.g.
    temperature scaling), drawn as a second column so before and after sit side by side.
    """
    columns = [("before calibration" if after else "", curves)] + ([("after recalibration", after)]
                                                                   if after else [])
    fig, axes = plt.subplots(2, len(columns), figsize=(5.6 * len(columns), 6.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for col, (label, sets) in enumerate(columns):
        ax, axh = axes[0, col], axes[1, col]
        ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1, label="perfectly calibrated")
        for i, (name, (y, p)) in enumerate(sets.items()):
            y, p = np.asarray(y).astype(int), np.asarray(p, float)
            color = _color(name, i)
            if 0 < y.sum() < y.size:
                bins = max(2, min(n_bins, y.size // 10))
                frac_pos, mean_pred = calibration_curve(y, p, n_bins=bins, strategy="quantile")
                ece = metrics.expected_calibration_error(y, p, n_bins)
                brier = float(np.mean((p - y) ** 2))
                ax.plot(mean_pred, frac_pos, marker="o", ms=4, color=color,
                        label=f"{name} (ECE {ece:.3f}, Brier {brier:.3f})")
            axh.hist(p, bins=20, range=(0, 1), histtype="step", color=color, lw=1.5, label=name)
        ax.set_ylabel("observed fracture rate")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"{title}: {label}" if label else title, fontsize=10)
        axh.set_xlabel("predicted fracture probability")
        axh.set_ylabel("images")
        axh.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability_per_system(panels: Mapping[str, Mapping[str, tuple]], path: str | os.PathLike,
                                n_bins: int = 10, title: str = "Reliability per system (test set)") -> Path:
    """One reliability diagram per system (``panels``: system -> curve label -> ``(y, prob)``,
    e.g. raw and each recalibration), quantile bins; the legend gives each curve's ECE."""
    rows, cols = _grid(max(len(panels), 1), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax, (system, curves) in zip(axes.flat, panels.items()):
        ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1)
        for i, (label, (y, p)) in enumerate(curves.items()):
            y, p = np.asarray(y).astype(int), np.asarray(p, float)
            if not 0 < y.sum() < y.size:
                continue
            frac_pos, mean_pred = calibration_curve(y, p, n_bins=max(2, min(n_bins, y.size // 10)),
                                                    strategy="quantile")
            ece = metrics.expected_calibration_error(y, p, n_bins)
            ax.plot(mean_pred, frac_pos, marker="o", ms=3, color=f"C{i}", label=f"{label} (ECE {ece:.3f})")
        ax.set_title(system, fontsize=10)
        ax.set_xlabel("predicted fracture probability")
        ax.set_ylabel("observed fracture rate")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- decision curve, flow
def plot_decision_curve(curve: Mapping[str, Sequence[float]], path: str | os.PathLike,
                        title: str = "Decision curve (test set, calibrated probabilities)") -> Path:
    """Net benefit over threshold probabilities per system, with treat-all and treat-none."""
    t = np.asarray(curve["threshold"], float)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    systems = [k for k in curve if k not in ("threshold", "treat_all", "treat_none")]
    for i, name in enumerate(systems):
        ax.plot(t, curve[name], color=_color(name, i), lw=1.8, label=name)
    ax.plot(t, curve["treat_all"], color="0.3", ls="--", lw=1.2, label="treat all")
    ax.plot(t, curve["treat_none"], color="0.6", ls=":", lw=1.2, label="treat none")
    top = max(max(curve[n]) for n in systems + ["treat_all"]) if systems else 1.0
    ax.set_ylim(-0.05, max(top, 0.05) * 1.1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit (per image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_flow(flow: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """A STARD-style flow diagram: source rows, exclusions, then the test set and the pool's
    train and validation partitions, with what each step set aside beside it."""
    flags = ", ".join(f"{k} {v}" for k, v in flow["excluded_by_flag"].items()) or "no flag"
    part = {k: flow[k] for k in ("train", "val", "test")}
    pool = part["train"]["images"] + part["val"]["images"] + flow["set_aside_unreadable_pool"]
    boxes = [  # (x, y, text)
        (0.5, 0.92, f"Source CSV\n{flow['source_rows']:,} images"),
        (0.5, 0.66, f"Eligible\n{flow['after_exclusions']:,} images"),
        (0.22, 0.40, f"Test set (fixed)\n{part['test']['images']:,} images\n{part['test']['patients']:,} patients"),
        (0.72, 0.40, f"Pool\n{pool:,} images"),
        (0.56, 0.10, f"Train\n{part['train']['images']:,} images\n{part['train']['patients']:,} patients"),
        (0.88, 0.10, f"Validation\n{part['val']['images']:,} images\n{part['val']['patients']:,} patients"),
    ]
    edges = [(0, 1), (1, 2), (1, 3), (3, 4), (3, 5)]
    notes = [(0.62, 0.79, f"set aside, unreadable: {flow['set_aside_unreadable']}\n"
                          f"excluded: {flow['excluded']} ({flags})"),
             (0.80, 0.40, f"set aside in the\npool split: {flow['set_aside_unreadable_pool']}"),
             (0.02, 0.02, f"not accounted for: {flow['not_accounted']}")]
    fig, ax = plt.subplots(figsize=(8.5, 6.0))
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    for a, b in edges:
        ax.annotate("", xy=(boxes[b][0], boxes[b][1] + 0.07), xytext=(boxes[a][0], boxes[a][1] - 0.07),
                    arrowprops={"arrowstyle": "->", "color": "0.4"})
    for x, y, text in boxes:
        ax.text(x, y, text, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "#e8f0fa", "edgecolor": "0.4"})
    for x, y, text in notes:
        ax.text(x, y, text, ha="left", va="center", fontsize=8, color="0.25")
    ax.set_title("Patient flow", fontsize=11)
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


# --------------------------------------------------------------------------- the report's text
SYSTEM_NAMES = {"pooled": "the plain pooled model",
                "pooled_continued": "the pooled model continued like the group models"}
SHORT_NAMES = {"pooled": "the plain pooled model", "pooled_continued": "the pooled, continued model"}
PROJECTIONS = {"1": "1 (AP/PA)", "2": "2 (lateral)", "3": "3 (oblique)"}
TABLE_METRICS = ("auroc", "auprc", "f1", "sensitivity", "specificity", "ppv", "npv", "accuracy")
CAPTIONS = {
    "roc": "ROC curves, overall and per true age group (dots: validation threshold)",
    "roc_cast": "ROC curves with and without a cast",
    "confusion": "Fracture confusion matrices at the validation thresholds",
    "age_confusion": "Age-group classifier confusion matrix",
    "calibration": "Calibration (reliability) of the fracture probabilities, before and after the chosen recalibration",
    "training": "Training curves from each model's per-epoch metrics CSV",
    "gradcam": "Grad-CAM of the hard-routed fracture model on test images",
    "flow": "Patient flow",
    "decision_curve": "Decision curve: net benefit of routed, control and plain pooled (calibrated probabilities)",
    "reliability": "Reliability diagram per system: raw, each recalibration, and the one chosen per model",
    "gradcam_errors": "Grad-CAM of the hard-routed system's most confident errors",
}


def pm(x: float) -> str:
    """A signed difference, ``+0.012``."""
    return f"{x:+.3f}" if x is not None and np.isfinite(x) else "n/a"


def fmt_diff(c: Mapping[str, float], level: int = 95) -> str:
    """``+0.012 (95% CI -0.004 to +0.027)`` from a paired-difference entry."""
    return f"{pm(c['diff'])} ({level}% CI {pm(c['lo'])} to {pm(c['hi'])})"


def _count(n: Any) -> str:
    return f"{int(n):,}" if n is not None else "not recorded"


def describe_init(init: Mapping[str, Any] | None) -> str:
    """Where a model's weights started, in words."""
    if not init:
        return "an unrecorded start"
    kind = init.get("kind")
    if kind == "random":
        return f"random weights (seed {init.get('seed')})"
    if kind == "pretrained":
        return f"pretrained weights ({init.get('source')})"
    if kind == "checkpoint":
        return (f"{init.get('checkpoint')} ({init.get('epochs_run')} epochs, "
                f"{_count(init.get('images_seen'))} training images)")
    return str(dict(init))


def _epochs(models: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{m['epochs_run']}/{m['epochs_max']}" for m in models)


def _with_init(budget: Mapping[str, Any]) -> Any:
    init = budget.get("init") or {}
    before = init.get("images_seen") if init.get("kind") == "checkpoint" else 0
    if budget.get("images_seen") is None or before is None:
        return None
    return budget["images_seen"] + before


def budget_rows(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per system family: models, start, epochs, images seen, and whether its budget
    equals the routed system's."""
    eq = result["equal_budget"]
    rows = []
    for key, b in result["budgets"].items():
        same = ("-" if key == "routed" else "yes, equal budget" if not eq["differences"].get(key)
                else "no: " + "; ".join(eq["differences"][key]))
        rows.append({"system": "hard / soft / oracle (routed)" if key == "routed" else key,
                     "models": ", ".join(m["model"] for m in b["models"]),
                     "initialisation": describe_init(b["init"]) if b["init"] else "mixed",
                     "epochs run / cap": _epochs(b["models"]),
                     "training images (own)": _count(b["images_seen"]),
                     "incl. initialisation": _count(_with_init(b)),
                     "same budget as routed": same})
    return rows


def _routed_budget_sentence(result: Mapping[str, Any], reference: str) -> str:
    b, r = result["budgets"]["routed"], result["budgets"][reference]
    sched = r["models"][0]["schedule"]
    return (f"Equal training budget: both start from {describe_init(b['init'])} and train for up to "
            f"{r['epochs_max']} epochs with the same settings ({sched.get('scheduler')} schedule, lr "
            f"{sched.get('lr')}, batch {sched.get('batch_size')}, {sched.get('sampler')} sampling, "
            f"{sched.get('loss')} loss); the routed system's {len(b['models'])} group models ran "
            f"{_epochs(b['models'])} epochs and saw {_count(b['images_seen'])} training images in all; "
            f"{SHORT_NAMES[reference]} ran {_epochs(r['models'])} epochs and saw {_count(r['images_seen'])}.")


VERDICT_SENTENCES = {
    evidence.HELPED: "Routing helped: the interval excludes 0 and every training seed agrees.",
    evidence.HURT: "Routing hurt: the interval excludes 0 and every training seed agrees.",
    evidence.NO_EVIDENCE: ("No evidence of a difference: every seed has the same sign, but the interval includes 0; "
                           "the smallest AUROC difference this test set and these seeds could detect is about "
                           "{mdd:.3f} (80% power, two-sided {level}% level, test sample and seed spread)."),
    evidence.INCONSISTENT: ("Inconsistent across training seeds: the seeds disagree in sign, so the run draws no "
                            "conclusion (the smallest detectable AUROC difference, test sample and seed spread, "
                            "is about {mdd:.3f})."),
    evidence.ONE_SEED: ("One training seed: the interval covers the test sample, not training, so the run draws "
                        "no conclusion (train with --seeds 3 or more)."),
}


def seed_sentence(seeds: Mapping[str, Any], level: int = 95) -> str:
    """Each seed's difference, their mean and the interval over test sample and seeds."""
    per = ", ".join(f"{pm(s['diff'])} (seed {s['seed']})" for s in seeds["per_seed"])
    if len(seeds["per_seed"]) < 2:
        return f"Hard-routed minus control AUROC on one training seed: {per}."
    return (f"Over {len(seeds['per_seed'])} training seeds the differences are {per}; mean {pm(seeds['mean'])} "
            f"({level}% CI {pm(seeds['lo'])} to {pm(seeds['hi'])}, covering the test sample and the training seeds: "
            f"patient-bootstrap SE {seeds['se_test']:.3f}, seed SD {seeds['seed_sd']:.3f}).")


def answer(result: Mapping[str, Any], group_column: str | None = None) -> str:
    """The report's first paragraph: routing against one pooled model, stated as strongly as
    the comparison allows. "Helped"/"hurt" only for an equal-budget comparison whose interval
    over test sample and training seeds excludes 0 with every seed agreeing in sign
    (:func:`evidence.verdict`); otherwise the numbers, and why they cannot settle the question."""
    systems, comps = result["systems"], result["comparisons"]
    level = int(round(100 * (1 - result["alpha"])))
    reference = result["equal_budget"]["reference"]
    why = result["equal_budget"]["differences"]
    boot = f"paired patient bootstrap, {result['n_boot']} resamples"
    a = systems["hard"]["overall"]
    parts = []
    if reference:
        r = systems[reference]["overall"]
        d = comps[f"hard_minus_{reference}"]["auroc"]
        seeds = result["seeds"]
        first = seeds["per_seed"][0]["seed"]
        parts.append(f"Routing by predicted age group vs one pooled model at an equal training budget: hard-routed "
                     f"AUROC {fmt_ci(a['auroc'], a['ci'].get('auroc'))} vs {SYSTEM_NAMES[reference]} "
                     f"{fmt_ci(r['auroc'], r['ci'].get('auroc'))} (training seed {first}); difference "
                     f"{fmt_diff(d, level)}, {boot}.")
        parts.append(seed_sentence(seeds, level))
        parts.append(VERDICT_SENTENCES[seeds["verdict"]].format(mdd=seeds["min_detectable"], level=100 - level))
        parts.append(_routed_budget_sentence(result, reference))
        study = result["study_level"]["aggregations"]["max"]
        sd = study["comparisons"].get(f"hard_minus_{reference}")
        if sd is not None:
            sa, sr = study["systems"]["hard"], study["systems"][reference]
            parts.append(f"Per study ({study['n_studies']} studies, max of the image probabilities): AUROC "
                         f"{fmt_ci(sa['auroc'], sa['ci'].get('auroc'))} vs "
                         f"{fmt_ci(sr['auroc'], sr['ci'].get('auroc'))}, difference {fmt_diff(sd['auroc'], level)}.")
    else:
        parts.append("This run has no pooled system trained on the same budget as the routed one, so it cannot "
                     "tell whether routing by age group beats one pooled model.")
        if "pooled" in systems:
            d = comps["hard_minus_pooled"]["auroc"]
            p = systems["pooled"]["overall"]
            parts.append(f"Hard-routed AUROC {fmt_ci(a['auroc'], a['ci'].get('auroc'))} vs pooled "
                         f"{fmt_ci(p['auroc'], p['ci'].get('auroc'))} (difference {fmt_diff(d, level)}, {boot}) is NOT "
                         f"an equal-budget comparison ({'; '.join(why.get('pooled', []))}): the difference may come "
                         f"from the extra training alone. Train the equal-budget control (stage 4 trains it with "
                         f"--init-from-pooled unless --no-control) to separate the two.")
    if reference != "pooled" and "pooled" in systems and "hard_minus_pooled" in comps and reference:
        p = systems["pooled"]["overall"]
        parts.append(f"For reference, the plain pooled model (not an equal budget: {'; '.join(why.get('pooled', []))}) "
                     f"has AUROC {fmt_ci(p['auroc'], p['ci'].get('auroc'))}; hard-routed minus plain pooled "
                     f"{fmt_diff(comps['hard_minus_pooled']['auroc'], level)}.")
    pg = comps.get("hard_per_group_minus_hard")
    if pg is not None:
        parts.append(f"Per-group thresholds (one per group model, chosen on the validation images routed to it) "
                     f"change the hard-routed F1 by {fmt_diff(pg['f1'], level)}, sensitivity by "
                     f"{pm(pg['sensitivity']['diff'])} and specificity by {pm(pg['specificity']['diff'])}.")
    parts.append(_routing_errors(result, group_column, level))
    return " ".join(parts)


def _routing_errors(result: Mapping[str, Any], group_column: str | None, level: int) -> str:
    mis, age = result["misrouted"], result["age_classifier"]
    oh = result["comparisons"]["oracle_minus_hard"]
    d = oh["auroc"]
    text = (f"Routing errors: the age classifier sends {mis['n']} of {mis['n_total']} test images "
            f"({100 * mis['fraction']:.1f}%) to another group's model (test macro-F1 {age['macro_f1']:.3f}). "
            f"Routing by the true group instead (oracle minus hard): AUROC {fmt_diff(d, level)}, F1 "
            f"{fmt_diff(oh['f1'], level)}.")
    if d["lo"] > 0:
        return text + f" By AUROC, the routing errors cost about {d['diff']:.3f}."
    if d["hi"] < 0 and group_column in (None, "age_group_label"):
        return text + (" By AUROC the oracle is worse: the group models were trained on the images the age "
                       "classifier routed to them (age_group_label), so they fit its routing better than the "
                       "true groups.")
    if d["hi"] < 0:
        return text + f" By AUROC the oracle is worse than hard routing (group models trained on {group_column})."
    return text + (" By AUROC, the routing errors have no measurable cost at this test-set size (threshold "
                   "metrics such as F1 also depend on how well each validation threshold transfers).")


def threshold_text(system: str, thresholds: Mapping[str, Any]) -> str:
    t = thresholds[system]
    if "values" in t:
        return "per group " + " / ".join(f"{v:.3f}" for _, v in sorted(t["values"].items(), key=lambda kv: int(kv[0])))
    return f"{t['value']:.3f}"


def metric_rows(systems: Mapping[str, Any], thresholds: Mapping[str, Any], subset: str = "overall",
                keys: Sequence[str] = TABLE_METRICS) -> list[dict[str, str]]:
    rows = []
    for s, res in systems.items():
        m = res[subset] if subset in res else res
        rows.append({"system": res.get("description", s), "n": f"{m['n']} ({m['n_patients']} pat.)",
                     "threshold": threshold_text(s, thresholds),
                     **{k: fmt_ci(m[k], m["ci"].get(k)) for k in keys}})
    return rows


def subset_rows(systems: Mapping[str, Any], keys: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for sub in keys:
        for s, res in systems.items():
            m = res[sub]
            rows.append({"subset": sub, "system": s, "n": m["n"],
                         "fracture rate": f"{m['prevalence']:.2f}" if m["n"] else "n/a",
                         **{k: fmt_ci(m[k], m["ci"].get(k)) for k in ("auroc", "f1", "sensitivity", "specificity")}})
    return rows


def subgroup_rows(subgroups: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for col, values in subgroups.items():
        for value, e in values.items():
            label = PROJECTIONS.get(value, value) if col == "projection" else value
            row = {"column": col, "value": label, "n": f"{e['n']} ({e['n_patients']} pat., {e['n_pos']} fx)"}
            if "too_small" in e:
                row["AUROC"] = f"too small to score ({e['too_small']})"
            else:
                row["AUROC"] = "; ".join(f"{s} {fmt_ci(v['value'], v['ci'])}" for s, v in e["auroc"].items())
            rows.append(row)
    return rows


def comparison_rows(comparisons: Mapping[str, Any], keys: Sequence[str] = ("auroc", "auprc", "f1", "sensitivity",
                                                                             "specificity")) -> list[dict[str, str]]:
    rows = []
    for name, comp in comparisons.items():
        for k in keys:
            c = comp[k]
            rows.append({"comparison": name.replace("_minus_", " - "), "metric": k, "difference": pm(c["diff"]),
                         "95% CI": f"{pm(c['lo'])} to {pm(c['hi'])}" if np.isfinite(c["lo"]) else "n/a"})
    return rows


def calibration_rows(calibration: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"system": s, "ECE before": f"{v['ece_before']:.3f}", "ECE after": f"{v['ece_after']:.3f}",
             "Brier before": f"{v['brier_before']:.3f}", "Brier after": f"{v['brier_after']:.3f}"}
            for s, v in calibration["systems"].items()]


CALIBRATION_STAGES = (("before", "raw"), ("temperature", "temperature"), ("prior", "prior shift"),
                      ("platt", "Platt"), ("chosen", "chosen"))


def calibration_detail_rows(calibration: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per system and recalibration: test ECE, Brier, calibration slope and intercept."""
    rows = []
    for s, v in calibration["systems"].items():
        for key, label in CALIBRATION_STAGES:
            m = v[key]
            rows.append({"system": s, "probabilities": label, "ECE": f"{m['ece']:.3f}", "Brier": f"{m['brier']:.3f}",
                         "slope": f"{m['slope']:.2f}", "intercept": f"{m['intercept']:+.2f}"})
    return rows


ECE_TARGET = 0.05


def calibration_shape(calibration: Mapping[str, Any]) -> list[str]:
    """What the raw calibration slopes say: above 1 the probabilities are under-confident (a
    focal loss pulls them toward 0.5), which a prior shift alone cannot fix either."""
    slopes = {s: v["before"]["slope"] for s, v in calibration["systems"].items() if np.isfinite(v["before"]["slope"])}
    if not slopes:
        return []
    lo, hi = min(slopes.values()), max(slopes.values())
    if lo > 1.2:
        return [f"The raw probabilities are under-confident (calibration slope {lo:.1f}-{hi:.1f} > 1; the focal "
                "loss pulls them toward 0.5) as well as shifted by the sampler's prior, so a map with both a slope "
                "and an offset (Platt) is needed; temperature scaling alone and the prior correction alone each fix "
                "one of the two.", ""]
    if hi < 0.8:
        return [f"The raw probabilities are over-confident (calibration slope {lo:.1f}-{hi:.1f} < 1).", ""]
    return []


def calibration_gaps(calibration: Mapping[str, Any]) -> list[str]:
    """A sentence for every system whose test ECE after the chosen recalibration stays above
    ECE_TARGET: what remains is not the prior shift (which the correction removes) but
    miscalibration that varies with the probability, or a validation-test difference."""
    high = {s: v["chosen"]["ece"] for s, v in calibration["systems"].items() if v["chosen"]["ece"] > ECE_TARGET}
    if not high:
        return [f"Every system's test ECE after recalibration is at most {ECE_TARGET}.", ""]
    listed = ", ".join(f"{s} {e:.3f} (intercept {calibration['systems'][s]['chosen']['intercept']:+.2f})"
                       for s, e in high.items())
    return [f"Test ECE after recalibration stays above {ECE_TARGET} for: {listed}. The recalibration is fitted on "
            "validation images and applied unchanged to test; what remains is largely calibration-in-the-large (the "
            "intercept in brackets: above 0 the test images' fracture rate is under-predicted, below 0 over-predicted, "
            "a validation-test difference that a map fitted on validation cannot see), plus the bins' sampling noise "
            "on a small test set.", ""]


def calibration_choice_rows(calibration: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per model: the chosen method, its {a, b}, and each method's cross-validated log loss."""
    rows = []
    for key, method in calibration["chosen"].items():
        par = calibration["params"][key]
        cv = calibration.get("cv_log_loss", {}).get(key, {})
        rows.append({"model": key, "chosen": method, "a": f"{par['a']:.3f}", "b": f"{par['b']:+.3f}",
                     **{f"CV log loss, {m}": (f"{v:.4f}" if v is not None and np.isfinite(v) else "n/a")
                        for m, v in cv.items()}})
    return rows


def model_rows(models: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role, info in models.items():
        b = info["budget"]
        rows.append({"role": role, "file": info["path"], "model": info["model_name"], "img_size": info["img_size"],
                     "initialisation": describe_init(b["init"]),
                     "epochs run / cap (best)": f"{b['epochs_run']}/{b['epochs_max']} ({b['best_epoch']})",
                     "training images": _count(b["images_seen"])})
    return rows


# --------------------------------------------------------------------------- summary and checklist sections
SUMMARY_SYSTEMS = (("hard", "routed (hard)"), ("pooled_continued", "equal-budget control"),
                   ("pooled", "plain pooled"), ("oracle", "oracle routing"))
SHORT_VERDICTS = {
    evidence.HELPED: "Routing helped.",
    evidence.HURT: "Routing hurt.",
    evidence.NO_EVIDENCE: "No evidence of a difference (smallest detectable difference about {mdd:.3f}).",
    evidence.INCONSISTENT: "Inconsistent across training seeds: no conclusion.",
    evidence.ONE_SEED: "One training seed only: no conclusion about routing.",
}


def scope_sentence(result: Mapping[str, Any]) -> str:
    if result.get("flow", {}).get("phantom"):
        return "Synthetic phantom data: this run shows the method, not clinical performance."
    return "Internal validation on one centre's data, with no external test set."


def summary_answer(result: Mapping[str, Any]) -> str:
    """The Answer in at most three sentences."""
    seeds = result.get("seeds")
    if not seeds:
        comp = result["comparisons"].get("hard_minus_pooled", {}).get("auroc")
        diff = f" (hard-routed minus plain pooled AUROC {pm(comp['diff'])})" if comp else ""
        return (f"This run has no pooled system of the routed system's training budget, so it cannot say whether "
                f"routing by age group beats one pooled model{diff}. {scope_sentence(result)}")
    level = int(round(100 * (1 - result["alpha"])))
    per = ", ".join(pm(x["diff"]) for x in seeds["per_seed"])
    first = (f"Hard routing by predicted age group minus the equal-budget pooled control, test AUROC over "
             f"{len(seeds['per_seed'])} training seed(s): {per}; mean {pm(seeds['mean'])} ({level}% CI "
             f"{pm(seeds['lo'])} to {pm(seeds['hi'])}, test sample and training seeds).")
    return f"{first} {SHORT_VERDICTS[seeds['verdict']].format(mdd=seeds['min_detectable'])} {scope_sentence(result)}"


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """Routed, control, plain pooled and oracle per image and per study (max)."""
    study = result["study_level"]["aggregations"]["max"]["systems"]
    rows = []
    for key, label in SUMMARY_SYSTEMS:
        if key not in result["systems"]:
            continue
        im, st = result["systems"][key]["overall"], study[key]
        rows.append({"system": label, "image AUROC": fmt_ci(im["auroc"], im["ci"].get("auroc")),
                     "image sens. / spec.": f"{im['sensitivity']:.3f} / {im['specificity']:.3f}",
                     "study AUROC": fmt_ci(st["auroc"], st["ci"].get("auroc")),
                     "study sens. / spec.": f"{st['sensitivity']:.3f} / {st['specificity']:.3f}"})
    return rows


def seed_rows(seeds: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"training seed": x["seed"], "routed AUROC": f"{x['routed_auroc']:.3f}",
             "control AUROC": f"{x['control_auroc']:.3f}", "difference": pm(x["diff"]),
             "95% CI (test sample)": f"{pm(x['lo'])} to {pm(x['hi'])}"} for x in seeds["per_seed"]]


def flow_rows(flow: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = [{"step": "rows in the source CSV", "images": flow["source_rows"], "patients": ""},
            {"step": "set aside: image missing or unreadable (stage 1)", "images": flow["set_aside_unreadable"],
             "patients": ""}]
    rows += [{"step": f"excluded: {k} flag", "images": v, "patients": ""} for k, v in flow["excluded_by_flag"].items()]
    rows += [{"step": "excluded in all (any flag)", "images": flow["excluded"], "patients": ""},
             {"step": "set aside: unreadable (stage 2)", "images": flow["set_aside_unreadable_pool"], "patients": ""}]
    rows += [{"step": name, "images": flow[key]["images"], "patients": flow[key]["patients"]}
             for key, name in (("test", "test set"), ("train", "training set"), ("val", "validation set"))]
    rows.append({"step": "not accounted for", "images": flow["not_accounted"], "patients": ""})
    rows += [{"step": f"left out at evaluation ({k}, undecodable)", "images": v, "patients": ""}
             for k, v in flow.get("left_out_at_evaluation", {}).items() if v]
    return rows


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if x is not None and np.isfinite(x) else "n/a"


def _dist(counts: Mapping[str, int], labels: Mapping[str, str] | None = None) -> str:
    total = max(sum(counts.values()), 1)
    return ", ".join(f"{(labels or {}).get(k, k)} {v} ({100 * v / total:.0f}%)" for k, v in counts.items())


def table_one_rows(table: Mapping[str, Any]) -> pd.DataFrame:
    """Table 1: one column per partition."""
    spec = [("patients", lambda r: str(r["patients"])), ("images", lambda r: str(r["images"])),
            ("age, median (IQR), per image", lambda r: f"{r['age_median']:.1f} ({r['age_q1']:.1f}-{r['age_q3']:.1f})"),
            ("sex (patients)", lambda r: _dist(r.get("sex_patients", {}))),
            ("age group (images)", lambda r: _dist(r["age_group_images"])),
            ("fracture rate", lambda r: _pct(r["fracture_rate"])),
            ("cast", lambda r: _pct(r.get("cast_share", float("nan")))),
            ("initial exam (vs follow-up)", lambda r: _pct(r.get("initial_exam_share", float("nan")))),
            ("projection", lambda r: _dist(r.get("projection", {}), PROJECTIONS)),
            ("device", lambda r: _dist(r.get("device_manufacturer", {})))]
    frame = pd.DataFrame({"characteristic": [name for name, _ in spec]})
    for part, r in table.items():
        frame[part] = [fn(r) for _, fn in spec]
    return frame


def error_rows(by: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for col, values in by.items():
        for value, e in values.items():
            rows.append({"by": col, "value": PROJECTIONS.get(value, value) if col == "projection" else value,
                         "images": e["images"], "FN / positives": f"{e['fn']} / {e['positives']} ({_pct(e['fn_rate'])})",
                         "FP / negatives": f"{e['fp']} / {e['negatives']} ({_pct(e['fp_rate'])})"})
    return rows


def confident_rows(errors_: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"rank": i + 1, "kind": e["kind"], "image": Path(e["image"]).name, "patient": e["patient_id"],
             "study": e["study"], "probability (calibrated)": f"{e['probability']:.3f}",
             "raw": f"{e.get('raw_probability', float('nan')):.3f}", "predicted group": e["predicted_group"],
             "true group": e["true_group"]} for i, e in enumerate(errors_)]


NET_BENEFIT_AT = (0.1, 0.2, 0.3, 0.5, 0.7)


def net_benefit_rows(curve: Mapping[str, Sequence[float]]) -> list[dict[str, str]]:
    ts = [round(t, 2) for t in curve["threshold"]]
    keys = [k for k in curve if k != "threshold"]
    return [{"threshold probability": f"{t:.2f}",
             **{k: f"{curve[k][ts.index(t)]:.3f}" for k in keys}} for t in NET_BENEFIT_AT if t in ts]


def scope_lines(result: Mapping[str, Any]) -> list[str]:
    return [
        "- **Reference standard:** the fracture label is the dataset's radiologist annotation "
        "(GRAZPEDWRI-DX: `fracture_visible`, annotated by radiologists at one hospital); no second reading or "
        "follow-up imaging was used to confirm it, and the annotators are not blinded to anything the model sees.",
        "- **Validation:** internal validation on one centre's data (a fixed, patient-level test set drawn from the "
        "same source as training); there is no external test set, so transport to other hospitals, devices or "
        "populations is untested.",
        "- **Phantom:** " + ("this run uses the synthetic phantom: the numbers show that the method runs end to end, "
                             "not clinical performance." if result.get("flow", {}).get("phantom")
                             else "this run uses real data, not the phantom."),
        "- **Intended use:** a research comparison of age-routed and pooled fracture detection on wrist radiographs "
        "of children and adolescents; not a cleared device.",
    ]


# (checklist item, where the report answers it, or "not addressed: why")
CHECKLIST = (
    ("CLAIM: data sources, eligibility, exclusions and patient flow", "Patient flow"),
    ("CLAIM / TRIPOD+AI: characteristics of each partition", "Table 1"),
    ("CLAIM: partitions disjoint at patient level", "Patient flow (patient-level splits; checked in every stage)"),
    ("CLAIM / STARD: reference standard and its rationale", "Scope and reference standard"),
    ("CLAIM: performance metrics with confidence intervals", "Fracture detection per image / per study"),
    ("CLAIM: comparison with a baseline, statistical test of the difference",
     "The Answer in detail; Paired differences; Training budgets"),
    ("CLAIM: robustness to training randomness", "Training seeds"),
    ("CLAIM / TRIPOD+AI: subgroup performance (age, sex, device, projection, cast, initial vs follow-up)",
     "By true age group and by cast; Subgroups"),
    ("CLAIM: failure analysis", "Error analysis"),
    ("CLAIM: explainability (saliency maps)", "Error analysis; Figures (Grad-CAM)"),
    ("TRIPOD+AI: calibration (plot, slope, intercept) and recalibration", "Calibration"),
    ("TRIPOD+AI: clinical utility (net benefit)", "Clinical utility"),
    ("TRIPOD+AI: sample size / precision", "The Answer in detail (smallest detectable difference)"),
    ("CLAIM / TRIPOD+AI: external validation", "not addressed: one centre's data only (Scope)"),
    ("TRIPOD+AI: missing data", "partly: empty flag cells read as 'no' (dataset convention); undecodable images "
                                "are counted in the flow"),
    ("CLAIM: reader study / comparison with clinicians", "not addressed: no reader data"),
    ("TRIPOD+AI: fairness beyond sex and age (ethnicity, socioeconomic)", "not addressed: not in the data"),
)


def summary_lines(result: Mapping[str, Any], figures: Mapping[str, Path], report_dir: Path) -> list[str]:
    lines = ["## Summary", "", summary_answer(result), "",
             markdown_table(summary_rows(result)),
             "Image level at the validation threshold; study level: max of the images' probabilities, threshold "
             "chosen on validation studies. 95% CIs by patient bootstrap; first training seed's models.", ""]
    if "roc" in figures:
        lines += [figure_link(figures["roc"], report_dir, "roc"), ""]
    lines += ["Details below: the Answer in detail, training seeds, scope, patient flow, Table 1, the "
              "per-image and per-study tables, subgroups, error analysis, clinical utility, calibration, the "
              "checklist.", ""]
    return lines


def checklist_lines(result: Mapping[str, Any], figures: Mapping[str, Path], report_dir: Path) -> list[str]:
    """Scope, flow, Table 1, error analysis, clinical utility, the checklist."""
    def fig(key: str) -> list[str]:
        return [figure_link(figures[key], report_dir, key), ""] if key in figures else []

    lines = ["## Scope and reference standard", "", *scope_lines(result), "",
             "## Patient flow", "", markdown_table(flow_rows(result["flow"])),
             result["flow"]["note"] + ".", "", *fig("flow"),
             "## Table 1: characteristics per partition", "",
             "Sex per patient (first image); everything else per image.", "",
             markdown_table(table_one_rows(result["table_one"]))]
    ea = result["error_analysis"]
    lines += ["## Error analysis (hard-routed system at its validation threshold)", "",
              "False negatives among positives and false positives among negatives, by the first AO/OTA code of "
              "`ao_classification`, projection, cast and true age group.", "", markdown_table(error_rows(ea["by"])),
              f"The {len(ea['most_confident'])} most confident errors (calibrated probability farthest from the "
              "label; errors at the validation threshold of the raw probabilities):", "",
              markdown_table(confident_rows(ea["most_confident"])) if ea["most_confident"] else "none", "",
              *fig("gradcam_errors"),
              "## Clinical utility: decision curve", "",
              "Net benefit per image, TP/n - FP/n * pt/(1-pt), on the calibrated probabilities, against treating "
              "every image as fractured (treat all) and none.", "",
              markdown_table(net_benefit_rows(result["net_benefit"]["curve"])), *fig("decision_curve"),
              "## Reporting checklist (CLAIM 2024, TRIPOD+AI, STARD): evaluation items", "",
              markdown_table([{"item": item, "where": where} for item, where in CHECKLIST])]
    return lines


def write_report(report_dir: Path, result: Mapping[str, Any], figures: Mapping[str, Path]) -> Path:
    """report.md: the Answer, the tables, and links to the figures."""
    sysres, thr = result["systems"], result["thresholds"]
    age = result["age_classifier"]
    names = age["names"]
    study = result["study_level"]
    lines = [
        "# Evaluation: age-routed fracture detection on the fixed test set", "",
        *summary_lines(result, figures, report_dir),
        "## The Answer in detail", "", result["conclusion"], "",
        f"Test set: `{result['inputs']['test_csv']}`: {result['n_test_images']} images of "
        f"{result['n_test_patients']} patients, fracture rate {result['test_prevalence']:.2f}. "
        f"Thresholds chosen on `{result['inputs']['val_csv']}` ({result['threshold_method']}) and applied "
        f"unchanged to test. 95% CIs: percentile bootstrap over patients, {result['n_boot']} resamples, seed "
        f"{result['seed']}. Evaluation wall time {result['wall_time_s']:.1f} s on {result['device']}.", "",
    ]
    if result["notes"]:
        lines += ["**Notes:**", ""] + [f"- {n}" for n in result["notes"]] + [""]
    if result.get("seeds"):
        sd = result["seeds"]
        lines += ["## Training seeds", "",
                  f"Each training seed retrains the group models and their control from the same start and splits; "
                  f"each seed's routed system is compared with its own control on the same test images (the age classifier "
                  f"is trained once: it only routes, and both systems of a seed are scored on the same routing). When the "
                  f"group models and the control continue one pooled model, that shared start is not retrained, so "
                  f"its own training randomness is not in the seed spread. Interval "
                  f"for the mean: {sd['interval_method']} (SE {sd['se']:.4f}, df {sd['dof']:.1f}). Verdict: "
                  f"{sd['verdict']}.", "", markdown_table(seed_rows(sd))]
    lines += checklist_lines(result, figures, report_dir)
    lines += ["## Training budgets", "",
              "What each system's models cost in training, from their checkpoints. Two systems have an equal "
              f"budget when they start from the same weights, train with the same settings and epoch cap, and "
              f"see the same number of training images (within "
              f"{100 * result['equal_budget']['images_tolerance']:.0f}%).",
              "", markdown_table(budget_rows(result)),
              "## Fracture detection per image, whole test set", "", markdown_table(metric_rows(sysres, thr)),
              "## Fracture detection per study", "",
              f"A study ({study['unit']}) is positive if any of its images is; its probability is the max or the "
              "mean of its images' probabilities, and thresholds are chosen on validation studies the same way.", ""]
    for how, agg in study["aggregations"].items():
        lines += [f"### {how} of the image probabilities ({agg['n_studies']} studies, {agg['n_patients']} patients, "
                  f"fracture rate {agg['prevalence']:.2f})", "",
                  markdown_table(metric_rows(agg["systems"], agg["thresholds"],
                                             keys=("auroc", "sensitivity", "specificity", "f1"))),
                  markdown_table(comparison_rows(agg["comparisons"], ("auroc", "sensitivity", "specificity")))]
    lines += ["## By true age group and by cast", "",
              "A group's numbers come from the images whose TRUE age is in that group, whichever model the system "
              "sent them to. Cast images are an easy shortcut (a cast goes with a fracture most of the time), so the "
              "no-cast rows are the harder test.", "",
              markdown_table(subset_rows(sysres, [k for k in result["subsets"] if k != "overall"]))]
    if result["subgroups"]:
        lines += ["## Subgroups: device, projection, sex, initial exam vs follow-up", "",
                  "AUROC with 95% CI per subset; subsets under 30 images or with one class are listed, not scored. "
                  "Sex from `gender`; an empty `initial_exam` means a follow-up exam.",
                  "", markdown_table(subgroup_rows(result["subgroups"]))]
    lines += ["## Paired differences (same patient resamples)", "",
              markdown_table(comparison_rows(result["comparisons"]))]
    if result["comparisons_by_age_group"]:
        lines += ["Per true age group:", "", markdown_table(
            [{"age group": sub, **row} for sub, comp in result["comparisons_by_age_group"].items()
             for row in comparison_rows(comp, ("auroc", "f1"))])]
    cal = result["calibration"]
    lines += ["## Calibration", "",
              f"{cal['method']}; {cal['form']}. The class-balanced sampler trains at 50% fractures, so raw "
              "probabilities carry a prior shift that one temperature cannot undo; the prior-shift correction and "
              "Platt recalibration can. Expected calibration error (ECE, "
              f"{cal['n_bins']} equal-width bins), Brier score, calibration slope (1 ideal) and intercept "
              "(calibration-in-the-large, 0 ideal) on the test set. Age classifier (top-label, temperature) ECE "
              f"{cal['age_classifier']['ece_before']:.3f} -> {cal['age_classifier']['ece_after']:.3f}.", "",
              *calibration_shape(cal),
              "Chosen per model (on validation):", "", markdown_table(calibration_choice_rows(cal)),
              markdown_table(calibration_detail_rows(cal)), *calibration_gaps(cal),
              *([figure_link(figures["reliability"], report_dir, "reliability"), ""] if "reliability" in figures else []),
              "## Age-group classifier (router) on the test set", "",
              f"Accuracy {age['accuracy']:.3f}, macro-F1 {fmt_ci(age['macro_f1'], age.get('macro_f1_ci'))}, balanced "
              f"accuracy {age['balanced_accuracy']:.3f}. Rows: true group; columns: predicted group.", ""]
    cm = pd.DataFrame(age["confusion_matrix"], columns=[f"pred {n}" for n in names])
    cm.insert(0, "true", names)
    lines.append(markdown_table(cm))
    rep = age["classification_report"]
    lines.append(markdown_table([
        {"group": n, "precision": rep[n]["precision"], "recall": rep[n]["recall"],
         "f1": rep[n]["f1-score"], "support": int(rep[n]["support"])} for n in names]))
    mis = result["misrouted"]
    lines += [f"Misrouted test images: {mis['n']} of {mis['n_total']}.", ""]
    if mis.get("metrics"):
        lines.append(markdown_table([
            {"system on misrouted images": s, "n": v["n"], "accuracy": v["accuracy"], "auroc": v["auroc"]}
            for s, v in mis["metrics"].items()]))
    lines += ["## Thresholds (chosen on validation)", "",
              markdown_table([{"system": s, "threshold": threshold_text(s, thr),
                               "val sensitivity": t["val_metrics"]["sensitivity"],
                               "val specificity": t["val_metrics"]["specificity"],
                               "val AUROC": t["val_metrics"]["auroc"]} for s, t in thr.items()]),
              "## Figures", ""]
    for key, path in figures.items():
        lines += [f"### {CAPTIONS.get(key, key)}", "", figure_link(path, report_dir, key), ""]
    lines += ["## Models", "", markdown_table(model_rows(result["models"]))]
    lines += environment_lines(result.get("environment"))
    return write_text("\n".join(lines), report_dir / columns.REPORT_MD)


def environment_lines(env: Mapping[str, Any] | None) -> list[str]:
    """The run environment section: machine, threads, lock and package versions."""
    if not env:
        return []
    mach, lock = env["machine"], env["lock"]
    lock_text = ("not found" if lock["sha256"] is None else
                 f"`{lock['sha256'][:12]}`, " + ("installed from it" if lock["matches"] else
                                                  "the running environment was NOT installed from it"))
    return ["## Run environment", "",
            f"{mach['cpu']} ({mach['cpu_count']} CPUs, native bf16: {'yes' if mach['cpu_native_bf16'] else 'no'}), "
            f"GPU: {', '.join(mach['gpus']) or 'none'}; torch threads {mach['torch_threads']} "
            f"(inter-op {mach['torch_interop_threads']}); {mach['platform']}. Lock (requirements.lock): {lock_text}.",
            "", markdown_table([{"package": k, "version": v} for k, v in env["versions"].items()]), ""]


def print_summary(result: Mapping[str, Any]) -> None:
    """The side-by-side tables on the terminal, then the Answer."""
    sysres, thr = result["systems"], result["thresholds"]
    print("\n== Fracture detection on the test set, per image (95% CI, patient bootstrap) ==")
    print(text_table([{"system": s, "thr": threshold_text(s, thr),
                       **{k: fmt_ci(r["overall"][k], r["overall"]["ci"].get(k))
                          for k in ("auroc", "f1", "sensitivity", "specificity")}} for s, r in sysres.items()]))
    agg = result["study_level"]["aggregations"]["max"]
    print(f"\n== Per study ({agg['n_studies']} studies, max of the image probabilities) ==")
    print(text_table([{"system": s, "thr": threshold_text(s, agg["thresholds"]),
                       **{k: fmt_ci(r[k], r["ci"].get(k)) for k in ("auroc", "sensitivity", "specificity")}}
                      for s, r in agg["systems"].items()]))
    print("\n== AUROC by true age group / cast ==")
    subs = [k for k in result["subsets"] if k != "overall"]
    print(text_table([{"system": s, **{k: fmt_ci(r[k]["auroc"], r[k]["ci"].get("auroc")) for k in subs}}
                      for s, r in sysres.items() if not s.endswith("_per_group")]))
    print("\n== Calibration (test ECE before -> after the recalibration chosen on validation) ==")
    print(text_table(calibration_rows(result["calibration"])))
    age = result["age_classifier"]
    print(f"\nage classifier (test): accuracy {age['accuracy']:.3f}, macro-F1 "
          f"{fmt_ci(age['macro_f1'], age.get('macro_f1_ci'))}; confusion (rows true): {age['confusion_matrix']}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\n{result['conclusion']}")
    print(f"\nSummary: {summary_answer(result)}")
    print(f"evaluation wall time: {result['wall_time_s']:.1f} s")
