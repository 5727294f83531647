"""The paper's claims over a run table (`core.analysis.runs_compare.runs_table`): spread across priors,
significance, and whether priors that start far from the reference are slower."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def prior_spread(table: pd.DataFrame, value: str = "final_val_loss") -> pd.DataFrame:
    """Per (method, dataset, prior): number of runs, mean, std, min, max of `value`."""
    if value not in table:
        raise ValueError(f"column {value!r} is not in the run table; choose one of {', '.join(table.columns)}")
    clean = table.dropna(subset=[value])
    grouped = clean.groupby(["method", "dataset", "prior"])[value]
    return grouped.agg(runs="count", mean="mean", std="std", min="min", max="max").reset_index()


def prior_significance(table: pd.DataFrame, value: str = "final_val_loss") -> dict:
    """Does `value` differ across priors? Per (method, dataset) group of runs.

    Uses the Kruskal-Wallis test across priors that have at least two runs
    (repeated seeds); with fewer, only the spread is reported. Returns
    {"tests": [{"method", "dataset", "priors", "runs", "statistic", "p_value", "statement"}],
     "statement": one line for the page}.
    """
    from scipy.stats import kruskal

    spread = prior_spread(table, value)
    tests = []
    for (method, dataset), group in table.dropna(subset=[value]).groupby(["method", "dataset"]):
        samples = {p: g[value].to_numpy() for p, g in group.groupby("prior")}
        repeated = {p: s for p, s in samples.items() if len(s) >= 2}
        block = spread[(spread["method"] == method) & (spread["dataset"] == dataset)]
        span = float(block["mean"].max() - block["mean"].min()) if len(block) else math.nan
        entry = {"method": method, "dataset": dataset, "priors": len(samples), "runs": int(len(group)),
                 "range_of_means": span, "statistic": math.nan, "p_value": math.nan}
        if len(repeated) >= 2:
            flat = np.concatenate(list(repeated.values()))
            if np.ptp(flat) == 0:
                entry["p_value"] = 1.0
                entry["statistic"] = 0.0
            else:
                stat, p = kruskal(*repeated.values())
                entry["statistic"], entry["p_value"] = float(stat), float(p)
            verdict = "differ" if entry["p_value"] < 0.05 else "do not differ significantly"
            entry["statement"] = (
                f"{method}/{dataset}: across {len(repeated)} priors with repeated seeds, {value} values "
                f"{verdict} (Kruskal-Wallis H={entry['statistic']:.2f}, p={entry['p_value']:.3f}); "
                f"means span {span:.3f} over all {len(samples)} priors."
            )
        else:
            entry["statement"] = (
                f"{method}/{dataset}: means of {value} span {span:.3f} over {len(samples)} priors "
                f"({len(group)} runs); no test: fewer than two priors have repeated seeds."
            )
        tests.append(entry)
    statement = " ".join(t["statement"] for t in tests) or "No runs with this value yet."
    return {"tests": tests, "statement": statement}


def divergence_vs_speed(table: pd.DataFrame, divergence_col: str = "init_manifold_ratio",
                        speed_col: str = "steps_to_loss") -> dict:
    """Do priors that start further from the reference take longer to reach the same loss?

    Spearman rank correlation between `divergence_col` (default: how far the
    initial sample sits from the token manifold) and `speed_col` over runs that
    have both. Returns {"n", "rho", "p_value", "statement"}.
    """
    from scipy.stats import spearmanr

    for col in (divergence_col, speed_col):
        if col not in table:
            raise ValueError(f"column {col!r} is not in the run table; build it with runs_table(..., target_loss=...)")
    both = table[[divergence_col, speed_col]].apply(pd.to_numeric, errors="coerce").dropna()
    out = {"n": int(len(both)), "rho": math.nan, "p_value": math.nan}
    if len(both) < 3 or both[divergence_col].nunique() < 2 or both[speed_col].nunique() < 2:
        out["statement"] = (f"Not enough varied runs to correlate {divergence_col} with {speed_col} "
                            f"({len(both)} runs with both; need 3 or more that differ).")
        return out
    rho, p = spearmanr(both[divergence_col], both[speed_col])
    out["rho"], out["p_value"] = float(rho), float(p)
    direction = "longer" if rho > 0 else "shorter"
    strength = "significant" if p < 0.05 else "not significant"
    out["statement"] = (f"Over {len(both)} runs, priors with larger {divergence_col} take {direction} to reach "
                        f"the loss (Spearman rho={rho:.2f}, p={p:.3f}, {strength}).")
    return out
