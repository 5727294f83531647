"""The paper's findings, each tested against the numbers measured on this model.

`compute_findings(store, lm)` reads the precomputed tables and returns a list of
findings for the home page's teaching tour. Each finding states its test before
its numbers, gives the effect with a 95% confidence interval and the sample size
it rests on, and ends in exactly one verdict: agrees, does not agree, or
inconclusive (`core.analysis.claims.VERDICTS`). The rule (test name, margin,
thresholds) is data stored beside the numbers (`finding["rule"]`), so the page
and the tests read the same thing. Statistics come from scipy.stats (bootstrap,
Welch t-tests for equivalence, Spearman, Wilcoxon, Kruskal-Wallis).

Every finding holds: key, claim, page, chart, test (the test's name), effect (a
number, or None when nothing could be measured), ci ([low, high], None where
none can be given), n, verdict, measured (the numbers in words), why (what the
verdict rests on, or what is missing), rule (dict) and numbers (details).
A verdict is never tuned: with too few seeds it is "inconclusive", and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from core.analysis.claims import (
    AGREES,
    CONFIDENCE,
    DISAGREES,
    INCONCLUSIVE,
    bootstrap_ci,
    paired_difference,
    spearman_ci,
    tost,
    verdict_from_ci,
)
from core.artifacts import ArtifactStore

MIN_SEEDS = 5  # per prior, for the claims about priors (quality, speed, collapse)
QUALITY_MARGIN = 0.05  # equivalence margin: 5% of the mean loss the quality test compares
MOVED_AT_LEAST = 0.01  # interpolation: median shift on the MATH-C4 axis below this means training barely moved
REBUILD = "python -m core precompute --only {task} findings --force {task} findings"


def _num(x) -> float | None:  # noqa: ANN001
    """JSON-safe number: None for NaN, inf or missing."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _finding(key: str, claim: str, page: str, chart: str, *, test: str, effect, ci, n: int, verdict: str,  # noqa: ANN001
             measured: str, why: str, rule: dict, numbers: dict | None = None) -> dict:
    if verdict not in (AGREES, DISAGREES, INCONCLUSIVE):
        raise ValueError(f"verdict must be agrees, does not agree or inconclusive; got {verdict!r}")
    ci_pair = None if ci is None else [_num(ci[0]), _num(ci[1])]
    return {"key": key, "claim": claim, "page": page, "chart": chart, "test": test, "effect": _num(effect),
            "ci": ci_pair, "n": int(n), "verdict": verdict, "measured": measured, "why": why,
            "rule": {"confidence": CONFIDENCE, **rule}, "numbers": numbers or {}}


def _fmt_ci(ci) -> str:  # noqa: ANN001
    low, high = (_num(ci[0]), _num(ci[1])) if ci is not None else (None, None)
    return "no CI" if low is None or high is None else f"95% CI [{low:.3g}, {high:.3g}]"


def _seeds(table: pd.DataFrame) -> dict[str, int]:
    return {str(p): int(c) for p, c in table.groupby("prior").size().items()}


def _enough_seeds(table: pd.DataFrame) -> tuple[list[str], str]:
    """Priors with at least MIN_SEEDS runs, and why the test cannot run when fewer than two have them."""
    seeds = _seeds(table)
    enough = [p for p, c in seeds.items() if c >= MIN_SEEDS]
    if len(enough) >= 2:
        return enough, ""
    listed = ", ".join(f"{p} {c}" for p, c in seeds.items())
    return enough, (f"inconclusive: the test needs at least {MIN_SEEDS} seeds per prior for 2 or more priors; "
                    f"the gallery has {listed} seed(s)")


def _soft_math(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["method"] == "soft") & (runs["dataset"] == "math")]


# --------------------------------------------------------------------------- trajectories


def trajectory_finding(traj: dict | None) -> dict:
    claim = ("Sentences jump around the token-embedding space: the spread of their step lengths is statistically "
             "lower than that of a random walk, though close.")
    test = "paired Wilcoxon signed-rank and bootstrap CI of CV(real) - CV(shuffled sentence), token layer"
    rule = {"test": test, "statistic": "mean over sentences of CV(real steps) - CV(same tokens shuffled)",
            "agrees_when": "CI entirely below 0", "does_not_agree_when": "CI entirely above 0",
            "otherwise": "inconclusive", "baseline": "the sentence's own tokens in random order"}
    page, chart = "Embedding space", "sentence trajectory and step statistics"
    pairs = (traj or {}).get("shuffled_cv", {})
    token = pairs.get("token_layer")
    if not token:
        return _finding("trajectory", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured="no per-sentence step variation against the shuffled-sentence baseline is stored",
                        why="the trajectory table predates the shuffled-sentence test; rebuild it with `"
                            + REBUILD.format(task="trajectory") + "`", rule=rule)
    res = paired_difference(token["real"], token["shuffled"])
    verdict = verdict_from_ci(res["ci"], agrees_below=0.0)
    measured = (f"over {res['n']} news sentences, CV of step lengths minus that of the same tokens shuffled: "
                f"{res['effect']:+.3f} ({_fmt_ci(res['ci'])}, Wilcoxon p = {res['p_value']:.2g})")
    numbers = {"token_layer": res}
    last = pairs.get("last_layer")
    if last:
        deep = paired_difference(last["real"], last["shuffled"])
        numbers["last_layer"] = deep
        measured += (f"; at the last layer (layer {last.get('layer')}): {deep['effect']:+.3f} "
                     f"({_fmt_ci(deep['ci'])}, Wilcoxon p = {deep['p_value']:.2g})")
    return _finding("trajectory", claim, page, chart, test=test, effect=res["effect"], ci=res["ci"], n=res["n"],
                    verdict=verdict, measured=measured, why=f"{verdict}: the token-layer CI "
                    + ("is below 0" if verdict == AGREES else "is above 0" if verdict == DISAGREES
                       else "includes 0"), rule=rule, numbers=numbers)


# --------------------------------------------------------------------------- separation


def separation_finding(sep: pd.DataFrame | None, gaps: pd.DataFrame | None = None) -> dict:
    claim = "SQuAD activations stay close to C4, while MATH activations lie in a distant cluster, on all layers."
    test = ("bootstrap CI over documents of centroid_ratio(MATH vs C4) - centroid_ratio(SQuAD vs C4), per layer; "
            "layer 0 (token embeddings) as the lexical control")
    rule = {"test": test, "agrees_when": "the gap's CI is above 0 at every tested layer",
            "does_not_agree_when": "the gap's CI is below 0 at some tested layer", "otherwise": "inconclusive",
            "control": "layer 0: a gap there comes from which tokens the texts use, not from what the model computes"}
    page, chart = "Activations", "separation across layers"
    if gaps is None or gaps.empty:
        point = ""
        if sep is not None and not sep.empty:
            pivot = sep.pivot_table(index="layer", columns="comparison", values="centroid_ratio")
            share = float((pivot["math vs c4"] > pivot["squad vs c4"]).mean())
            point = f"without CIs, MATH sits further from C4 than SQuAD does on {share:.0%} of {len(pivot)} layers; "
        return _finding("separation", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured=point + "no per-document bootstrap is stored",
                        why="the separation table predates the CI; rebuild it with `"
                            + REBUILD.format(task="separation") + "`", rule=rule)
    gaps = gaps.sort_values("layer")
    last, control = gaps.iloc[-1], gaps.iloc[0]
    lows, highs = gaps["ci_low"].to_numpy(), gaps["ci_high"].to_numpy()
    verdict = AGREES if (lows > 0).all() else (DISAGREES if (highs < 0).any() else INCONCLUSIVE)
    detail = "; ".join(f"layer {int(r.layer)}: {r.gap:+.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"
                       for r in gaps.itertuples())
    beyond = ("larger than" if last["ci_low"] > control["ci_high"] else "smaller than"
              if last["ci_high"] < control["ci_low"] else "not distinguishable from")
    measured = (f"gap of centroid ratios (MATH-C4 minus SQuAD-C4) with 95% CIs: {detail}. The last layer's gap is "
                f"{beyond} the lexical control's (layer {int(control.layer)})")
    return _finding("separation", claim, page, chart, test=test, effect=last["gap"],
                    ci=[last["ci_low"], last["ci_high"]], n=int(last["n_docs"]), verdict=verdict, measured=measured,
                    why=f"{verdict}: CIs at layers {', '.join(str(int(x)) for x in gaps['layer'])}",
                    rule=rule, numbers={"gaps": gaps.to_dict(orient="records")})


# --------------------------------------------------------------------------- the run-based claims


def collapse_finding(runs: pd.DataFrame | None) -> dict:
    claim = ("Trained prompts do not always collapse onto the token embeddings: where they end up depends on "
             "the prior.")
    test = ("Kruskal-Wallis across priors on the final collapsed share (core.analysis.divergence.collapsed), "
            "bootstrap CI of the range of prior means; step 0 beside it")
    rule = {"test": test, "min_seeds_per_prior": MIN_SEEDS,
            "agrees_when": "Kruskal-Wallis p < 0.05 across priors and the range's CI above 0",
            "does_not_agree_when": "every prior's mean final collapsed share is 0.9 or more (prompts always collapse)",
            "otherwise": "inconclusive",
            "collapsed": "nearest-token cosine >= the vocabulary's median nearest-neighbour cosine and norm within x2"}
    page, chart = "Divergence", "collapsed share against step, with step 0 and the fresh-prior band"
    if runs is None or runs.empty:
        return _finding("collapse", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured="no runs", why="no run table", rule=rule)
    if "collapsed_share" not in runs:
        return _finding("collapse", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured="no collapsed share in the run table",
                        why="the runs table predates the collapse measure; rebuild it with `"
                            + REBUILD.format(task="runs_table") + "`", rule=rule)
    soft = _soft_math(runs).dropna(subset=["collapsed_share"])
    per = soft.groupby("prior").agg(runs=("collapsed_share", "size"), step0=("init_collapsed_share", "mean"),
                                    final=("collapsed_share", "mean"))
    samples = [g["collapsed_share"].to_numpy() for _, g in soft.groupby("prior")]
    ci = bootstrap_ci(tuple(samples), lambda *s: max(map(np.mean, s)) - min(map(np.mean, s))) if samples else None
    effect = float(per["final"].max() - per["final"].min()) if len(per) else None
    change = paired_difference(soft["collapsed_share"], soft["init_collapsed_share"]) if len(soft) else {}
    measured = ("soft/MATH collapsed share at step 0 -> trained, per prior: "
                + "; ".join(f"{p} {r.step0:.2f} -> {r.final:.2f} ({int(r.runs)} run(s))" for p, r in per.iterrows())
                + f". Range of prior means {effect:.2f} ({_fmt_ci(ci)}). Training changed the share by "
                  f"{change.get('effect', math.nan):+.2f} on average ({_fmt_ci(change.get('ci'))})")
    enough, why = _enough_seeds(soft)
    verdict = INCONCLUSIVE
    numbers = {"per_prior": per.reset_index().to_dict(orient="records"), "change_from_step0": change}
    if not why:
        from scipy.stats import kruskal

        groups = [soft[soft["prior"] == p]["collapsed_share"].to_numpy() for p in enough]
        flat = np.concatenate(groups)
        p_value = 1.0 if np.ptp(flat) == 0 else float(kruskal(*groups).pvalue)
        numbers["kruskal_p"] = p_value
        if (per.loc[enough, "final"] >= 0.9).all():
            verdict = DISAGREES
        elif p_value < 0.05 and ci is not None and ci[0] > 0:
            verdict = AGREES
        why = f"{verdict}: Kruskal-Wallis p = {p_value:.3g} over {len(enough)} priors with {MIN_SEEDS}+ seeds"
    return _finding("collapse", claim, page, chart, test=test, effect=effect, ci=ci, n=len(soft), verdict=verdict,
                    measured=measured, why=why, rule=rule, numbers=numbers)


def quality_finding(runs: pd.DataFrame | None) -> dict:
    claim = "Final quality is the same whatever the prior."
    test = (f"equivalence (TOST: two one-sided Welch t-tests) of each prior's mean held-out answer-token loss of "
            f"the kept prompt (final validation loss for runs without it) with the reference prior's, margin "
            f"{QUALITY_MARGIN:.0%} of the mean loss")
    rule = {"test": test, "margin_relative": QUALITY_MARGIN, "min_seeds_per_prior": MIN_SEEDS, "alpha": 0.05,
            "agrees_when": "every prior is equivalent to the reference (TOST p < 0.05)",
            "does_not_agree_when": "some prior's 90% CI of the difference lies entirely outside the margin",
            "otherwise": "inconclusive", "reference_prior": "gaussian (else the first prior)"}
    page, chart = "Runs", "final loss per prior"
    if runs is None or runs.empty:
        return _finding("quality", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured="no runs", why="no run table", rule=rule)
    # the held-out loss: the kept prompt was chosen on the validation set, so its validation loss is biased low
    value = ("eval_answer_loss" if "eval_answer_loss" in runs and _soft_math(runs)["eval_answer_loss"].notna().all()
             else "final_val_loss")
    soft = _soft_math(runs).dropna(subset=[value])
    means = soft.groupby("prior")[value].mean()
    margin = QUALITY_MARGIN * float(soft[value].mean())
    reference = "gaussian" if "gaussian" in means.index else str(means.index[0])
    ref = soft[soft["prior"] == reference][value].to_numpy()
    far = max((p for p in means.index if p != reference), key=lambda p: abs(means[p] - means[reference]), default=None)
    effect = float(means[far] - means[reference]) if far is not None else None
    ci = (bootstrap_ci((soft[soft["prior"] == far][value].to_numpy(), ref),
                       lambda a, b: np.mean(a) - np.mean(b)) if far is not None else None)
    label = {"eval_answer_loss": "held-out answer-token loss", "final_val_loss": "final validation loss"}[value]
    measured = (f"soft/MATH {label} by prior: " + ", ".join(f"{p} {v:.3f}" for p, v in means.items())
                + f"; margin +-{margin:.3f}. "
                + (f"Largest difference from {reference}: {far} {effect:+.3f} ({_fmt_ci(ci)})" if far is not None
                   else "Only one prior"))
    enough, why = _enough_seeds(soft)
    verdict, numbers = INCONCLUSIVE, {"measure": value, "means": means.to_dict(), "margin": margin,
                                      "reference": reference}
    if not why and reference in enough:
        tests = {p: tost(soft[soft["prior"] == p][value].to_numpy(), ref, margin)
                 for p in enough if p != reference}
        numbers["tost"] = tests
        if all(t["p_value"] < 0.05 for t in tests.values()):
            verdict = AGREES
        elif any(t["ci90"][0] > margin or t["ci90"][1] < -margin for t in tests.values()):
            verdict = DISAGREES
        why = f"{verdict}: TOST p = " + ", ".join(f"{p} {t['p_value']:.3g}" for p, t in tests.items())
    elif not why:
        why = f"inconclusive: the reference prior {reference} has fewer than {MIN_SEEDS} seeds"
    return _finding("quality", claim, page, chart, test=test, effect=effect, ci=ci, n=len(soft), verdict=verdict,
                    measured=measured, why=why, rule=rule, numbers=numbers)


def speed_finding(runs: pd.DataFrame | None) -> dict:
    claim = "Priors that start far from the data take longer to reach the same validation loss."
    test = ("Spearman rank correlation of the initial sample's distance to the token manifold with the steps to a "
            "validation loss every run reaches, paired bootstrap CI")
    rule = {"test": test, "min_seeds_per_prior": MIN_SEEDS, "distance": "init_manifold_ratio",
            "target": "the largest best validation loss of the soft/MATH runs (every run reaches it)",
            "agrees_when": "the CI of rho is above 0", "does_not_agree_when": "the CI of rho is below 0",
            "otherwise": "inconclusive"}
    page, chart = "Runs", "steps to reach a loss"
    if runs is None or runs.empty or "best_val_loss" not in runs:
        return _finding("speed", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured="no runs", why="no run table", rule=rule)
    soft = _soft_math(runs).dropna(subset=["best_val_loss", "init_manifold_ratio"])
    # runs_table's "auto" target: per method and dataset, the largest best loss, so every soft/MATH run reaches it
    target = float(soft["target_loss"].iloc[0]) if "target_loss" in soft and len(soft) else math.nan
    steps = pd.to_numeric(soft.get("steps_to_loss", pd.Series(np.nan, index=soft.index)), errors="coerce")
    res = spearman_ci(soft["init_manifold_ratio"], steps)
    rho = "n/a" if _num(res["rho"]) is None else f"{res['rho']:.3f}"
    p_value = "n/a" if _num(res["p_value"]) is None else f"{res['p_value']:.2g}"
    measured = (f"over {res['n']} soft/MATH runs, steps to validation loss {target:.3f}: Spearman rho = {rho} "
                f"({_fmt_ci(res['ci'])}, p = {p_value})")
    enough, why = _enough_seeds(soft)
    verdict = INCONCLUSIVE
    if not why:
        verdict = verdict_from_ci(tuple(res["ci"]), agrees_above=0.0)
        why = f"{verdict}: the CI of rho " + ("is above 0" if verdict == AGREES else "is below 0"
                                              if verdict == DISAGREES else "includes 0")
    return _finding("speed", claim, page, chart, test=test, effect=res["rho"], ci=res["ci"], n=res["n"],
                    verdict=verdict, measured=measured, why=why, rule=rule,
                    numbers={"target_loss": target, "seeds": _seeds(soft)})


def interpolation_finding(interp: pd.DataFrame | None) -> dict:
    claim = "A model can use embeddings between the MATH and C4 clusters (deep prompts from the interpolation prior)."
    test = ("share of trained deep-prompt vectors strictly between the cluster means, bootstrap CI over runs; "
            "training must have moved them")
    rule = {"test": test, "min_runs": 3, "moved_at_least": MOVED_AT_LEAST,
            "agrees_when": "the share's CI is above 0.5 and the median shift on the axis is at least 0.01",
            "does_not_agree_when": "the share's CI is below 0.5 and the vectors moved",
            "otherwise": "inconclusive"}
    page, chart = "Interpolation", "posterior positions on the MATH-C4 axis"
    rows = interp[interp["prior"] == "interpolation"] if interp is not None and "prior" in interp else interp
    if rows is None or rows.empty or not (rows["kind"] == "posterior").any():
        return _finding("interpolation", claim, page, chart, test=test, effect=None, ci=None, n=0,
                        verdict=INCONCLUSIVE, measured="no trained interpolation prompts",
                        why="no interpolation table", rule=rule)
    keys = ["run", "tensor", "vector"]
    both = rows.pivot_table(index=keys, columns="kind", values="position").dropna()
    between = ((both["posterior"] > 0.05) & (both["posterior"] < 0.95))
    shift = float((both["posterior"] - both["prior"]).abs().median()) if "prior" in both else math.nan
    per_run = between.groupby(level="run").mean().to_numpy()
    effect = float(between.mean())
    ci = bootstrap_ci((per_run,), np.mean)
    n_runs = len(per_run)
    measured = (f"{effect:.0%} of {len(both)} trained deep-prompt vectors ({n_runs} run(s)) lie between the "
                f"means (0 = C4, 1 = MATH), {_fmt_ci(ci)}; median shift from the prior sample {shift:.4f}")
    if n_runs < 3:
        verdict, why = INCONCLUSIVE, f"inconclusive: {n_runs} run(s); the CI needs 3 or more"
    elif not shift >= MOVED_AT_LEAST:
        verdict, why = INCONCLUSIVE, ("inconclusive: training barely moved the vectors, so their positions are "
                                      "the prior's, not what the model uses")
    else:
        verdict = verdict_from_ci(ci, agrees_above=0.5)
        why = f"{verdict}: the share's CI against 0.5"
    return _finding("interpolation", claim, page, chart, test=test, effect=effect, ci=ci, n=n_runs, verdict=verdict,
                    measured=measured, why=why, rule=rule, numbers={"median_shift": shift})


MIN_VAE_SEEDS = 3  # VAE training seeds on one cloud, for a CI of the spread over seeds


def vae_finding(vae: dict | None) -> dict:
    claim = "A VAE prior trained on last-layer activations collapses: its samples lose the data's spread."
    test = ("spread of VAE prior samples (z ~ N(0, I), decoded, plus the decoder's Gaussian noise) over the data's "
            "total variance, mean over VAE training seeds with a bootstrap CI, against 0.5")
    rule = {"test": test, "layer": "the model's last layer (paper section 4.6)", "min_seeds": MIN_VAE_SEEDS,
            "agrees_when": "the spread ratio's CI is below 0.5", "does_not_agree_when": "its CI is above 0.5",
            "otherwise": "inconclusive",
            "note": "the decoded means alone (spread_ratio_mean) show how much of the spread the latent carries"}
    page, chart = "Prior lab", "VAE prior samples over the reference"
    if not vae:
        return _finding("vae", claim, page, chart, test=test, effect=None, ci=None, n=0, verdict=INCONCLUSIVE,
                        measured="no VAE diagnostics", why="no VAE table", rule=rule)
    g, describe = vae.get("diagnostics", {}), vae.get("describe", "")
    rows = vae.get("seeds") or []
    layer, depth = vae.get("layer"), vae.get("num_layers")
    if not rows or layer is None or layer != depth:
        where = "on layer 0" if "at layer 0" in describe or layer == 0 else f"at layer {layer}"
        return _finding("vae", claim, page, chart, test=test, effect=g.get("spread_ratio"), ci=None, n=len(rows),
                        verdict=INCONCLUSIVE, measured=describe or "VAE diagnostics without per-seed spreads",
                        why=(f"inconclusive: the stored VAE was fitted {where}, not on last-layer activations, "
                             "or has no per-seed spreads with decoder noise; rebuild it with `"
                             + REBUILD.format(task="vae") + "`"), rule=rule)
    spreads = np.array([r["spread_ratio"] for r in rows], dtype=np.float64)
    means = np.array([r["spread_ratio_mean"] for r in rows], dtype=np.float64)
    effect, ci = float(spreads.mean()), bootstrap_ci((spreads,), np.mean)
    measured = (f"{vae.get('source', 'squad')} activations at the last layer ({layer}), {len(rows)} VAE training "
                f"seeds: spread of samples with decoder noise {effect:.2f} x the data's ({_fmt_ci(ci)}), "
                f"{np.mean([r['noise_share'] for r in rows]):.0%} of it the decoder's noise; decoded "
                f"means alone {means.mean():.2f}; active latent units "
                + ", ".join(str(r["active_units"]) for r in rows) + f" of {g.get('latent_dim', '?')}")
    if len(rows) < MIN_VAE_SEEDS:
        verdict, why = INCONCLUSIVE, f"inconclusive: {len(rows)} seed(s); the CI needs {MIN_VAE_SEEDS} or more"
    else:
        verdict = verdict_from_ci(ci, agrees_below=0.5)
        why = f"{verdict}: the CI of the spread ratio " + ("is below 0.5" if verdict == AGREES else "is above 0.5"
                                                           if verdict == DISAGREES else "includes 0.5")
    return _finding("vae", claim, page, chart, test=test, effect=effect, ci=ci, n=len(rows), verdict=verdict,
                    measured=measured, why=why, rule=rule,
                    numbers={"layer": layer, "seeds": rows, "spread_ratio_mean": float(means.mean())})


# --------------------------------------------------------------------------- all of them


def numbers_line(finding: dict) -> str:
    """One line for the page: effect, its 95% CI and n (a finding from before they were stored says so)."""
    if "effect" not in finding:
        return "This finding predates effects and CIs; rebuild findings with `python -m core precompute`."
    effect = finding.get("effect")
    shown = "n/a" if effect is None else f"{effect:.3g}"
    return f"Effect {shown}, {_fmt_ci(finding.get('ci'))}, n = {finding.get('n', 0)}."


def _runs_with_collapse(store: ArtifactStore, runs: pd.DataFrame | None, lm) -> pd.DataFrame | None:  # noqa: ANN001
    """The stored run table, with the collapse columns measured from the stored runs when the table predates them
    (needs the model; the table on disk is left as it is)."""
    if runs is None or runs.empty or "collapsed_share" in runs or lm is None:
        return runs
    from core.analysis.runs_compare import RunEntry, runs_table
    from core.runs import run_info

    paths = [Path(store.runs_root) / name for name in runs["run"]]
    entries = [RunEntry(run_info(p), "precomputed") for p in paths if (p / "run.json").exists()]
    return runs_table(lm, entries) if entries else runs


def compute_findings(store: ArtifactStore, lm=None) -> dict:  # noqa: ANN001 - core.models.LoadedModel or None
    """All findings from the tables in `store` (a missing table gives an inconclusive finding that says so).
    With `lm`, a run table that predates the collapse measure is re-measured from the stored runs."""
    runs = _runs_with_collapse(store, store.load_table("runs"), lm)
    findings = [
        trajectory_finding(store.load_json("trajectory")),
        separation_finding(store.load_table("separation"), store.load_table("separation_gaps")),
        collapse_finding(runs),
        quality_finding(runs),
        speed_finding(runs),
        interpolation_finding(store.load_table("interpolation")),
        vae_finding(store.load_json("vae")),
    ]
    return {"findings": findings}
