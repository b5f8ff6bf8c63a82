"""Stage 6: export the trained system as a self-describing folder (timm, ONNX, model card).

For every model of the run (age classifier, group fracture models, pooled and continued
pooled model) it writes a folder in timm's own format, ``model.safetensors`` + ``config.json``
(``timm.models.save_for_hf``), which ``timm.create_model("local-dir:<folder>", pretrained=True)``
builds, and ``model.onnx`` (opset 17, TorchScript exporter, fixed image size, dynamic batch).
Two checks run on real test images, each model with its own preprocessing, and the export is
refused when one fails:

* the model timm builds from the folder gives the checkpoint's logits (max abs difference
  at most ``--rebuild-tolerance``);
* onnxruntime gives PyTorch's probabilities (max abs difference at most ``--tolerance``),
  at batch N and batch 1, and for Swin with fused attention on and off.

The TorchScript exporter (``dynamo=False``) is used. The dynamo exporter (torch 2.14,
opset 18) exports the demo CNN, but fails on timm's Swin with a dynamic batch: its
decomposition step cannot ``view`` the window attention's output (shape ``[4*batch, 64, 2,
16]`` with permuted strides) as ``[4*batch, 64, 32]``. The TorchScript exporter traces the
eager model, and the parity check measures what it produced.

Inputs (derived from --out-dir unless given)
  <out>/saved_agegroup_models/{age_classifier, fracture_classifier_*}.pt, thresholds.json,
  calibration.json (both from evaluate.py; without them the system has 0.5 and no calibration)
  <out>/metrics.json, <out>/age_test.csv (its first --parity-images images), the split manifests
Outputs
  <out>/export/<stem>/{config.json, model.safetensors, model.onnx}
  <out>/export/system.json   age bounds and groups, which model serves which group, thresholds
                             (single and per group) and how they were chosen, calibration,
                             preprocessing, versions and lock hash, the parity figures and a
                             summary of the test results
  <out>/export/MODEL_CARD.md the Hugging Face model-card layout, from metrics.json

Example
  python export.py --out-dir runs/demo
  python predict.py scans/ --models runs/demo/export --backend onnxruntime
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

import bundle
import calibration
import columns
import environment
import errors
import image_io
import inference
import models
import presets
import recipe
import tables
from config import print_config, to_dict
from io_utils import write_json, write_text

HERE = Path(__file__).resolve().parent
OPSET = bundle.ONNX_OPSET
SCRIPT = "export"
LICENCE = ("GRAZPEDWRI-DX is published under CC BY 4.0 (Nagy et al., 2022, Scientific Data 9:222, "
           "doi:10.1038/s41597-022-01328-z); cite it with any model trained on it.")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"), help="run directory")
    p.add_argument("--models-dir", type=Path, default=None, help="default: <out-dir>/saved_agegroup_models")
    p.add_argument("--export-dir", type=Path, default=None, help="default: <out-dir>/export")
    p.add_argument("--parity-csv", type=Path, default=None,
                   help="images for the parity checks (default: <out-dir>/age_test.csv)")
    p.add_argument("--parity-images", type=presets.positive_int, default=16, help="images for the parity checks")
    p.add_argument("--tolerance", type=presets.probability, default=1e-4,
                   help="largest onnxruntime vs PyTorch probability difference accepted")
    p.add_argument("--rebuild-tolerance", type=float, default=1e-5,
                   help="largest logit difference between the timm-built folder and the checkpoint")
    p.add_argument("--opset", type=int, choices=(17, 18), default=OPSET, help="ONNX opset")
    p.add_argument("--no-onnx", action="store_true", help="write the timm folders only")
    p.add_argument("--result-json", type=Path, default=None, help="also write the returned summary as JSON")
    return p


# --------------------------------------------------------------------------- checks
def parity_batch(lm: inference.LoadedModel, df: pd.DataFrame) -> torch.Tensor:
    """``df``'s images prepared as ``lm`` prescribes (size, normalisation), one batch."""
    loader = inference.loader_for(lm, df, batch_size=max(len(df), 1), feed=recipe.Feed(shard=False))
    return next(iter(loader))[0].contiguous()


def parity_rows(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` rows whose image decodes (stage 5 may have left some out, --skip-bad)."""
    keep = []
    for idx, path in df["image_path"].astype(str).items():
        if image_io.check_image_file(Path(path), decode=True) is None:
            keep.append(idx)
            if len(keep) == n:
                break
    if not keep:
        raise errors.DataError(f"{df.attrs.get('source', 'the parity CSV')}: no decodable image for the parity checks")
    return df.loc[keep]


def rebuild_difference(lm: inference.LoadedModel, folder: Path, x: torch.Tensor) -> float:
    """Max abs logit difference between the checkpoint's model and the one timm builds from ``folder``."""
    rebuilt = bundle.load_exported_model(folder, torch.device("cpu"), "torch")
    with torch.no_grad():
        a = lm.model(x.to(memory_format=torch.channels_last) if lm.channels_last else x).float()
        b = rebuilt.model(x.to(memory_format=torch.channels_last) if rebuilt.channels_last else x).float()
    return float((a - b).abs().max())


def onnx_parity(model: torch.nn.Module, onnx_path: Path, x: torch.Tensor) -> dict[str, Any]:
    """Max abs probability difference, onnxruntime vs PyTorch, on batch ``x``: at batch N and
    one image at a time, with fused attention on and off where the model has attention."""
    ort = bundle.OnnxModel(onnx_path)
    ort_n = bundle.probabilities(ort, x)
    ort_1 = np.concatenate([bundle.probabilities(ort, x[i:i + 1]) for i in range(len(x))])
    checks: dict[str, float] = {}
    has_attention = models.use_fused_attention(model, True) > 0
    try:
        for fused in ((True, False) if has_attention else (None,)):
            if fused is not None:
                models.use_fused_attention(model, fused)
            ref = bundle.probabilities(model.eval(), x)
            tag = "" if fused is None else f"fused attention {'on' if fused else 'off'}, "
            checks[f"{tag}batch {len(x)}"] = float(np.abs(ort_n - ref).max())
            checks[f"{tag}batch 1"] = float(np.abs(ort_1 - ref).max())
    finally:
        models.use_fused_attention(model, True)
    return {"max_abs_prob_diff": max(checks.values()), "checks": checks, "n_images": int(len(x))}


# --------------------------------------------------------------------------- one model
def export_model(lm: inference.LoadedModel, folder: Path, x: torch.Tensor,
                 args: argparse.Namespace) -> dict[str, Any]:
    """The timm folder and ONNX file of one model, with both checks; raises ``errors.CheckpointError``
    when a check fails (the files written so far stay, the system file is not written)."""
    bundle.save_timm_folder(lm, folder)
    diff = rebuild_difference(lm, folder, x)
    if not diff <= args.rebuild_tolerance:
        raise errors.CheckpointError(f"{folder}: timm's model differs from {lm.path} by {diff:.3g} in the logits "
                                     f"(more than --rebuild-tolerance {args.rebuild_tolerance:g}); export refused")
    entry: dict[str, Any] = {"folder": folder.name, "architecture": lm.meta.get("model_name"),
                             "source_checkpoint": calibration.file_digest(lm.path) if lm.path else None,
                             "img_size": lm.img_size, "mean": lm.mean, "std": lm.std,
                             "class_names": list(lm.meta.get("class_names") or []),
                             "timm_rebuild_max_abs_logit_diff": diff}
    if args.no_onnx:
        return entry
    cpu_model = lm.model.to(memory_format=torch.contiguous_format)
    bundle.export_onnx(cpu_model, folder / bundle.ONNX_FILE, lm.img_size, args.opset)
    par = onnx_parity(cpu_model, folder / bundle.ONNX_FILE, x)
    if lm.channels_last:
        lm.model.to(memory_format=torch.channels_last)
    entry["onnx"] = {"file": bundle.ONNX_FILE, "opset": args.opset, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                     "input": {"name": bundle.ONNX_INPUT, "shape": ["batch", 1, lm.img_size, lm.img_size]},
                     "output": {"name": bundle.ONNX_OUTPUT, "shape": ["batch", lm.num_classes]},
                     "parity": {**par, "tolerance": args.tolerance}}
    if not par["max_abs_prob_diff"] <= args.tolerance:
        raise errors.CheckpointError(
            f"{folder / bundle.ONNX_FILE}: onnxruntime differs from PyTorch by {par['max_abs_prob_diff']:.3g} in "
            f"probability ({par['checks']}), more than --tolerance {args.tolerance:g}; export refused")
    return entry


# --------------------------------------------------------------------------- the system
def _thresholds(models_dir: Path) -> dict[str, Any]:
    path = models_dir / columns.THRESHOLDS_JSON
    if not path.is_file():
        return {"thresholds": {}, "method": None, "note": f"no {path.name}: predict.py uses 0.5"}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {"thresholds": data.get("thresholds", {}), "method": data.get("method"),
            "chosen_on": data.get("val_csv"), "note": data.get("note")}


def _calibration(models_dir: Path, routed: inference.RoutedModels) -> dict[str, Any] | None:
    path = models_dir / columns.CALIBRATION_JSON
    if not path.is_file():
        return None
    params = calibration.read_params(path)
    current = {key: lm.path for key, lm in bundle.model_keys(routed).items()}
    current.update({f"agegroup{g}": routed.model_for_group(g).path for g in range(routed.n_groups)})
    stale = calibration.stale_models(params, current)
    if stale:
        raise errors.DataError(f"{path}: fitted for other weights than the checkpoints now in {models_dir} "
                               f"({'; '.join(stale)}); re-run evaluate.py before exporting")
    return params


def test_summary(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Each system's overall test AUROC, F1, sensitivity and specificity with their intervals."""
    if not metrics:
        return None
    keys = ("auroc", "f1", "sensitivity", "specificity")
    return {"n_test_images": metrics.get("n_test_images"), "n_test_patients": metrics.get("n_test_patients"),
            "prevalence": metrics.get("test_prevalence"),
            "systems": {s: {k: {"value": r["overall"].get(k), "ci": r["overall"].get("ci", {}).get(k)} for k in keys}
                        | {"threshold": r.get("threshold")}
                        for s, r in metrics.get("systems", {}).items()},
            "conclusion": metrics.get("conclusion")}


def system_json(routed: inference.RoutedModels, entries: Mapping[str, Any], models_dir: Path,
                metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    names = columns.age_group_names(routed.age_bounds)
    thr = _thresholds(models_dir)
    return {
        "format": "pediatric wrist fracture system, export format 1",
        "age_bounds": list(routed.age_bounds), "age_group_names": list(names),
        "routing": {"hard": "the age classifier's argmax group picks that group's fracture model (default)",
                    "soft": "the group models' probabilities weighted by the age probabilities"},
        "served_by": {str(g): {"group": names[g], "model": routed.model_for_group(g).name,
                               "folder": bundle.folder_name(routed.model_for_group(g).name)}
                      for g in range(routed.n_groups)},
        "models": dict(entries),
        "thresholds": thr["thresholds"],
        "thresholds_method": {"method": thr["method"], "chosen_on": thr.get("chosen_on"),
                              "applies_to": "the raw (uncalibrated) probability of the routed system",
                              "note": thr.get("note")},
        "calibration": _calibration(models_dir, routed),
        "preprocessing": {"steps": list(bundle.PREPROCESSING),
                          "per_model": {k: {"img_size": e["img_size"], "mean": e["mean"], "std": e["std"]}
                                        for k, e in entries.items()}},
        "versions": environment.versions(), "lock": environment.lock_state(),
        "test_results": test_summary(metrics),
    }


# --------------------------------------------------------------------------- model card
def _fmt(v: Any, ci: Any = None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    s = f"{v:.3f}"
    if ci and all(c is not None for c in ci):
        s += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return s


def _system_rows(systems: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    rows = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s, r in systems.items():
        overall = r.get("overall", r)
        ci = overall.get("ci", {})
        rows.append(f"| {s} | " + " | ".join(_fmt(overall.get(k), ci.get(k)) for k in keys) + " |")
    return rows


def _split_lines(out_dir: Path) -> list[str]:
    run = columns.RunDir(out_dir)
    lines = []
    for name, path in (("test", run.test_csv), ("validation", run.val_csv), ("training", run.train_csv)):
        if path.is_file():
            df = pd.read_csv(path, usecols=lambda c: c in ("patient_id", "fracture", "age_group"))
            n_pos = int(df["fracture"].sum()) if "fracture" in df else 0
            by_group = df["age_group"].value_counts().sort_index().to_dict() if "age_group" in df else {}
            lines.append(f"- {name}: {len(df)} images of {df['patient_id'].nunique()} patients, {n_pos} with a "
                         f"visible fracture; images per true age group {by_group}")
    for manifest in (run.test_manifest, run.trainval_manifest):
        if manifest.is_file():
            data = json.loads(manifest.read_text(encoding="utf-8"))
            excl = data.get("exclusions") or data.get("exclude") or data.get("excluded")
            if excl is not None:
                lines.append(f"- exclusions ({manifest.name}): {json.dumps(excl)[:300]}")
    return lines


def model_card(system: Mapping[str, Any], metrics: Mapping[str, Any] | None, out_dir: Path) -> str:
    """MODEL_CARD.md in the Hugging Face layout, from metrics.json and system.json."""
    m = metrics or {}
    age = system["models"][columns.AGE_MODEL]
    arch = sorted({e["architecture"] for e in system["models"].values() if e.get("architecture")})
    served = "; ".join(f"{v['group']} -> {v['folder']}" for v in system["served_by"].values())
    cal = system.get("calibration")
    lines = [
        "---", "library_name: timm", "license: other", "tags: [image-classification, radiology, pediatric, wrist, fracture]",
        "pipeline_tag: image-classification", "---", "",
        "# Age-routed pediatric wrist fracture classifier", "",
        "## Model details", "",
        f"- Architecture(s): {', '.join(arch)}, one input channel (grayscale radiograph), "
        f"{age['img_size']} px input for the age classifier.",
        f"- System: an age classifier ({', '.join(system['age_group_names'])}; bounds {system['age_bounds']} years) "
        f"routes each image to the fracture model of its predicted age group: {served}.",
        f"- Trained with this repository's pipeline; versions {json.dumps(system['versions'])}; "
        f"requirements.lock sha256 {str(system['lock'].get('sha256'))[:16]}.",
        "- Files: one folder per model (timm `config.json` + `model.safetensors`, `model.onnx`), "
        "`system.json` with thresholds, calibration and preprocessing.", "",
        "## Intended use", "",
        "- Research on age-specific fracture detection in pediatric wrist radiographs, and reproduction of "
        "this pipeline's results.",
        "- **Not a medical device.** It has not been validated for clinical use and must not inform the "
        "diagnosis or treatment of any patient.", "",
        "### Out-of-scope use", "",
        "- Clinical decision making, triage or screening.",
        "- Adults, other body parts, other projections than those in the training data, images from "
        "hospitals or devices it was not evaluated on, without a new evaluation.", "",
        "## Training data", "",
        f"- Run directory: `{out_dir}`. The real data set is GRAZPEDWRI-DX (one centre, Graz); a demo run "
        "uses a synthetic phantom, and its numbers say nothing about radiographs.",
        "- Splits grouped by patient: a fixed test set, then training and validation from the rest.",
        *_split_lines(out_dir), "",
        "## Evaluation", "",
        f"Test set: {m.get('n_test_images', 'n/a')} images of {m.get('n_test_patients', 'n/a')} patients, "
        f"fracture prevalence {_fmt(m.get('test_prevalence'))}. Operating thresholds chosen on validation "
        f"({system['thresholds_method'].get('method')}). 95% intervals: patient bootstrap.", "",
        "### Image level", "",
        *_system_rows(m.get("systems", {}), ("auroc", "f1", "sensitivity", "specificity")), "",
    ]
    agg = (m.get("study_level") or {}).get("aggregations", {})
    if agg:
        lines += ["### Study level", "", f"Unit: {m['study_level'].get('unit')}.", ""]
        for how, a in agg.items():
            lines += [f"Aggregated by the {how} probability ({a.get('n_studies')} studies):", "",
                      *_system_rows(a.get("systems", {}), ("auroc", "f1", "sensitivity", "specificity")), ""]
    hard = (m.get("systems") or {}).get("hard", {})
    subs = [k for k in m.get("subsets", []) if k != "overall" and k in hard]
    if subs:
        lines += ["### Subgroups (routed system, hard)", "", "| subset | n | AUROC | sensitivity | specificity |",
                  "|---|---|---|---|---|"]
        for k in subs:
            r = hard[k]
            ci = r.get("ci", {})
            lines.append(f"| {k} | {r.get('n')} | {_fmt(r.get('auroc'), ci.get('auroc'))} | "
                         f"{_fmt(r.get('sensitivity'), ci.get('sensitivity'))} | "
                         f"{_fmt(r.get('specificity'), ci.get('specificity'))} |")
        lines.append("")
    for col, values in (m.get("subgroups") or {}).items():
        scored = {v: e for v, e in values.items() if "auroc" in e}
        lines.append(f"- AUROC by {col}: " + (", ".join(
            f"{v} {_fmt(e['auroc'].get('hard', {}).get('value'), e['auroc'].get('hard', {}).get('ci'))}"
            for v, e in scored.items()) or "every subset too small to score") + ".")
    seeds = m.get("seeds") or m.get("seed_spread")
    lines += ["", "### Seed spread", "",
              f"{json.dumps(seeds)[:600]}" if seeds else
              "One training seed per model in this run; the spread over seeds is not measured here.", "",
              "### Calibration", ""]
    if cal:
        ece = (m.get("calibration") or {}).get("systems", {})
        lines += [f"Method: {cal.get('method')}; `system.json` holds each model's parameters, and `predict.py` "
                  "applies them (calibrated probability first, raw beside it).", "",
                  "| system | ECE before | ECE after | Brier before | Brier after |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {_fmt(e.get('ece_before'))} | {_fmt(e.get('ece_after'))} | "
                  f"{_fmt(e.get('brier_before'))} | {_fmt(e.get('brier_after'))} |" for s, e in ece.items()]
    else:
        lines.append("No calibration was fitted (evaluate.py did not run): probabilities are raw.")
    lines += ["", "## Limitations and biases", "",
              "- One centre (GRAZPEDWRI-DX, Graz): performance at other hospitals is unknown.",
              "- Device mix: the data come from a few X-ray devices; AUROC per device is reported above where a "
              "device has enough images, and a new device needs its own check.",
              "- The cast shortcut: a plaster cast on the image almost always means a fracture, so a model can "
              "score well by seeing casts; compare the `cast` and `no cast` rows above.",
              "- Age routing: an image routed to the wrong age group is judged by another group's model; the "
              f"age classifier's test macro-F1 is {_fmt((m.get('age_classifier') or {}).get('macro_f1'), (m.get('age_classifier') or {}).get('macro_f1_ci'))}.",
              "- Small groups have wide intervals; a group without its own model is served by the pooled model.",
              "", "## How to use", "", "```bash",
              "python predict.py scans/ --models export/ --output predictions.csv",
              "python predict.py scans/ --models export/ --backend onnxruntime",
              "```", "", "```python",
              "import timm, models  # models registers the demo architectures with timm",
              f"m = timm.create_model('local-dir:export/{columns.AGE_MODEL}', pretrained=True).eval()",
              "```", "",
              "Inputs must be prepared as `system.json` says (percentile scaling, letterbox, the model's mean and "
              "std); timm's default transforms do not do that. ONNX: input `image` (N, 1, S, S) float32, output "
              "`logits`.", "",
              "## Licence and citation", "", f"- Data: {LICENCE}",
              "- Weights: trained on that data; share them under terms compatible with its licence.", ""]
    if m.get("conclusion"):
        lines += ["## Result in one paragraph", "", str(m["conclusion"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    print_config(to_dict(args), SCRIPT)
    run = columns.RunDir(args.out_dir)
    models_dir = Path(args.models_dir or run.models_dir)
    export_dir = Path(args.export_dir or run.export_dir)
    device = torch.device("cpu")
    routed = inference.load_routed_models(models_dir, device)
    parity_csv = Path(args.parity_csv or run.test_csv)
    if not parity_csv.is_file():
        raise errors.DataError(f"{parity_csv}: not found; the parity checks need real images (--parity-csv)")
    df = parity_rows(tables.read_split_csv(parity_csv), args.parity_images)
    metrics = json.loads(run.metrics_json.read_text(encoding="utf-8")) if run.metrics_json.is_file() else None
    entries: dict[str, Any] = {}
    for key, lm in bundle.model_keys(routed).items():
        folder = export_dir / bundle.folder_name(key)
        entries[key] = export_model(lm, folder, parity_batch(lm, df), args)
        par = entries[key].get("onnx", {}).get("parity", {})
        print(f"{key}: {folder} (timm rebuild {entries[key]['timm_rebuild_max_abs_logit_diff']:.2g}"
              + (f", onnxruntime vs PyTorch max |dp| {par['max_abs_prob_diff']:.2g} on {par['n_images']} images"
                 if par else "") + ")", flush=True)
    system = system_json(routed, entries, models_dir, metrics)
    written = {"system": write_json(system, export_dir / columns.SYSTEM_JSON),
               "model_card": write_text(model_card(system, metrics, run.root), export_dir / columns.MODEL_CARD_MD),
               "export_dir": export_dir,
               "parity": {k: e.get("onnx", {}).get("parity", {}).get("max_abs_prob_diff") for k, e in entries.items()},
               "wall_time_s": time.perf_counter() - t0}
    print(f"wrote {export_dir} ({len(entries)} models, {written['wall_time_s']:.1f} s)")
    if args.result_json:
        write_json(written, args.result_json)
    return written


if __name__ == "__main__":
    errors.run(main, get_args_parser())
