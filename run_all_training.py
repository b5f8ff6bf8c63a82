"""Run the whole pipeline: split, train the age classifier and the per-group fracture models,
evaluate; then print what it produced.

Stages (each one's ``main`` is called in this process, or through ``torchrun`` for the
training and evaluation stages with ``--nproc-per-node N``):
  1  age_split_testset.py            dataset -> age_test.csv (fixed), age_pool.csv
  2  generate_age_trainval_split.py  pool -> age_train_tmp.csv, age_val_tmp.csv
  3  train_age_classifier.py         -> age_classifier.pt; age_group_label in all three CSVs
  4  train_fracture_per_agegroup.py  -> fracture_classifier_agegroup{0..G-1}.pt, one per age group
                                        (+ fracture_classifier_pooled.pt unless --no-pooled, and with
                                        --init-from-pooled the equal-budget control
                                        fracture_classifier_pooled_continued.pt unless --no-control)
  5  evaluate.py                     routed test evaluation, metrics.json, report (if present)
  6  export.py                       export/: timm folders + ONNX per model, system.json, MODEL_CARD.md

Without arguments: a phantom data set is generated and the ``demo`` preset (small model,
CPU, a few minutes) is used. With ``--data-csv``/``--image-root``: the real data and the
``paper`` preset (Swin-L 384, GPU) unless ``--preset`` says otherwise. Any training flag
(``--epochs``, ``--model``, ``--img-size``, ``--config``, ...) is passed on to stages 3-4,
and every data option of the stages (``--skip-bad``, ``--exclude``, ``--format`` and the
column mapping, ``--test-frac``, ``--val-frac``, ``--split-seed``, ``--age-bounds``,
``--no-image-check``, ``--decode-check``, the phantom's size) to the stages that take it
(``--help`` lists them under "data", each with its stages).

Re-running: ``<out-dir>/run_state.json`` records each finished stage, its arguments and its
output files (size and modification time). A stage whose record matches is skipped; the
first stage that does not is run, and every later stage with it. A stage that was
interrupted or failed is resumed (its trainers continue from their ``last`` state); one
that finished with the same arguments but whose outputs changed or went missing is re-run
keeping its finished models (delete one checkpoint and only that model is trained again).
``--from-stage K`` redoes stages K.. from scratch, and takes the files of earlier stages as
they are where they exist (a stage 1 run by hand, say); ``--force`` redoes everything, including
re-drawing the fixed test set. A failing stage stops the run with its error and exit code 1
(130 after Ctrl-C). One run per output directory (a lock file).

Outputs: everything under ``--out-dir``; see the stage scripts.

Examples:
    python run_all_training.py                                  # phantom + demo preset
    python run_all_training.py --data-csv data/dataset.csv --image-root data/images --out-dir runs/real
    python run_all_training.py --data-csv data/dataset.csv --image-root data/images --nproc-per-node 4
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd

import columns
import errors
import presets
from config import print_config, to_dict
from distributed import LOCK_HELD_ENV
from io_utils import RunLock, to_jsonable, write_json
from presets import add_split_args, add_training_args, chosen_preset, explicit_training_argv, split_argv

HERE = Path(__file__).resolve().parent
# Training seeds of the demo: what it costs is measured in the README ("Measured numbers").
DEMO_SEEDS = 3
NAMES = {1: "split test set", 2: "split train/val", 3: "age classifier", 4: "fracture classifiers",
         5: "evaluation", 6: "export"}


class StageFailed(RuntimeError):
    def __init__(self, stage: int, message: str, code: int = 1) -> None:
        super().__init__(f"stage {stage} ({NAMES[stage]}) failed: {message}")
        self.code = code


class DriverParser(argparse.ArgumentParser):
    """Refuses, while parsing like a bad value, a stage range in which nothing would run."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "from_stage", None) is not None and ns.from_stage > ns.to_stage:
            self.error(f"argument --from-stage: {ns.from_stage} is after --to-stage {ns.to_stage}, so no "
                       "stage would run")
        return ns, rest


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = DriverParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_split_args(parser, "driver")
    g = parser.add_argument_group("run")
    g.add_argument("--out-dir", type=Path, default=None,
                   help="run directory [default: runs/demo for the phantom, runs/real with --data-csv]")
    g.add_argument("--from-stage", type=int, choices=sorted(NAMES), default=None,
                   help="redo this stage and all later ones from scratch; earlier stages' files are used "
                        "as they are where they exist")
    g.add_argument("--to-stage", type=int, choices=sorted(NAMES), default=max(NAMES), help="stop after this stage")
    g.add_argument("--no-pooled", action="store_true", help="do not train the pooled baseline model")
    g.add_argument("--no-control", action="store_true",
                   help="stage 4: do not train the equal-budget control (fracture_classifier_pooled_continued.pt) "
                        "that --init-from-pooled otherwise adds")
    g.add_argument("--group-column", choices=("age_group_label", "age_group"), default=None,
                   help="stage 4: route training rows by the predicted or the true age group "
                        "[default: age_group_label, the predicted one]")
    g.add_argument("--min-rows", type=presets.non_negative_int, default=None,
                   help="stage 4: smallest group that is trained")
    g.add_argument("--seeds", type=presets.positive_int, default=None,
                   help="stages 4-5: train the compared models (group models and their equal-budget control) "
                        "with N training seeds (--seed, --seed+1, ...) and give the Answer across them "
                        f"[default: {DEMO_SEEDS} for the phantom demo (no --data-csv), else 1]")
    g.add_argument("--n-boot", type=presets.non_negative_int, default=None,
                   help="evaluation bootstrap resamples (evaluate.py's default)")
    g.add_argument("--nproc-per-node", type=presets.positive_int, default=1,
                   help="processes (GPUs) per node for the training and evaluation stages, "
                        "launched through torchrun")
    g.add_argument("--force", action="store_true",
                   help="redo every stage from scratch, re-drawing the fixed test set too")
    add_training_args(parser, resume_flags=False)
    return parser


# --------------------------------------------------------------------------- state
def _fingerprint(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


class RunState:
    """``run_state.json``: per stage its status, argv, output files and result; plus the
    last known fingerprint of every file a stage wrote (a later stage may rewrite it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.stages: dict[str, dict[str, Any]] = dict(data.get("stages", {}))
        self.files: dict[str, str] = dict(data.get("files", {}))

    def save(self) -> None:
        write_json(to_jsonable({"stages": self.stages, "files": self.files}), self.path)

    def up_to_date(self, stage: int, argv: list[str]) -> bool:
        rec = self.stages.get(str(stage))
        if not rec or rec.get("status") != "done" or rec.get("argv") != argv:
            return False
        return not self.changed_outputs(stage)

    def changed_outputs(self, stage: int) -> list[str]:
        """The recorded outputs of ``stage`` that were changed or removed since it finished."""
        rec = self.stages.get(str(stage), {})
        return [p for p in rec.get("outputs", []) if _fingerprint(Path(p)) != self.files.get(p)]

    def finished_with(self, stage: int, argv: list[str]) -> bool:
        """Whether ``stage`` finished with these arguments (its outputs may have changed since)."""
        rec = self.stages.get(str(stage), {})
        return rec.get("status") == "done" and rec.get("argv") == argv

    def previous_status(self, stage: int) -> str | None:
        return self.stages.get(str(stage), {}).get("status")

    def mark(self, stage: int, status: str, argv: list[str], **extra: Any) -> None:
        self.stages[str(stage)] = {"status": status, "argv": argv, **extra}
        self.save()

    def done(self, stage: int, argv: list[str], outputs: list[Path], result: Any, seconds: float) -> None:
        outs = [str(p) for p in outputs if p.is_file()]
        for p in outs:
            self.files[p] = _fingerprint(Path(p))
        self.mark(stage, "done", argv, outputs=outs, result=to_jsonable(result), seconds=round(seconds, 1))

    def invalidate_after(self, stage: int) -> None:
        for key in [k for k in self.stages if int(k) > stage]:
            del self.stages[key]
        self.save()


# --------------------------------------------------------------------------- stages
def n_seeds(args: argparse.Namespace, preset: str) -> int:
    """Training seeds: --seeds, else DEMO_SEEDS for the phantom demo (no data given, demo
    preset) and 1 otherwise: each seed retrains the group models and the control, which on
    real data is a GPU budget to choose deliberately."""
    if args.seeds is not None:
        return args.seeds
    real = args.data_csv is not None or args.image_root is not None
    return DEMO_SEEDS if preset == "demo" and not real else 1


def _stage_argvs(args: argparse.Namespace, out: Path, preset: str) -> dict[int, list[str]]:
    s1 = ["--out-dir", str(out)] + split_argv(args, "testset")
    s2 = ["--out-dir", str(out)] + split_argv(args, "trainval")
    train = ["--out-dir", str(out)] + explicit_training_argv(args)
    if "--preset" not in train:
        train += ["--preset", preset]
    train += split_argv(args, "train")
    s5 = ["--out-dir", str(out), "--cache-dir", str(columns.RunDir(out).cache_dir)] + split_argv(args, "evaluate")
    if args.n_boot is not None:
        s5 += ["--n-boot", str(args.n_boot)]
    if args.device:
        s5 += ["--device", args.device]
    s4 = list(train)
    if args.group_column:
        s4 += ["--group-column", args.group_column]
    if args.min_rows is not None:
        s4 += ["--min-rows", str(args.min_rows)]
    if args.no_control:
        s4 += ["--no-control"]
    seeds = n_seeds(args, preset)
    if seeds > 1:
        s4 += ["--seeds", str(seeds)]
        s5 += ["--seeds", str(seeds)]
    return {1: s1, 2: s2, 3: train, 4: s4, 5: s5, 6: ["--out-dir", str(out)]}


def stage_files(stage: int, out: Path) -> list[Path]:
    """What stages 1, 2, 3, 5 and 6 leave behind (stage 4's files depend on its models)."""
    run = columns.RunDir(out)
    return {1: [run.test_csv, run.pool_csv], 2: [run.train_csv, run.val_csv],
            3: [run.models_dir / columns.model_files(columns.AGE_MODEL)["best"], *run.split_csvs],
            5: [run.metrics_json, run.predictions_csv],
            6: [run.export_dir / columns.SYSTEM_JSON, run.export_dir / columns.MODEL_CARD_MD]}.get(stage, [])


def _has_outputs(stage: int, out: Path) -> bool:
    if stage == 4:
        return any(not p.name.endswith(columns.LAST_SUFFIX) for p in
                   columns.RunDir(out).models_dir.glob(columns.fracture_model("*") + columns.CHECKPOINT_SUFFIX))
    files = stage_files(stage, out)
    return bool(files) and all(p.is_file() for p in files)


def _call_main(module: str, argv: list[str]) -> dict[str, Any]:
    mod = importlib.import_module(module)
    return mod.main(mod.get_args_parser().parse_args(argv))


def _torchrun(module: str, argv: list[str], nproc: int, out: Path, stage: int) -> dict[str, Any]:
    fd, tmp = tempfile.mkstemp(prefix=f".stage{stage}_result.", suffix=".json", dir=out)
    os.close(fd)
    result_path = Path(tmp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / f"{module}.py"), *argv, "--result-json", str(result_path)]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, LOCK_HELD_ENV: str(out.resolve())}
    try:
        rc = subprocess.call(cmd, env=env)
        if rc in (130, -2):
            raise KeyboardInterrupt
        if rc != 0:
            raise StageFailed(stage, f"torchrun exited with code {rc}; its error is printed above")
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


def _launch(module: str, argv: list[str], args: argparse.Namespace, out: Path, stage: int) -> dict[str, Any]:
    """Run ``module``'s main here, or under torchrun when ``--nproc-per-node`` asks for more."""
    if args.nproc_per_node > 1:
        return _torchrun(module, argv, args.nproc_per_node, out, stage)
    return _call_main(module, argv)


def _run_stage(stage: int, argv: list[str], args: argparse.Namespace, out: Path, resume: bool,
               redo: bool) -> tuple[dict[str, Any], list[Path]]:
    """Run one stage; returns its result and the files it is responsible for."""
    force = ["--force"] if redo and args.force else []
    if stage == 1:
        return _call_main("age_split_testset", argv + force), stage_files(stage, out)
    if stage == 2:
        return _call_main("generate_age_trainval_split", argv + force), stage_files(stage, out)
    if stage == 5:
        return _launch("evaluate", argv, args, out, stage), stage_files(stage, out)
    if stage == 6:  # one process: exporting and its parity checks are quick on the CPU
        return _call_main("export", argv), stage_files(stage, out)

    extra = ["--resume"] if resume else []

    def train(module: str, more: tuple[str, ...] = ()) -> dict[str, Any]:
        return _launch(module, argv + list(more) + extra, args, out, stage)

    if stage == 3:
        return train("train_age_classifier"), stage_files(stage, out)
    # Pooled first: with --init-from-pooled the group models start from its weights.
    pooled = {"models": {}} if args.no_pooled else train("train_fracture_per_agegroup", ("--pooled",))
    res = train("train_fracture_per_agegroup")
    res = {**res, "models": {**pooled["models"], **res["models"]}}
    return res, [Path(m["checkpoint"]) for m in res["models"].values() if "checkpoint" in m]


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else (f"{x:.3f}" if isinstance(x, float) else str(x))


def summary_table(state: RunState, out: Path) -> str:
    rows = []
    models: list[tuple[str, dict]] = []
    r3 = state.stages.get("3", {}).get("result")
    if r3:
        n_groups = len(r3.get("predicted_group_counts", {}).get("train", []))
        models.append((f"age classifier ({n_groups} groups, macro-F1)", r3))
    r4 = state.stages.get("4", {}).get("result")
    if r4:
        for key, m in r4["models"].items():
            models.append((f"fracture, {key}", m))
    for name, m in models:
        if "skipped" in m:
            rows.append({"model": name, "checkpoint": f"skipped: {m['skipped']}"})
            continue
        bm = m.get("best_metrics", {})
        rows.append({"model": name, "checkpoint": os.path.relpath(m["checkpoint"], out),
                     "best epoch": _fmt(m.get("best_epoch")), "epochs": _fmt(m.get("epochs_run")),
                     "val acc": _fmt(bm.get("val_acc")), "val F1": _fmt(bm.get("val_f1")),
                     "val AUROC": _fmt(bm.get("val_auroc")), "val n": _fmt(bm.get("val_n"))})
    run = columns.RunDir(out)
    lines = [f"== Pipeline outputs in {out} =="]
    for p in (run.test_csv, run.train_csv, run.val_csv):
        if p.is_file():
            n = sum(1 for _ in p.open(encoding="utf-8-sig")) - 1
            lines.append(f"  {p}  ({n} rows)")
    if rows:
        lines.append(pd.DataFrame(rows).fillna("").to_string(index=False))
    for p in (run.metrics_json, run.predictions_csv, run.report_dir / columns.REPORT_MD,
              run.export_dir / columns.SYSTEM_JSON):
        if p.is_file():
            lines.append(f"  {p}")
    secs = {k: v.get("seconds") for k, v in state.stages.items() if v.get("seconds") is not None}
    if secs:
        lines.append("  stage seconds: " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(secs.items())))
    return "\n".join(lines)


def _mark_quietly(state: RunState, stage: int, status: str, argv: list[str], **extra: Any) -> None:
    """Record a stage's failure if the disk lets us: a full disk, often the failure itself,
    must not replace the stage's error with a second one."""
    try:
        state.mark(stage, status, argv, **extra)
    except OSError as exc:
        print(f"note: could not record stage {stage} as {status} in {state.path} ({errors.one_line(exc)})",
              file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> dict[str, Any]:
    real = args.data_csv is not None or args.image_root is not None
    out = Path(args.out_dir or ("runs/real" if real else "runs/demo"))
    preset = chosen_preset(args, default="paper" if real else "demo")
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in sorted(NAMES) if s <= args.to_stage]
    if 5 in stages and not (HERE / "evaluate.py").is_file():
        stages.remove(5)
    argvs = _stage_argvs(args, out, preset)
    started = time.perf_counter()
    with RunLock(out):
        state = RunState(columns.RunDir(out).run_state)
        print_config({**to_dict(args), "out_dir": str(out), "preset": preset}, "run_all_training.py")
        print(f"run_all_training: out-dir {out}, preset {preset}, "
              f"{'data ' + str(args.data_csv or args.image_root) if real else 'phantom data'}", flush=True)
        redo_from = 1 if args.force else args.from_stage
        ran_earlier = False
        for stage in stages:
            argv = argvs[stage]
            redo = redo_from is not None and stage >= redo_from
            if not redo and not ran_earlier and state.up_to_date(stage, argv):
                print(f"-- stage {stage} ({NAMES[stage]}): up to date, skipped", flush=True)
                continue
            if redo_from is not None and stage < redo_from and _has_outputs(stage, out):
                # e.g. stage 1 run by hand: --from-stage 2 must not run (and fail) it again
                print(f"-- stage {stage} ({NAMES[stage]}): not run (--from-stage {redo_from}); using its "
                      f"files in {out}", flush=True)
                continue
            # Resume only what this stage itself left unfinished, or finished with these very
            # arguments but whose outputs changed since (e.g. one checkpoint deleted: the trainers
            # keep every finished model whose settings still match and train the rest). After an
            # upstream stage ran, its inputs are new and old state would not match them.
            unfinished = state.previous_status(stage) in ("running", "failed", "interrupted")
            changed = state.changed_outputs(stage) if state.finished_with(stage, argv) else []
            resume = not redo and not ran_earlier and (unfinished or bool(changed))
            if resume and changed:
                names = ", ".join(os.path.relpath(p, out) for p in changed)
                print(f"-- stage {stage} ({NAMES[stage]}): re-running, {names} changed or missing since it "
                      "finished" + (" (finished models are kept)" if stage in (3, 4) else ""), flush=True)
            else:
                print(f"-- stage {stage} ({NAMES[stage]}): {'resuming' if resume else 'running'}", flush=True)
            state.invalidate_after(stage - 1)
            state.mark(stage, "running", argv)
            t0 = time.perf_counter()
            try:
                result, outputs = _run_stage(stage, argv, args, out, resume, redo)
            except (KeyboardInterrupt, SystemExit) as exc:
                code = 130 if isinstance(exc, KeyboardInterrupt) else exc.code
                if code == 130:
                    _mark_quietly(state, stage, "interrupted", argv)
                    print(f"stage {stage} ({NAMES[stage]}) interrupted; re-run the same command to resume",
                          flush=True)
                    raise SystemExit(130) from None
                _mark_quietly(state, stage, "failed", argv, error=str(code))
                print(StageFailed(stage, str(code)), file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            except Exception as exc:  # noqa: BLE001 - any stage error ends the run with its message
                _mark_quietly(state, stage, "failed", argv, error=f"{type(exc).__name__}: {exc}")
                known = exc if isinstance(exc, StageFailed) else errors.expected(exc)
                if known is None:
                    traceback.print_exc()
                else:
                    exc = known
                msg = str(exc) if isinstance(exc, StageFailed) else str(StageFailed(stage, errors.one_line(exc)))
                if isinstance(exc, errors.ResumeError):
                    msg += f" (here: --from-stage {stage} trains this stage from scratch)"
                print(msg, file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            state.done(stage, argv, outputs, result, time.perf_counter() - t0)
            ran_earlier = True
        print(summary_table(state, out))
        print(f"run_all_training: finished in {time.perf_counter() - started:.0f} s", flush=True)
    return {"out_dir": str(out), "stages": state.stages}


if __name__ == "__main__":
    errors.run(main, get_args_parser())
