"""Predict age group and fracture for new wrist radiographs (PNG, JPEG, DICOM).

The routing itself lives in ``inference.py``, shared with ``evaluate.py``.

Inputs
  paths                     image files and/or folders (searched recursively for .png, .jpg,
                            .jpeg, .dcm, .dicom and extension-less DICOM files)
  --models DIR              a run's saved_agegroup_models (age_classifier.pt,
                            fracture_classifier_agegroup{g}.pt and/or fracture_classifier_pooled.pt;
                            a missing group model falls back to the pooled one, and the CSV says
                            so), or an export folder written by export.py (system.json)
  --thresholds FILE         thresholds.json written by evaluate.py (default:
                            <models>/thresholds.json, or the export's system.json; without it 0.5,
                            with a warning; a file named here must exist and hold a threshold in
                            [0, 1]); --per-group-thresholds uses the routing's per-group ones
  calibration               <models>/calibration.json (evaluate.py), or the export's system.json:
                            applied when present and fitted for these very checkpoints
  --backend                 torch, or onnxruntime (the export's model.onnx files; no Grad-CAM)
Outputs
  --output CSV              one row per image: image_path, age_group_label, age_group_name,
                            age_group_prob_0..G-1 (calibrated), fracture_model, fracture_prob
                            (calibrated), fracture_prob_raw, fracture_label, threshold (applies to
                            the raw probability, as chosen on validation), threshold_source,
                            calibration, routing, tta, backend, cam_path
  --cam DIR                 one Grad-CAM overlay PNG per image: the fracture model that
                            decided it, over the original image at its own size and display
                            window, with the age group, fracture probability and threshold

Example
  python predict.py scans/ extra/image.dcm --models runs/demo/saved_agegroup_models \\
      --output predictions.csv --cam cams/ --tta
  python predict.py scans/ --models runs/demo/export --backend onnxruntime --per-group-thresholds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

import bundle
import calibration
import columns
import errors
import image_io
import inference
import presets
from config import print_config, to_dict
from distributed import resolve_device
from inference import ROUTINGS, cam_examples, combine_routes, load_routed_models, overlay_png_bytes, route
from io_utils import atomic_write, write_csv


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly plus the images under given folders, sorted, no duplicates.

    A non-regular file (FIFO, socket, device) named like an image is collected too, so
    that :func:`check_readable` reports it instead of a reader blocking on it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    fp = Path(root) / f
                    if image_io.is_image_file(fp):
                        found.append(fp)
        elif p.exists():
            found.append(p)
        else:
            raise errors.DataError(f"{p}: no such file or folder")
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def check_readable(files: Sequence[Path], skip_bad: bool = False) -> tuple[list[Path], list[str]]:
    """Decode every file once up front (``image_io.check_image_file``: a non-regular
    file, a broken or degenerate image is refused), so a bad one fails here with its name
    rather than inside a DataLoader worker. Returns (good files, messages about skipped ones)."""
    good, bad = [], []
    for f in files:
        reason = image_io.check_image_file(f, decode=True)
        if reason is None:
            good.append(f)
            continue
        line = reason if str(f) in reason else f"{f}: {reason}"
        if not skip_bad:
            raise errors.DataError(line)
        bad.append(line)
    return good, bad


def load_thresholds(path: Path | None, routing: str, override: float | None = None,
                    required: bool = False) -> tuple[float, str]:
    """(threshold, where it came from) for the routing mode.

    ``required``: the file was named on the command line, so a missing file is an error
    rather than the 0.5 default. A file that is not evaluate.py's thresholds JSON, or
    lacks a threshold in [0, 1] for ``routing``, raises ``DataError`` (one line).
    """
    if override is not None:
        return float(override), "--threshold"
    if path is None or not path.exists():
        if required:
            raise errors.DataError(f"{path}: thresholds file not found (--thresholds)")
        return 0.5, "default 0.5 (no thresholds.json from evaluate.py)"
    fix = "pass evaluate.py's thresholds.json, or --threshold"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise errors.DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           f"{fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.DataError(f"{path}: cannot read the thresholds file ({exc}); {fix}") from None
    table = data.get("thresholds", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise errors.DataError(f"{path}: expected a JSON object of thresholds by routing; {fix}")
    entry = table.get(routing)
    if isinstance(entry, dict):
        entry = entry.get("value")
    if entry is None:
        has = ", ".join(map(str, table)) or "none"
        raise errors.DataError(f"{path}: no threshold for routing {routing!r} (has: {has}); {fix}")
    if isinstance(entry, bool) or not isinstance(entry, (int, float)) or not 0 <= entry <= 1:
        raise errors.DataError(f"{path}: threshold for routing {routing!r} must be a number in [0, 1], got {entry!r}")
    return float(entry), f"{path} ({routing}, chosen on validation)"


def load_group_thresholds(path: Path, routing: str) -> tuple[dict[int, float], str]:
    """The per-group thresholds of ``routing`` (``<routing>_per_group`` in evaluate.py's
    thresholds, by age group), and where they came from. ``DataError`` when absent."""
    if not path.is_file():
        raise errors.DataError(f"{path}: not found; --per-group-thresholds needs evaluate.py's thresholds")
    data = json.loads(path.read_text(encoding="utf-8"))
    entry = (data.get("thresholds") or {}).get(routing + "_per_group")
    values = entry.get("values") if isinstance(entry, dict) else None
    if not isinstance(values, dict) or not values:
        raise errors.DataError(f"{path}: no per-group thresholds for routing {routing!r}")
    table = {int(g): float(t) for g, t in values.items()}
    if any(not 0 <= t <= 1 for t in table.values()):
        raise errors.DataError(f"{path}: per-group thresholds must lie in [0, 1], got {table}")
    return table, f"{path} ({routing}, one per age group, chosen on validation)"


def load_models(models_dir: Path, device: Any, backend: str) -> tuple[Any, dict[str, Any] | None, list[str]]:
    """The routed models, the calibration to apply (None: none), and notes.

    An export folder carries all three in system.json; a run's models folder has
    calibration.json and thresholds.json beside the checkpoints (a calibration fitted for
    other checkpoints is not applied, and a note says so)."""
    notes: list[str] = []
    if bundle.is_export_dir(models_dir):
        routed, system = bundle.load_routed_export(models_dir, device, backend)
        return routed, system.get("calibration"), notes
    if backend != "torch":
        raise errors.DataError(f"{models_dir}: --backend {backend} runs the ONNX files of an export folder "
                               "(export.py writes one); this is a run's models folder")
    routed = load_routed_models(models_dir, device)
    cal_path = models_dir / columns.CALIBRATION_JSON
    params = calibration.read_params(cal_path) if cal_path.is_file() else None
    if params is None:
        notes.append(f"no {cal_path}: probabilities are not calibrated (run evaluate.py)")
    else:
        current = {calibration.AGE_KEY: routed.age.path, "pooled": routed.pooled and routed.pooled.path,
                   "pooled_continued": routed.pooled_continued and routed.pooled_continued.path,
                   **{f"agegroup{g}": routed.model_for_group(g).path for g in range(routed.n_groups)}}
        stale = calibration.stale_models(params, current)
        if stale:
            notes.append(f"{cal_path} was fitted for other weights ({'; '.join(stale)}): not applied; "
                         "re-run evaluate.py")
            params = None
    return routed, params, notes


def group_names(routed: inference.RoutedModels) -> tuple[str, ...]:
    """The age groups' names as the age classifier recorded them (its class names, from its
    checkpoint or its export folder), which must name every group of the bounds it routes by."""
    names = tuple(str(n) for n in routed.age.meta.get("class_names") or ())
    if len(names) != routed.n_groups:
        raise errors.CheckpointError(f"{routed.age.path}: {len(names)} class names for the {routed.n_groups} age "
                                     f"groups of its age bounds {list(routed.age_bounds)}")
    return names


def calibrated_frame(res: pd.DataFrame, params: dict[str, Any] | None, routing: str, n_groups: int) -> pd.DataFrame:
    """``route``'s frame with calibrated age and fracture probabilities (calibration.apply_calibration,
    as evaluate.py applies it) and the raw fracture probability kept as ``fracture_prob_raw``."""
    out = res.copy()
    out["fracture_prob_raw"] = res["fracture_prob"]
    if params is None or len(res) == 0:
        return out
    age_cols = [f"age_group_prob_{g}" for g in range(n_groups)]
    age = calibration.apply_calibration(params, calibration.AGE_KEY, res[age_cols].to_numpy(float))
    out[age_cols] = age
    raw = res["fracture_prob"].to_numpy(float)
    label = res["age_group_label"].to_numpy(int)
    if routing == "hard":
        prob = raw.copy()
        for g in np.unique(label):
            rows = label == g
            prob[rows] = calibration.apply_calibration(params, f"agegroup{g}", raw[rows])
    else:
        groups = np.stack([calibration.apply_calibration(params, f"agegroup{g}",
                                                         res[f"group_fracture_prob_{g}"].to_numpy(float))
                           for g in range(n_groups)], 1)
        prob, _ = combine_routes(age, groups, routing)
    out["fracture_prob"] = prob
    return out


def check_thresholds_current(path: Path, source: str, routed: inference.RoutedModels) -> str | None:
    """Refuse (``DataError``, one line) thresholds that evaluate.py chose for other models than
    the ones loaded (retrained since); a note when the file does not say which models it was
    chosen for. Nothing to check for ``--threshold`` or the 0.5 default."""
    if not source.startswith(str(path)):
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    recorded = data.get("models") if isinstance(data, dict) else None
    if not isinstance(recorded, dict):
        return f"{path} does not say which models its thresholds were chosen for (an older evaluate.py)"
    changed = inference.changed_models(recorded, inference.routing_models(routed))
    if changed:
        raise errors.DataError(f"{path}: chosen for other models than those in {routed.age.path.parent} "
                               f"({', '.join(changed)} retrained or replaced since); run evaluate.py again, "
                               "or pass --threshold")
    return None


# --------------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict age group and fracture for new images.",
                                add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    p.add_argument("--models", "--models-dir", dest="models_dir", default=columns.MODELS_DIR,
                   help="a run's models folder (age_classifier.pt and the fracture checkpoints) or an "
                        "export folder (export.py)")
    p.add_argument("--output", type=presets.output_file, default="predictions.csv", help="CSV to write")
    p.add_argument("--routing", choices=ROUTINGS, default="hard")
    p.add_argument("--thresholds", default=None,
                   help="thresholds.json from evaluate.py (default: <models>/thresholds.json, or the "
                        "export's system.json)")
    p.add_argument("--threshold", type=presets.probability, default=None, help="override the fracture threshold")
    p.add_argument("--per-group-thresholds", action="store_true",
                   help="one threshold per age group (evaluate.py's per-group thresholds of --routing)")
    p.add_argument("--backend", choices=bundle.BACKENDS, default="torch",
                   help="onnxruntime: run an export folder's model.onnx files (CPU)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--cam", default=None, metavar="DIR", help="write Grad-CAM overlays here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=presets.positive_int, default=16)
    p.add_argument("--workers", type=presets.non_negative_int, default=0)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (listed on stderr) instead of stopping")
    return p


def _thresholds(args: argparse.Namespace, default: Path) -> tuple[float | dict[int, float], str]:
    thr_path = Path(args.thresholds) if args.thresholds else default
    if args.per_group_thresholds and args.threshold is None:
        return load_group_thresholds(thr_path, args.routing)
    threshold, source = load_thresholds(thr_path, args.routing, args.threshold, required=bool(args.thresholds))
    if source.startswith("default"):
        print(f"warning: {thr_path} not found; fracture labels use threshold 0.5")
    return threshold, source


def main(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    print_config(to_dict(args), "predict")
    if args.cam and args.backend != "torch":
        raise errors.DataError(f"--cam needs --backend torch: Grad-CAM needs gradients, which {args.backend} "
                               "does not give")
    device = resolve_device("cpu" if args.backend == "onnxruntime" else args.device)
    models_dir = Path(args.models_dir)
    # everything that can be wrong with the inputs fails before any model runs
    thr_file = columns.SYSTEM_JSON if bundle.is_export_dir(models_dir) else columns.THRESHOLDS_JSON
    threshold, thr_source = _thresholds(args, models_dir / thr_file)
    files, bad = check_readable(collect_images(args.paths), args.skip_bad)
    for line in bad:
        print(f"skipped: {line}", file=sys.stderr)
    if not files:
        raise errors.DataError(f"{', '.join(map(str, args.paths))}: no readable images found")
    routed, params, notes = load_models(models_dir, device, args.backend)
    if not bundle.is_export_dir(models_dir):
        thr_path = Path(args.thresholds) if args.thresholds else models_dir / thr_file
        stale = check_thresholds_current(thr_path, thr_source, routed)
        if stale:
            notes.append(stale)
    for note in routed.notes + notes:
        print(f"note: {note}")
    df = pd.DataFrame({"image_path": [str(f) for f in files]})
    res = route(routed, df, device, args.routing, tta=args.tta, batch_size=args.batch_size,
                workers=args.workers)
    res = calibrated_frame(res, params, args.routing, routed.n_groups)
    names = group_names(routed)
    out = pd.concat([df, res], axis=1)
    out.insert(2, "age_group_name", [names[g] for g in out["age_group_label"]])
    if isinstance(threshold, dict):
        out["threshold"] = [threshold.get(int(g), np.nan) for g in out["age_group_label"]]
    else:
        out["threshold"] = threshold
    out["fracture_label"] = (out["fracture_prob_raw"] >= out["threshold"]).astype(int)
    out["threshold_source"] = thr_source
    out["calibration"] = params.get("method", "") if params else "none"
    out["routing"] = args.routing
    out["tta"] = bool(args.tta)
    out["backend"] = args.backend
    out["cam_path"] = ""
    written: dict[str, Any] = {}
    if args.cam:
        written["cams"] = write_cams(out, df, routed, device, args)
    written["predictions"] = write_csv(out, args.output)
    print(out[["image_path", "age_group_name", "fracture_model", "fracture_prob", "fracture_prob_raw",
               "fracture_label"]].to_string(index=False))
    print(f"wrote {args.output} ({len(out)} images, {time.perf_counter() - t0:.1f} s)")
    written.update(n_images=len(out), n_skipped=len(bad), threshold=threshold)
    return written


def write_cams(out: pd.DataFrame, df: pd.DataFrame, routed: Any, device: Any, args: argparse.Namespace) -> list[Path]:
    """One Grad-CAM overlay per image (the fracture model that decided it); fills ``cam_path``."""
    cam_dir = Path(args.cam)
    cams = []
    for name in out["fracture_model"].unique():
        rows = out.index[out["fracture_model"] == name]
        lm = next(m for m in [*routed.groups.values(), routed.pooled] if m and m.name == name)
        for i, (img, cam) in zip(rows, cam_examples(lm, df.loc[rows], device, args.tta)):
            target = cam_dir / f"{i:04d}_{Path(out.at[i, 'image_path']).stem}_cam.png"
            group = int(out.at[i, "age_group_label"])
            verdict = "FRACTURE" if out.at[i, "fracture_label"] else "no fracture"
            data = overlay_png_bytes(img, cam, [
                f"age group {out.at[i, 'age_group_name']} (p {out.at[i, f'age_group_prob_{group}']:.2f})",
                f"fracture p {out.at[i, 'fracture_prob']:.3f} (raw {out.at[i, 'fracture_prob_raw']:.3f}), "
                f"threshold {out.at[i, 'threshold']:.3f}: {verdict}",
                f"Grad-CAM of {name}"])
            atomic_write(target, lambda tmp, d=data: tmp.write_bytes(d))
            out.at[i, "cam_path"] = str(target)
            cams.append(target)
    return cams


if __name__ == "__main__":
    errors.run(main, get_args_parser())
