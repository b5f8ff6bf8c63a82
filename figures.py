"""The evaluation's figures (PNG, matplotlib Agg): ROC panels, confusion matrices, training
curves, reliability diagrams, the decision curve, the patient flow and Grad-CAM grids, and
stage 5's set of them from the scored test split.

Every figure is written atomically through :mod:`io_utils`, so a report directory never
holds a half-written PNG. The plotting functions take plain arrays and DataFrames, not
models, so they can be reused for any run's CSVs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

import io_utils  # noqa: E402
import metrics  # noqa: E402
import recalibration  # noqa: E402
import scoring  # noqa: E402
import systems  # noqa: E402

_FALLBACK_COLORS = ["tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
_DPI = 110


def _color(name: str, i: int) -> str:
    """A system's colour (the same in every figure); other curves take the fallbacks in turn."""
    system = systems.SYSTEMS.get(name)
    return system.color if system and system.color else _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)]


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    try:
        return io_utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI,
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
    for ax, (ptitle, curves) in zip(axes.flat, panels.items()):
        ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
        n_info = ""
        for i, (name, spec) in enumerate(curves.items()):
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
    shown = [k for k in curve if k not in ("threshold", "treat_all", "treat_none")]
    for i, name in enumerate(shown):
        ax.plot(t, curve[name], color=_color(name, i), lw=1.8, label=name)
    ax.plot(t, curve["treat_all"], color="0.3", ls="--", lw=1.2, label="treat all")
    ax.plot(t, curve["treat_none"], color="0.6", ls=":", lw=1.2, label="treat none")
    top = max(max(curve[n]) for n in shown + ["treat_all"]) if shown else 1.0
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


# --------------------------------------------------------------------------- stage 5's figures
# The ROC figures a subset's panels appear in (systems.Subset.figure): file and title.
ROC_FIGURES = {"roc": ("roc_by_age_group.png", "Test ROC: overall and per true age group"),
               "roc_cast": ("roc_cast.png", "Test ROC with and without a cast")}


def find_history(ckpt: Path, pattern: str = "{stem}_metrics.csv") -> Path | None:
    """The per-epoch metrics CSV beside checkpoint ``ckpt`` (``pattern`` may glob)."""
    hits = sorted(ckpt.parent.glob(pattern.format(stem=ckpt.stem)), key=lambda p: len(p.name))
    return hits[0] if hits else None


def make_figures(report_dir: Path, test: systems.Split, rows: scoring.PerRow, age_summary: Mapping[str, Any],
                 histories: Mapping[str, Path]) -> dict[str, Path]:
    """ROC panels per subset figure, confusion matrices, calibration before/after and the
    training curves (``histories``: model -> per-epoch metrics CSV)."""
    figs: dict[str, Path] = {}
    y, prob, thresholds = test.y, test.out.prob, rows.thresholds
    shown = [s for s in systems.BASE_SYSTEMS if s in prob]
    panels: dict[str, dict[str, Any]] = {}
    for sub in rows.subsets:
        if sub.spec.figure and sub.too_small is None:
            m = sub.mask
            panels.setdefault(sub.spec.figure, {})[sub.name] = {s: (y[m], prob[s][m], thresholds[s]) for s in shown}
    for key, figure_panels in panels.items():
        file, title = ROC_FIGURES[key]
        figs[key] = plot_roc_panels(figure_panels, report_dir / file, title)
    cms = {systems.SYSTEMS[s].label.split(" ", 1)[0] + " " + s:
           metrics.binary_metrics(y, prob[systems.base_system(s)], thresholds[s])["confusion_matrix"]
           for s in thresholds}
    figs["confusion"] = plot_confusion_matrices(cms, report_dir / "confusion_fracture.png", ("no fracture", "fracture"),
                                                "Fracture, test set, at the validation threshold(s)")
    figs["age_confusion"] = plot_confusion_matrices({"age-group classifier (test)": age_summary["confusion_matrix"]},
                                                    report_dir / "confusion_age.png", age_summary["names"])
    figs["calibration"] = plot_calibration({s: (y, prob[s]) for s in shown}, report_dir / "calibration.png",
                                           after={s: (y, rows.calibrated.prob[s]) for s in shown})
    if histories:
        figs["training"] = plot_training_curves(histories, report_dir / "training_curves.png")
    return figs


def checklist_figures(report_dir: Path, result: Mapping[str, Any], test: systems.Split,
                      rows: scoring.PerRow) -> dict[str, Path]:
    """The patient flow, the decision curve and one reliability diagram per system (raw,
    each recalibration and the chosen one per model)."""
    figs = {"flow": plot_flow(result["flow"], report_dir / "patient_flow.png"),
            "decision_curve": plot_decision_curve(result["net_benefit"]["curve"], report_dir / "decision_curve.png")}
    panels = {s: {"raw": (test.y, test.out.prob[s]),
                  **{recalibration.METHOD_NAMES[m]: (test.y, rows.by_method[m].prob[s])
                     for m in recalibration.METHODS},
                  "chosen per model": (test.y, rows.calibrated.prob[s])}
              for s in systems.UTILITY_SYSTEMS if s in test.out.prob}
    figs["reliability"] = plot_reliability_per_system(panels, report_dir / "reliability_per_system.png",
                                                      recalibration.ECE_BINS)
    return figs
