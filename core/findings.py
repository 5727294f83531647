"""The paper's findings, each checked against the numbers measured on this model.

`compute_findings(store, lm)` reads the precomputed tables and returns a list of
findings for the home page's teaching tour: the claim, the page and chart that
test it, the number measured here, and a plain verdict (agrees, partly, does not
agree, or not measured). Verdict rules are stated in each finding's `rule`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from core.artifacts import ArtifactStore


def _finding(key: str, claim: str, page: str, chart: str, measured: str, verdict: str, rule: str,
             numbers: dict | None = None) -> dict:
    return {"key": key, "claim": claim, "page": page, "chart": chart, "measured": measured, "verdict": verdict,
            "rule": rule, "numbers": numbers or {}}


def _not_measured(key: str, claim: str, page: str, chart: str, why: str) -> dict:
    return _finding(key, claim, page, chart, why, "not measured", "")


def trajectory_finding(traj: dict | None) -> dict:
    claim = ("Sentences jump around the token-embedding space: the spread of their step lengths is statistically "
             "lower than that of random walks over the vocabulary, though close.")
    if not traj or "token_layer" not in traj:
        return _not_measured("trajectory", claim, "Embedding space", "trajectory over the token cloud",
                             "no trajectory table")
    t, last = traj["token_layer"], traj.get("last_layer")
    ratio = t["real_mean_step"] / t["random_mean_step"]
    lower = t["std_p_value"] < 0.05
    lower_last = last is not None and last["std_p_value"] < 0.05
    close = 0.7 < ratio < 1.3
    verdict = "agrees" if lower and close else ("partly" if lower_last else "does not agree")
    measured = (f"over {int(t['n_real'])} news sentences in the token-embedding space: spread of steps lower than "
                f"random walks' with one-sided Mann-Whitney p = {t['std_p_value']:.2g}; mean step "
                f"{t['real_mean_step']:.2f} vs {t['random_mean_step']:.2f} for random walks")
    if last is not None:
        measured += (f". In the last layer's activations the spread is lower with p = {last['std_p_value']:.2g} "
                     f"(mean step {last['real_mean_step']:.0f} vs {last['random_mean_step']:.0f})")
    return _finding("trajectory", claim, "Embedding space", "sentence trajectory and step statistics", measured,
                    verdict, "agrees when the token-level spread test gives p < 0.05 and mean steps are within 30% "
                    "of the random walks'; partly when only the last layer's spread is lower",
                    {"ratio": ratio, "std_p_value": t["std_p_value"]})


def separation_finding(sep: pd.DataFrame | None) -> dict:
    claim = ("SQuAD activations stay close to C4, while MATH activations lie in a distant cluster, on all layers.")
    if sep is None or sep.empty:
        return _not_measured("separation", claim, "Activations", "separation across layers", "no separation table")
    pivot = sep.pivot_table(index="layer", columns="comparison", values="centroid_ratio")
    sil = sep.pivot_table(index="layer", columns="comparison", values="silhouette")
    further = (pivot["math vs c4"] > pivot["squad vs c4"])
    share = float(further.mean())
    layers = list(pivot.index)
    picks = [layers[0], layers[len(layers) // 2], layers[-1]]
    detail = "; ".join(
        f"layer {k}: centroid ratio MATH-C4 {pivot.loc[k, 'math vs c4']:.2f} vs SQuAD-C4 "
        f"{pivot.loc[k, 'squad vs c4']:.2f}, silhouette {sil.loc[k, 'math vs c4']:.2f} vs "
        f"{sil.loc[k, 'squad vs c4']:.2f}" for k in picks)
    verdict = "agrees" if share == 1.0 else ("partly" if share >= 0.5 else "does not agree")
    measured = f"MATH sits further from C4 than SQuAD does on {share:.0%} of {len(layers)} layers ({detail})"
    return _finding("separation", claim, "Activations", "separation across layers", measured, verdict,
                    "agrees when MATH-C4 centroid distance (relative to spread) exceeds SQuAD-C4's on every layer",
                    {"share_of_layers": share})


def _soft_math(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["method"] == "soft") & (runs["dataset"] == "math")]


def collapse_finding(runs: pd.DataFrame | None) -> dict:
    claim = ("Trained prompts do not always collapse onto the token embeddings: where they end up depends on "
             "the prior.")
    if runs is None or runs.empty:
        return _not_measured("collapse", claim, "Divergence", "prior, path and posterior on the same PCA axes",
                             "no runs")
    cols = ["collapse_score", "collapse_score_cos", "median_manifold_ratio", "median_nearest_cos", "mean_drift_l2"]
    soft = _soft_math(runs).groupby("prior")[cols].mean()
    spread = float(soft["median_manifold_ratio"].max() / max(soft["median_manifold_ratio"].min(), 1e-9))
    # The angular score: short vectors near the centre are 'closer to a token than its neighbour' in
    # Euclidean terms without pointing at any token, so the Euclidean score alone would overstate collapse.
    all_collapsed = bool((soft["collapse_score_cos"] >= 0.9).all())
    verdict = "does not agree" if all_collapsed else ("agrees" if spread > 2 else "partly")
    measured = "; ".join(f"{p}: collapse {r.collapse_score_cos:.2f} by angle ({r.collapse_score:.2f} by distance), "
                         f"nearest-token cosine {r.median_nearest_cos:.2f}, manifold distance "
                         f"x{r.median_manifold_ratio:.1f}, drift {r.mean_drift_l2:.3f}" for p, r in soft.iterrows())
    return _finding("collapse", claim, "Divergence", "prior, path and posterior on the same PCA axes", measured,
                    verdict, "agrees when not every prior's posterior collapses (angular score < 0.9 for some) and the "
                    "posteriors' distances to the token manifold differ over 2x across priors",
                    {"per_prior": soft.reset_index().to_dict(orient="records")})


def quality_finding(runs: pd.DataFrame | None) -> dict:
    claim = "Final quality is the same whatever the prior."
    if runs is None or runs.empty:
        return _not_measured("quality", claim, "Runs", "final loss per prior", "no runs")
    from core.analysis.runs_compare import prior_significance

    sig = prior_significance(runs, "final_val_loss")
    soft = _soft_math(runs).groupby("prior")["final_val_loss"].mean()
    rel_span = float((soft.max() - soft.min()) / soft.mean()) if len(soft) else math.nan
    tested = [t for t in sig["tests"] if not math.isnan(t.get("p_value", math.nan))]
    differs = any(t["p_value"] < 0.05 for t in tested)
    verdict = "does not agree" if differs else ("agrees" if rel_span < 0.1 else "partly")
    measured = ("soft/MATH final validation loss by prior: "
                + ", ".join(f"{p} {v:.3f}" for p, v in soft.items())
                + f" (spread {rel_span:.0%} of the mean). {sig['statement']}")
    return _finding("quality", claim, "Runs", "final loss per prior", measured, verdict,
                    "agrees when no test across repeated seeds finds a difference (p >= 0.05) and the soft/MATH "
                    "means span under 10%", {"relative_span": rel_span})


def speed_finding(runs: pd.DataFrame | None) -> dict:
    claim = "Priors that start far from the data take longer to reach the same validation loss."
    if runs is None or runs.empty or "steps_to_loss" not in runs:
        return _not_measured("speed", claim, "Runs", "steps to reach a loss", "no runs")
    from core.analysis.runs_compare import divergence_vs_speed

    soft = _soft_math(runs)
    res = divergence_vs_speed(soft)
    steps = soft.groupby("prior")["steps_to_loss"].mean()
    if math.isnan(res["rho"]):
        verdict = "not measured"
    else:
        verdict = "agrees" if res["rho"] > 0 and res["p_value"] < 0.05 else ("partly" if res["rho"] > 0
                                                                           else "does not agree")
    measured = ("steps to the common loss: " + ", ".join(
        f"{p} {'never' if np.isnan(v) else int(v)}" for p, v in steps.items()) + f". {res['statement']}")
    return _finding("speed", claim, "Runs", "steps to reach a loss", measured, verdict,
                    "agrees when the rank correlation of initial distance and steps-to-loss is positive with p < 0.05",
                    {"rho": res["rho"], "p_value": res["p_value"]})


def interpolation_finding(interp: pd.DataFrame | None) -> dict:
    claim = "A model can use embeddings between the MATH and C4 clusters (deep prompts from the interpolation prior)."
    if interp is None or interp.empty:
        return _not_measured("interpolation", claim, "Interpolation", "posterior positions on the MATH-C4 axis",
                             "no interpolation table")
    rows = interp[interp["prior"] == "interpolation"] if "prior" in interp else interp
    post = rows[rows["kind"] == "posterior"]["position"].to_numpy()
    prior = rows[rows["kind"] == "prior"]["position"].to_numpy()
    if not len(post):
        return _not_measured("interpolation", claim, "Interpolation", "posterior positions on the MATH-C4 axis",
                             "no trained interpolation prompts")
    between = float(np.mean((post > 0.05) & (post < 0.95))) if len(post) else math.nan
    verdict = "agrees" if between >= 0.5 else ("partly" if between >= 0.2 else "does not agree")
    measured = (f"{between:.0%} of trained deep-prompt vectors lie between the cluster means (0 = C4, 1 = MATH); "
                f"median position {np.median(post):.2f} after training vs {np.median(prior):.2f} at the prior")
    return _finding("interpolation", claim, "Interpolation", "posterior positions on the MATH-C4 axis", measured,
                    verdict, "agrees when at least half of the trained vectors stay strictly between the means",
                    {"share_between": between})


def vae_finding(vae: dict | None) -> dict:
    claim = "A VAE prior trained on activations collapses: its samples lose the data's spread."
    if not vae:
        return _not_measured("vae", claim, "Prior lab", "VAE prior samples over the reference", "no VAE diagnostics")
    g = vae["diagnostics"]
    collapsed = g["spread_ratio"] < 0.5 or g["active_units"] <= max(1, g["latent_dim"] // 4)
    verdict = "agrees" if collapsed else "does not agree"
    measured = (f"{g['active_units']}/{g['latent_dim']} active latent units, decoded spread {g['spread_ratio']:.2f} "
                f"x the data's, reconstruction error {g['recon_rel_error']:.2f} of the variance")
    return _finding("vae", claim, "Prior lab", "VAE prior samples over the reference", measured, verdict,
                    "agrees when decoded spread is under half the data's or a quarter or fewer latent units are active",
                    {k: g[k] for k in ("active_units", "latent_dim", "spread_ratio")})


def compute_findings(store: ArtifactStore, lm=None) -> dict:  # noqa: ANN001 - lm unused, kept for symmetry
    """All findings from the tables in `store` (missing tables give 'not measured')."""
    runs = store.load_table("runs")
    findings = [
        trajectory_finding(store.load_json("trajectory")),
        separation_finding(store.load_table("separation")),
        collapse_finding(runs),
        quality_finding(runs),
        speed_finding(runs),
        interpolation_finding(store.load_table("interpolation")),
        vae_finding(store.load_json("vae")),
    ]
    return {"findings": findings}
