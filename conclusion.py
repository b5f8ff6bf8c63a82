"""The Answer: what the evaluation concludes about routing, in words, from the numbers of
``metrics.json`` (the verdict across training seeds, the equal-budget comparison and the
cost of routing errors). evidence.py decides what the numbers allow; report.py only renders
the text given here.
"""
from __future__ import annotations

from typing import Any, Mapping

import evidence
import report
import systems


def budget_sentence(result: Mapping[str, Any], reference: str) -> str:
    """What the routed system and its equal-budget control ``reference`` cost in training."""
    b, r = result["budgets"]["routed"], result["budgets"][reference]
    sched = r["models"][0]["schedule"]
    return (f"Equal training budget: both start from {evidence.describe_init(b['init'])} and train for up to "
            f"{r['epochs_max']} epochs with the same settings ({sched.get('scheduler')} schedule, lr "
            f"{sched.get('lr')}, batch {sched.get('batch_size')}, {sched.get('sampler')} sampling, "
            f"{sched.get('loss')} loss); the routed system's {len(b['models'])} group models ran "
            f"{report.epochs_text(b['models'])} epochs and saw {evidence.count_text(b['images_seen'])} training "
            f"images in all; {systems.SYSTEMS[reference].short} ran {report.epochs_text(r['models'])} epochs and saw "
            f"{evidence.count_text(r['images_seen'])}.")


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
    per = ", ".join(f"{report.pm(s['diff'])} (seed {s['seed']})" for s in seeds["per_seed"])
    if len(seeds["per_seed"]) < 2:
        return f"Hard-routed minus control AUROC on one training seed: {per}."
    return (f"Over {len(seeds['per_seed'])} training seeds the differences are {per}; mean "
            f"{report.pm(seeds['mean'])} ({level}% CI {report.pm(seeds['lo'])} to {report.pm(seeds['hi'])}, covering "
            f"the test sample and the training seeds: patient-bootstrap SE {seeds['se_test']:.3f}, seed SD "
            f"{seeds['seed_sd']:.3f}).")


def answer(result: Mapping[str, Any], group_column: str | None = None) -> str:
    """The report's first paragraph: routing against one pooled model, stated as strongly as
    the comparison allows. "Helped"/"hurt" only for an equal-budget comparison whose interval
    over test sample and training seeds excludes 0 with every seed agreeing in sign
    (:func:`evidence.verdict`); otherwise the numbers, and why they cannot settle the question."""
    scored, comps = result["systems"], result["comparisons"]
    level = int(round(100 * (1 - result["alpha"])))
    reference = result["equal_budget"]["reference"]
    why = result["equal_budget"]["differences"]
    boot = f"paired patient bootstrap, {result['n_boot']} resamples"
    a = scored["hard"]["overall"]
    parts = []
    if reference:
        r = scored[reference]["overall"]
        d = comps[f"hard_minus_{reference}"]["auroc"]
        seeds = result["seeds"]
        first = seeds["per_seed"][0]["seed"]
        parts.append(f"Routing by predicted age group vs one pooled model at an equal training budget: hard-routed "
                     f"AUROC {report.fmt_ci(a['auroc'], a['ci'].get('auroc'))} vs "
                     f"{systems.SYSTEMS[reference].name} "
                     f"{report.fmt_ci(r['auroc'], r['ci'].get('auroc'))} (training seed {first}); difference "
                     f"{report.fmt_diff(d, level)}, {boot}.")
        parts.append(seed_sentence(seeds, level))
        parts.append(VERDICT_SENTENCES[seeds["verdict"]].format(mdd=seeds["min_detectable"], level=100 - level))
        parts.append(budget_sentence(result, reference))
        study = result["study_level"]["aggregations"]["max"]
        sd = study["comparisons"].get(f"hard_minus_{reference}")
        if sd is not None:
            sa, sr = study["systems"]["hard"], study["systems"][reference]
            parts.append(f"Per study ({study['n_studies']} studies, max of the image probabilities): AUROC "
                         f"{report.fmt_ci(sa['auroc'], sa['ci'].get('auroc'))} vs "
                         f"{report.fmt_ci(sr['auroc'], sr['ci'].get('auroc'))}, difference "
                         f"{report.fmt_diff(sd['auroc'], level)}.")
    else:
        parts.append("This run has no pooled system trained on the same budget as the routed one, so it cannot "
                     "tell whether routing by age group beats one pooled model.")
        if "pooled" in scored:
            d = comps["hard_minus_pooled"]["auroc"]
            p = scored["pooled"]["overall"]
            parts.append(f"Hard-routed AUROC {report.fmt_ci(a['auroc'], a['ci'].get('auroc'))} vs pooled "
                         f"{report.fmt_ci(p['auroc'], p['ci'].get('auroc'))} (difference {report.fmt_diff(d, level)}, "
                         f"{boot}) is NOT an equal-budget comparison ({'; '.join(why.get('pooled', []))}): the "
                         f"difference may come from the extra training alone. Train the equal-budget control (stage "
                         f"4 trains it with --init-from-pooled unless --no-control) to separate the two.")
    if reference != "pooled" and "pooled" in scored and "hard_minus_pooled" in comps and reference:
        p = scored["pooled"]["overall"]
        parts.append(f"For reference, the plain pooled model (not an equal budget: {'; '.join(why.get('pooled', []))}) "
                     f"has AUROC {report.fmt_ci(p['auroc'], p['ci'].get('auroc'))}; hard-routed minus plain pooled "
                     f"{report.fmt_diff(comps['hard_minus_pooled']['auroc'], level)}.")
    pg = comps.get("hard_per_group_minus_hard")
    if pg is not None:
        parts.append(f"Per-group thresholds (one per group model, chosen on the validation images routed to it) "
                     f"change the hard-routed F1 by {report.fmt_diff(pg['f1'], level)}, sensitivity by "
                     f"{report.pm(pg['sensitivity']['diff'])} and specificity by "
                     f"{report.pm(pg['specificity']['diff'])}.")
    parts.append(routing_errors(result, group_column, level))
    return " ".join(parts)


def routing_errors(result: Mapping[str, Any], group_column: str | None, level: int) -> str:
    """How often the age classifier misroutes and what that costs (oracle minus hard routing);
    ``group_column``: the column the group models were trained by."""
    mis, age = result["misrouted"], result["age_classifier"]
    oh = result["comparisons"]["oracle_minus_hard"]
    d = oh["auroc"]
    text = (f"Routing errors: the age classifier sends {mis['n']} of {mis['n_total']} test images "
            f"({100 * mis['fraction']:.1f}%) to another group's model (test macro-F1 {age['macro_f1']:.3f}). "
            f"Routing by the true group instead (oracle minus hard): AUROC {report.fmt_diff(d, level)}, F1 "
            f"{report.fmt_diff(oh['f1'], level)}.")
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


SHORT_VERDICTS = {
    evidence.HELPED: "Routing helped.",
    evidence.HURT: "Routing hurt.",
    evidence.NO_EVIDENCE: "No evidence of a difference (smallest detectable difference about {mdd:.3f}).",
    evidence.INCONSISTENT: "Inconsistent across training seeds: no conclusion.",
    evidence.ONE_SEED: "One training seed only: no conclusion about routing.",
}


def scope_sentence(result: Mapping[str, Any]) -> str:
    """What the run's data can show: the phantom's method, or one centre's internal validation."""
    if result.get("flow", {}).get("phantom"):
        return "Synthetic phantom data: this run shows the method, not clinical performance."
    return "Internal validation on one centre's data, with no external test set."


def summary_answer(result: Mapping[str, Any]) -> str:
    """The Answer in at most three sentences."""
    seeds = result.get("seeds")
    if not seeds:
        comp = result["comparisons"].get("hard_minus_pooled", {}).get("auroc")
        diff = f" (hard-routed minus plain pooled AUROC {report.pm(comp['diff'])})" if comp else ""
        return (f"This run has no pooled system of the routed system's training budget, so it cannot say whether "
                f"routing by age group beats one pooled model{diff}. {scope_sentence(result)}")
    level = int(round(100 * (1 - result["alpha"])))
    per = ", ".join(report.pm(x["diff"]) for x in seeds["per_seed"])
    first = (f"Hard routing by predicted age group minus the equal-budget pooled control, test AUROC over "
             f"{len(seeds['per_seed'])} training seed(s): {per}; mean {report.pm(seeds['mean'])} ({level}% CI "
             f"{report.pm(seeds['lo'])} to {report.pm(seeds['hi'])}, test sample and training seeds).")
    return f"{first} {SHORT_VERDICTS[seeds['verdict']].format(mdd=seeds['min_detectable'])} {scope_sentence(result)}"
