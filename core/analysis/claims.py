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


# --------------------------------------------------------------------------- statistics for verdicts
# Every verdict is one of these three; a finding's rule (test, margin, thresholds) is data stored beside it.
AGREES, DISAGREES, INCONCLUSIVE = "agrees", "does not agree", "inconclusive"
VERDICTS = (AGREES, DISAGREES, INCONCLUSIVE)
CONFIDENCE = 0.95
N_RESAMPLES = 2000


def bootstrap_ci(samples: tuple[np.ndarray, ...], statistic, paired: bool = False,  # noqa: ANN001 - a callable
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of `statistic(*samples)` (scipy.stats.bootstrap; 1-D samples resampled
    independently, or together when `paired`; for rows of a matrix, resample their indices).
    (nan, nan) when a sample has fewer than 2 values or the
    statistic does not vary (a degenerate bootstrap)."""
    from scipy.stats import bootstrap

    samples = tuple(np.asarray(s, dtype=np.float64) for s in samples)
    if any(len(s) < 2 for s in samples):
        return math.nan, math.nan
    res = bootstrap(samples, statistic, paired=paired, vectorized=False, n_resamples=N_RESAMPLES,
                    confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # every resample gave one value
        value = float(statistic(*samples))
        return value, value
    return low, high


def verdict_from_ci(ci: tuple[float, float], agrees_above: float | None = None,
                    agrees_below: float | None = None) -> str:
    """agrees when the whole CI is above `agrees_above` (or below `agrees_below`); does not agree when the whole
    CI is on the other side of that threshold; inconclusive when it straddles it or is missing."""
    low, high = ci
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if agrees_above is not None:
        return AGREES if low > agrees_above else (DISAGREES if high < agrees_above else INCONCLUSIVE)
    if agrees_below is not None:
        return AGREES if high < agrees_below else (DISAGREES if low > agrees_below else INCONCLUSIVE)
    raise ValueError("give agrees_above or agrees_below")


def tost(a: np.ndarray, b: np.ndarray, margin: float) -> dict:
    """Equivalence of the means of a and b within +-margin: two one-sided Welch t-tests (scipy.stats.ttest_ind).

    Returns {"difference": mean(a) - mean(b), "p_value": the larger one-sided p (equivalent when < 0.05),
    "ci90": the 90% Welch CI of the difference (the TOST's own interval), "margin"}.
    """
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    p_lower = float(ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue)  # diff > -margin
    p_upper = float(ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue)  # diff < +margin
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=0.90)
    return {"difference": float(a.mean() - b.mean()), "p_value": max(p_lower, p_upper),
            "ci90": [float(ci.low), float(ci.high)], "margin": float(margin)}


def spearman_ci(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """Spearman's rho (scipy.stats.spearmanr) with its p-value and a paired bootstrap 95% CI over the pairs."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": math.nan, "p_value": math.nan, "ci": [math.nan, math.nan], "n": int(len(x))}
    res = spearmanr(x, y)

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        value = spearmanr(a, b).statistic
        return 0.0 if not np.isfinite(value) else float(value)  # a resample with a constant side: no association

    return {"rho": float(res.statistic), "p_value": float(res.pvalue),
            "ci": list(bootstrap_ci((x, y), rho, paired=True, seed=seed)), "n": int(len(x))}


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b over pairs with a bootstrap 95% CI and the Wilcoxon signed-rank p-value (scipy.stats)."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    p = float(wilcoxon(diff).pvalue) if len(diff) >= 2 and np.any(diff != 0) else math.nan
    return {"effect": float(diff.mean()) if len(diff) else math.nan,
            "ci": list(bootstrap_ci((diff,), np.mean, seed=seed)), "p_value": p, "n": int(len(diff))}
