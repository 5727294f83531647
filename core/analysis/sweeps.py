"""Aggregating a sweep: a long table (one row per trial) and, per prior x method x dataset, mean and 95% CI over seeds.

    >>> table = sweep_table("runs/priors")                 # the run table of core.analysis.runs_compare + status
    >>> summary = sweep_summary(table)                     # long: group, measure, n, mean, sd, ci_low, ci_high
    >>> format_summary(summary)                            # wide text cells "mean [lo, hi]" for a terminal

Confidence intervals are Student t intervals (scipy.stats.t.interval on the standard error) over the done
trials of a group; a group with one trial has no interval (NaN, shown as undefined), never a made-up one.
Divergence measures come from the run table (`runs_compare.runs_table`, which needs the loaded model) or, with
no model, from a stored run table such as the committed artifacts' runs.csv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.analysis import runs_compare as rc
from core.runs import run_info
from core.sweep.record import read_sweep, sweep_members, sweep_of_run

GROUP = ("method", "dataset", "prior")
QUALITY = ("final_val_loss", "eval_answer_loss", "metric_value", "steps_to_loss")
# divergence columns of the run table, whichever of them it holds (older stored tables name collapse differently)
DIVERGENCE = ("collapsed_share", "init_collapsed_share", "collapse_score", "median_nearest_cos_centered",
              "collapse_score_cos", "median_manifold_ratio", "median_mahalanobis", "mean_drift_l2")
# how far training moved the prompt, from run.json: over its initial norm, over the token nearest-neighbour gap
DRIFT = ("drift_rel_init", "drift_rel_nn_gap")
MEASURES = QUALITY + DIVERGENCE + DRIFT
CONFIDENCE = 0.95


@dataclass(frozen=True)
class _NoModel:
    """Stands in for a loaded model when none is: the run table then skips divergence (no run matches it)."""

    fingerprint: str = "(no model loaded: divergence not measured)"


def _origin(path: Path) -> str:
    for origin, root in rc.ORIGINS.items():
        if Path(root).resolve() == path.resolve():
            return origin
    return "yours"


def sweep_table(path: str | Path, lm=None, target_loss: float | str | None = "auto",  # noqa: ANN001
                stored: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trial of the sweep in `path`: trial, status, error, the grid values, and the run table's columns
    (losses, steps_to_loss, task metric, divergence) for trials that left a run folder.

    lm: the loaded model, to measure divergence; None reads divergence only from `stored` (default: the committed
    artifacts' runs.csv when `path` is the gallery), else leaves it NaN.
    """
    path = Path(path)
    record = read_sweep(path)
    origin = _origin(path)
    entries = [rc.RunEntry(run_info(path / t["name"]), origin) for t in record.get("trials", [])
               if (path / t["name"] / "run.json").is_file()]
    if stored is None and lm is None and origin == "precomputed":
        from core.artifacts import ArtifactStore

        stored = ArtifactStore().load_table("runs")
    runs = rc.runs_table(lm if lm is not None else _NoModel(), entries, target_loss,
                         stored=stored if lm is not None else None) if entries else pd.DataFrame()
    if lm is None and stored is not None and not runs.empty and "run" in stored:
        measured = [c for c in DIVERGENCE + ("init_manifold_ratio", "init_mahalanobis") if c in stored]
        runs = runs.drop(columns=[c for c in measured if c in runs]).merge(
            stored[["run", *measured]], on="run", how="left")
    if lm is None and "same_model" in runs:
        runs = runs.drop(columns="same_model")
    trials = pd.DataFrame([{"trial": t["name"], "status": t.get("status", "pending"),
                            "error": (t.get("error") or "").splitlines()[0] if t.get("error") else "",
                            "seconds": t.get("seconds"), "model": (t.get("model") or {}).get("name"),
                            **grid_values(t),
                            **{k: (t.get("config") or t.get("options") or {}).get(k)
                               for k in ("method", "dataset", "prior", "seed", "lr")}}
                           for t in record.get("trials", [])])
    if runs.empty:
        return trials
    runs = runs.rename(columns={"run": "trial"}).drop(columns=["method", "dataset", "prior", "seed", "lr"],
                                                      errors="ignore")
    return trials.merge(runs, on="trial", how="left")


def grid_values(trial: dict) -> dict:
    """A sweep trial's grid values as table columns {"grid.KEY": value}: a list (layers) as its space-separated
    words, so that it can key a group; a dict-valued override (prior-param as one object) is left out."""
    return {f"grid.{k}": " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            for k, v in (trial.get("overrides") or {}).items() if not isinstance(v, dict)}


def _interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high) of `values`: the t interval at CONFIDENCE; NaN bounds for fewer than 2 values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(np.std(values, ddof=1))
    if sd == 0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(CONFIDENCE, df=n - 1, loc=mean, scale=stats.sem(values))
    return mean, sd, float(low), float(high)


# Grid keys that do not make a different setting: the seed, and what only bounds or reports a run (a budget raised
# for the trials that had not converged yet, how often it validates or evaluates, where it runs).
NOT_A_SETTING = ("seed", "steps", "eval_n", "n_val", "val_every", "snapshot_every", "keep", "force", "threads",
                 "device", "max_new_tokens")


def group_columns(table: pd.DataFrame) -> list[str]:
    """prior x method x dataset, plus any other setting the sweep varies: lr and model, and any other grid key (a
    prior parameter, layers, the soft prompt) that differs within a prior x method x dataset group, whose trials
    are then different settings. Never the seed or a step budget (`NOT_A_SETTING`)."""
    base = [c for c in GROUP if c in table]
    extra = [c for c in ("lr", "model") if c in table and table[c].nunique(dropna=True) > 1]
    named = (*GROUP, "lr", "model", *NOT_A_SETTING)  # grid keys with a column of their own, or no setting
    groups = [table[c] for c in base] or [pd.Series(0, index=table.index)]  # no base columns: one group
    for column in table.columns:
        key = str(column).removeprefix("grid.").replace("-", "_")
        if not str(column).startswith("grid.") or key in named:
            continue
        values = table[column].astype(str)  # NaN (a trial without that override) counts as a value of its own
        if (values.groupby(groups, dropna=False).nunique() > 1).any():
            extra.append(column)
    return base + extra


def sweep_summary(table: pd.DataFrame, measures: tuple[str, ...] = MEASURES,
                  by: list[str] | None = None) -> pd.DataFrame:
    """Per group of done trials and measure: n, mean, sd, ci_low, ci_high (95% t interval; NaN when n < 2), and
    the group's failed trials. Long table: *group columns, measure, n, failed, mean, sd, ci_low, ci_high."""
    by = by or group_columns(table)
    cols = [*by, "measure", "n", "failed", "mean", "sd", "ci_low", "ci_high"]
    if table.empty:
        return pd.DataFrame(columns=[*cols, "ci"])
    status = table["status"] if "status" in table else pd.Series("done", index=table.index)
    rows = []
    for key, group in table.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        done = group[status.loc[group.index] == "done"]
        failed = int((status.loc[group.index] == "failed").sum())
        for measure in measures:
            if measure not in table:
                continue
            values = pd.to_numeric(done[measure], errors="coerce").dropna().to_numpy(dtype=float)
            if not len(values) and table[measure].isna().all():
                continue
            mean, sd, low, high = _interval(values)
            rows.append({**dict(zip(by, key, strict=True)), "measure": measure, "n": len(values), "failed": failed,
                         "mean": mean, "sd": sd, "ci_low": low, "ci_high": high,
                         "ci": "undefined (one seed)" if len(values) == 1 else
                         ("-" if not len(values) else f"[{low:.4g}, {high:.4g}]")})
    return pd.DataFrame(rows, columns=[*cols, "ci"])


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The long summary as a wide text table for a terminal: one row per group, "mean [lo, hi]" per measure."""
    if summary.empty:
        return pd.DataFrame({"note": ["no done trials yet"]})
    by = [c for c in summary.columns if c not in ("measure", "n", "failed", "mean", "sd", "ci_low", "ci_high", "ci")]
    summary = summary.assign(**{c: summary[c].astype(object).fillna("-") for c in by})  # a trial without that key

    def cell(r: pd.Series) -> str:
        if math.isnan(r["mean"]):
            return "-"
        ci = "[-]" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
        return f"{r['mean']:.4g} {ci}"

    text = summary.assign(cell=summary.apply(cell, axis=1))
    wide = text.pivot_table(index=by, columns="measure", values="cell", aggfunc="first", sort=False)
    counts = summary.groupby(by, sort=False)[["n", "failed"]].max()
    out = counts.join(wide).reset_index()
    return out[[*by, "n", "failed", *[m for m in MEASURES if m in out]]].fillna("-")


def sweep_groups(entries: list[rc.RunEntry]) -> dict[str, list[rc.RunEntry]]:
    """Run entries by the sweep they belong to, {"<sweep> [<origin>]": entries}; runs outside a sweep are left out."""
    out: dict[str, list[rc.RunEntry]] = {}
    members: dict[Path, tuple[str, set[str]]] = {}  # each sweep's record read once, not once per run
    for entry in entries:
        parent = Path(entry.path).parent
        if parent not in members:
            members[parent] = sweep_members(parent) or ("", set())  # not a sweep: no run is its member
        name = sweep_of_run(entry.path, members[parent])
        if name is not None:
            out.setdefault(f"{name} [{entry.origin}]", []).append(entry)
    return out


def group_label(summary: pd.DataFrame) -> pd.Series:
    """Each summary row's setting apart from its prior, for a chart's legend: "method / dataset", then any other
    group column ("/ layers 27 28 29", "/ lr 0.01")."""
    extra = [c for c in group_columns(summary) if c not in GROUP]
    label = summary["method"].astype(str) + " / " + summary["dataset"].astype(str)
    for column in extra:
        label = label + f" / {str(column).removeprefix('grid.')} " + summary[column].astype(str)
    return label


def with_status(table: pd.DataFrame, entries: list[rc.RunEntry]) -> pd.DataFrame:
    """The run table (`runs_table` over `entries`, same order) with each run's status, as `sweep_summary` wants:
    only "done" runs enter the means; diverged or failed ones are counted apart."""
    status = {e.info.name: ("done" if e.info.status == "done" else "failed") for e in entries}
    table = table.assign(status=[status.get(r, "failed") for r in table["run"]])
    # each run's grid values from its sweep's record, so runs of different settings are not one group
    grid: dict[str, dict] = {}
    for folder in {Path(e.path).parent for e in entries}:
        try:
            trials = read_sweep(folder).get("trials", [])
        except (OSError, ValueError):
            continue
        grid.update({t["name"]: grid_values(t) for t in trials if "name" in t})
    rows = [grid.get(r, {}) for r in table["run"]]
    for column in sorted({c for row in rows for c in row}):
        table[column] = [row.get(column) for row in rows]
    return table
