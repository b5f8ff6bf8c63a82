"""Put plausible one-line bugs into a scratch copy of the repository, one at a time, and
check that the named tests notice each.

Each mutation below is an exact text edit (the old text must occur once in its file) with
the tests expected to fail under it. The repository is copied once to a temporary folder
(the working tree is never edited); each mutation is applied there, its tests run with
this interpreter, and the file restored. A mutation is *caught* when pytest reports a
failing test (exit status 1); *missed* when the tests pass; an *error* when the edit no
longer applies (the code moved: update the list) or pytest could not run.

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py -k budget  # those whose name contains "budget"
    python tests/mutation_check.py --list

No mutation tool from PyPI fits: they mutate at random and report survivors among
thousands, while the question here is whether these particular bugs, each of which would
silently change the report's Answer, stay caught. Exit status 0 only when all are caught.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORACLES = "tests/test_evaluate_oracles.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("paired differences b - a", "scoring.py",
             "data.y[m], probs, [_rows(thresholds[s], m) for s in (a, b)], data.patients[m], boot)",
             "data.y[m], probs[::-1], [_rows(thresholds[s], m) for s in (b, a)], data.patients[m], boot)",
             (f"{ORACLES}::test_paired_differences_are_a_minus_b_with_their_sign",
              f"{ORACLES}::test_score_reports_routing_minus_pooled")),
    Mutation("random starts compared by kind only", "evidence.py",
             'return (init.get("kind"), init.get("weights_sha256")',
             'return (init.get("kind"),) or (init.get("weights_sha256")',
             (f"{ORACLES}::test_two_random_starts_with_other_seeds_are_not_the_same_start",)),
    Mutation("images-seen tolerance 100 %", "evidence.py",
             "IMAGES_TOLERANCE = 0.10", "IMAGES_TOLERANCE = 1.0",
             (f"{ORACLES}::test_images_seen_within_ten_percent_only",)),
    Mutation("recalibration fitted on test", "recalibration.py",
             "choices[key] = choose_method(val.y[rows], _model_probs(val.inf, key)[rows], patients[rows])",
             "choices[key] = choose_method(test.y[rows], _model_probs(test.inf, key)[rows], patients[rows])",
             (f"{ORACLES}::test_recalibrations_are_fitted_on_validation_and_ece_is_before_and_after",)),
    Mutation("group models recalibrated on all validation rows", "recalibration.py",
             'rows = {f"agegroup{g}": pred == g for g in range(n_groups)}',
             'rows = {f"agegroup{g}": pred >= 0 for g in range(n_groups)}',
             (f"{ORACLES}::test_recalibrations_are_fitted_on_validation_and_ece_is_before_and_after",)),
    Mutation("ECE after on uncalibrated probabilities", "recalibration.py",
             '"chosen": calibration_summary(test.y, after.prob[s])}',
             '"chosen": calibration_summary(test.y, prob)}',
             (f"{ORACLES}::test_recalibrations_are_fitted_on_validation_and_ece_is_before_and_after",)),
    Mutation("test identity without the label", "splits.py",
             '"fracture": [str(int(f)) for f in test["fracture"]],',
             '"fracture": ["0" for f in test["fracture"]],',
             ("tests/test_design_settings.py::test_an_edited_label_in_the_test_csv_is_named",)),
    Mutation("demo stage 4 with a random sampler", "presets.py",
             '"fracture": {"metric": "auroc"}},',
             '"fracture": {"metric": "auroc", "sampler": "random"}},',
             ("tests/test_design_settings.py",)),
    Mutation("study thresholds chosen on test", "scoring.py",
             "chosen = choose_thresholds(y_val, val_out, settings.n_groups",
             "chosen = choose_thresholds(y_test, test_out, settings.n_groups",
             (f"{ORACLES}::test_study_thresholds_are_chosen_on_validation_studies",)),
    Mutation("image thresholds chosen on test", "evaluate.py",
             "chosen = scoring.choose_thresholds(val.y, val.out, routed.n_groups, rule, notes)",
             "chosen = scoring.choose_thresholds(test.y, test.out, routed.n_groups, rule, notes)",
             (f"{ORACLES}::test_image_thresholds_are_chosen_on_validation_only",)),
    Mutation("age-group rows by the predicted group", "evaluate.py",
             "systems.TestRows(test.df, test.true_group, names)",
             'systems.TestRows(test.df, test.inf["age_probs"].argmax(1), names)',
             (f"{ORACLES}::test_age_group_rows_are_picked_by_the_true_group",)),
    Mutation("bootstrap keyed by image", "systems.py",
             'return self.df["patient_id"].astype(str).to_numpy()',
             'return self.df["image_path"].astype(str).to_numpy()',
             (f"{ORACLES}::test_bootstrap_resamples_patients_not_images",)),
    Mutation("studies keyed by patient only", "scoring.py",
             'keys = ["patient_id"] + ([study_col] if study_col else [])',
             'keys = ["patient_id"]',
             (f"{ORACLES}::test_study_outputs_key_on_patient_and_study_number",
              f"{ORACLES}::test_evaluate_end_to_end_with_several_studies_per_patient")),
    # the three bugs an earlier suite missed
    Mutation("hard routing by the true group", "inference.py",
             "return group_probs[rows, pred], pred",
             "return group_probs[rows, np.asarray(true_group, int)], pred",
             ("tests/test_evaluate.py::test_evaluate_hard_routing_follows_the_predicted_group",)),
    Mutation("kept test set not checked against the dataset", "age_split_testset.py",
             "for note in _check_kept_test(test, loaded, test_csv, data_csv, bounds):",
             "for note in []:",
             ("tests/test_splits.py::test_kept_test_set_checked_against_changed_dataset",)),
    Mutation("min-max instead of percentile scaling", "image_io.py",
             "lo, hi = np.percentile(sample, [low, high])",
             "lo, hi = float(a.min()), float(a.max())",
             ("tests/test_data.py::test_percentile_scaling_matches_numpy_png_and_dicom",)),
)


def scratch_copy(dest: Path) -> Path:
    """The working tree's files (no git data, caches or run outputs) under ``dest``."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache", "runs", "*.cache")
    return Path(shutil.copytree(REPO, dest / "repo", ignore=ignore))


def run_one(root: Path, m: Mutation, timeout: float) -> tuple[str, float]:
    """Apply ``m`` under ``root``, run its tests, restore the file; the verdict and seconds."""
    path = root / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return f"error: the old text occurs {original.count(m.old)} times in {m.file}", 0.0
    path.write_text(original.replace(m.old, m.new))
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                              cwd=root, capture_output=True, text=True, timeout=timeout)
        rc = done.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - t0
    return {0: "MISSED", 1: "caught"}.get(rc, f"error: pytest exit {rc}"), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", default="", help="only the mutations whose name contains this")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name} ({m.file}): {', '.join(m.tests)}")
        return 0
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        root = scratch_copy(Path(tmp))
        # A test that errors or fails without any mutation would count every mutation as
        # caught: the named tests must pass on the unmutated copy first.
        named = sorted({t for m in chosen for t in m.tests})
        base = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *named],
                              cwd=root, capture_output=True, text=True, timeout=args.timeout * 2)
        if base.returncode != 0:
            print(f"the named tests do not pass without a mutation (pytest exit {base.returncode}):")
            print("\n".join(base.stdout.splitlines()[-15:]))
            return 2
        print(f"baseline: the {len(named)} named tests pass unmutated", flush=True)
        for m in chosen:
            verdict, seconds = run_one(root, m, args.timeout)
            verdicts.append(verdict)
            print(f"{verdict:8s} {m.name} ({m.file}, {seconds:.0f} s): {', '.join(m.tests)}", flush=True)
    caught = verdicts.count("caught")
    print(f"{caught} of {len(verdicts)} mutations caught")
    return 0 if caught == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
