"""The home page's tour: which prior's prompt collapses and which does not, read from the runs table.

`collapse_pair(runs)` looks at the soft-prompt MATH runs (converged ones only,
when the table says which converged) and, per prior, at the mean final collapsed
share beside its step-0 share. When one prior's prompt collapses and another's
does not, it returns that pair with a representative run of each, for the page to
show side by side; otherwise a plain statement of what the runs show. The rule is
returned with the numbers, so the page prints the same rule the code applied.
`seeds_line(runs)` says how many seeds each prior has, and `prompt_readout` gives
a run's trained prompt as its nearest tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from core.analysis import divergence as dv
from core.findings import MIN_SEEDS

COLLAPSES_AT = 0.5  # a prior collapses when at least half its vectors end collapsed (and training put them there)
CLEAR_AT = 0.1  # a prior does not collapse when at most a tenth of its vectors end collapsed
RULE = (f"Soft-prompt MATH runs (converged ones, where the table records convergence), per prior: the mean over "
        f"seeds of the final share of prompt vectors that are collapsed (core.analysis.divergence.collapsed). A "
        f"prior's prompt collapses when that mean is at least {COLLAPSES_AT} and above its step-0 share (training "
        f"moved it there); it does not when the mean is at most {CLEAR_AT}. The pair is the most collapsed prior "
        f"and the least; each is shown by the seed whose final share is closest to its prior's mean.")

UNRECORDED = ("The runs table does not record whether runs converged; these runs trained a fixed number of steps "
              "and may have stopped short of where training would take them.")

PAIR, NONE_COLLAPSES, ALL_COLLAPSE, NONE_CLEAR, NO_RUNS, NO_CONVERGED = (
    "pair", "none collapses", "every prior collapses", "none stays clear", "no runs", "no converged runs")


def _soft_math(runs: pd.DataFrame | None) -> pd.DataFrame:
    if runs is None or runs.empty or not {"method", "dataset", "prior"} <= set(runs):
        return pd.DataFrame()
    return runs[(runs["method"] == "soft") & (runs["dataset"] == "math")]


def _converged(table: pd.DataFrame) -> pd.Series:
    # read_csv gives a bool column, or object when some cells are empty: accept True and "true" alike.
    return table["converged"].map(lambda v: str(v).strip().lower() == "true")


def _mean(table: pd.DataFrame, col: str) -> float:
    """Mean of a column, NaN when the column is missing (older tables) or empty."""
    values = pd.to_numeric(table[col], errors="coerce").dropna() if col in table else pd.Series(dtype=float)
    return float(values.mean()) if len(values) else math.nan


def _per_prior(soft: pd.DataFrame) -> pd.DataFrame:
    """One row per prior: n seeds, mean step-0 and final collapsed share, mean drift and final loss."""
    rows = []
    for prior, group in soft.groupby("prior", sort=True):
        rows.append({"prior": str(prior), "n": int(len(group)), "step0": _mean(group, "init_collapsed_share"),
                     "final": _mean(group, "collapsed_share"), "drift_l2": _mean(group, "mean_drift_l2"),
                     "drift_rel_nn_gap": _mean(group, "drift_rel_nn_gap"),
                     "final_val_loss": _mean(group, "final_val_loss")})
    return pd.DataFrame(rows)


def _representative(soft: pd.DataFrame, prior: str, mean: float) -> dict:
    """The prior's run whose final collapsed share is closest to the prior's mean (lowest seed on a tie)."""
    group = soft[soft["prior"] == prior].copy()
    group["_gap"] = (pd.to_numeric(group["collapsed_share"], errors="coerce") - mean).abs()
    sort = ["_gap", "seed"] if "seed" in group else ["_gap"]
    row = group.sort_values(sort, kind="stable").iloc[0]
    keep = ["run", "seed", "collapsed_share", "init_collapsed_share", "mean_drift_l2", "drift_rel_nn_gap",
            "final_val_loss", "metric", "metric_value", "same_model"]
    return {k: (row[k].item() if isinstance(row[k], np.generic) else row[k]) for k in keep if k in row}


def _side(per: pd.DataFrame, soft: pd.DataFrame, prior: str) -> dict:
    stats = per.set_index("prior").loc[prior].to_dict()  # a row of mixed dtypes: n comes back a float
    return {"prior": prior, **stats, "n": int(stats["n"]), "run": _representative(soft, prior, stats["final"])}


def collapse_pair(runs: pd.DataFrame | None) -> dict:
    """Pick the tour's collapse pair from a runs table (artifacts/tables/runs.csv).

    Returns {"status", "statement", "rule", "note", "per_prior" (records), "pair", "showcase"}: status is one of
    "pair", "none collapses", "every prior collapses", "none stays clear", "no runs", "no converged runs";
    note says when the table does not record convergence ("" otherwise);
    pair is {"collapses": side, "does_not": side} or None, a side being the prior's per-prior numbers
    (n, step0, final, drift_l2, drift_rel_nn_gap, final_val_loss) plus "run", its representative run's row;
    showcase: the run names that show the statement (the pair's runs; or, when none collapses, a run of a prior
    that started collapsed and left beside one that started far off), for a page to open on ([] when none).
    """
    soft = _soft_math(runs)
    # Runs from before convergence was recorded trained a fixed budget: say so beside whatever they show.
    note = "" if soft.empty or "converged" in soft else UNRECORDED
    out = {"rule": RULE, "per_prior": [], "pair": None, "note": note, "showcase": []}
    if soft.empty or "collapsed_share" not in soft:
        why = "no soft-prompt MATH runs" if soft.empty else "the runs table has no collapsed share"
        return {**out, "status": NO_RUNS, "statement": f"{why}: the tour cannot say whether a prompt collapses."}
    if "converged" in soft:
        soft = soft[_converged(soft)]
        if soft.empty:
            return {**out, "status": NO_CONVERGED, "statement": "no converged runs yet: the tour cannot say."}
    soft = soft.dropna(subset=["collapsed_share"])
    if soft.empty:
        return {**out, "status": NO_RUNS, "statement": "no run has a measured collapsed share: the tour cannot say."}
    per = _per_prior(soft)
    out["per_prior"] = per.to_dict(orient="records")
    # NaN step 0 fails "above step 0": without it we cannot say training moved the prompt there.
    collapses = per[(per["final"] >= COLLAPSES_AT) & (per["final"] > per["step0"])]
    clear = per[per["final"] <= CLEAR_AT]
    top = per.sort_values(["final", "prior"], ascending=[False, True]).iloc[0]
    low = per.sort_values(["final", "prior"]).iloc[0]
    if len(collapses) and len(clear):
        most = collapses.sort_values(["final", "prior"], ascending=[False, True]).iloc[0]["prior"]
        least = clear.sort_values(["final", "prior"]).iloc[0]["prior"]
        pair = {"collapses": _side(per, soft, most), "does_not": _side(per, soft, least)}
        return {**out, "status": PAIR, "pair": pair, "showcase": [side["run"]["run"] for side in pair.values()],
                "statement": f"prior {most}'s prompt collapses and prior {least}'s does not."}
    if collapses.empty:
        # A prior that starts collapsed (vocab: prompts initialised on token embeddings) and ends clear shows
        # training moving prompts away from the tokens, the opposite of collapse: say so.
        left = per[(per["step0"] >= COLLAPSES_AT) & (per["final"] <= CLEAR_AT)]
        start = "" if len(left) else f", {_fmt(top['step0'])} at step 0"  # said below when some prior left
        statement = (f"no prior's prompt collapsed in these runs (largest final share {top['final']:.2f} "
                     f"for prior {top['prior']}{start}).")
        showcase = []
        if len(left):
            started = ", ".join(f"{r.prior} ({r.step0:.2f} at step 0, {r.final:.2f} trained)"
                                for r in left.itertuples())
            statement += f" Prompts that started collapsed left the tokens: {started}."
            # the story to show: a prompt that started on the tokens and left, beside one that started far off
            first = left.sort_values(["step0", "prior"], ascending=[False, True]).iloc[0]
            far = per[~per["prior"].isin(left["prior"])].sort_values(["step0", "final", "prior"])
            showcase = [_representative(soft, first["prior"], first["final"])["run"]]
            if len(far):
                showcase.append(_representative(soft, far.iloc[0]["prior"], far.iloc[0]["final"])["run"])
        return {**out, "status": NONE_COLLAPSES, "statement": statement, "showcase": showcase}
    if len(collapses) == len(per):
        return {**out, "status": ALL_COLLAPSE, "statement": (f"every prior collapsed (smallest final share "
                                                              f"{low['final']:.2f} for prior {low['prior']}).")}
    return {**out, "status": NONE_CLEAR,
            "statement": (f"some priors' prompts collapsed, but none stayed clear of it (smallest final share "
                          f"{low['final']:.2f} for prior {low['prior']}, above {CLEAR_AT}).")}


def _fmt(x: float | None, spec: str = ".2f", missing: str = "not measured") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def side_lines(side: dict) -> list[str]:
    """A pair side in words for the page, one markdown line each: collapse step 0 -> trained, drift, loss, run."""
    run = side["run"]
    rel = side.get("drift_rel_nn_gap")
    gap = "" if rel is None or math.isnan(rel) else f" ({_fmt(rel)} of the token nearest-neighbour gap)"
    seed = run.get("seed")
    return [
        f"Collapsed share **{_fmt(side['step0'])} at step 0 -> {_fmt(side['final'])} trained** "
        f"(mean over {side['n']} seed(s))",
        f"Drift from the prior sample: {_fmt(side['drift_l2'], '.3f')} L2 per vector{gap}",
        f"Final validation loss: {_fmt(side['final_val_loss'], '.3f')}",
        f"Shown: run `{run.get('run', '?')}` (seed {seed}), final collapsed share "
        f"{_fmt(run.get('collapsed_share'))}, the seed closest to the prior's mean",
    ]


def seeds_line(runs: pd.DataFrame | None) -> str:
    """How many seeds each prior has in the soft-prompt MATH runs, against what the claims about priors need."""
    soft = _soft_math(runs)
    if soft.empty:
        return "The runs table holds no soft-prompt MATH runs, so no verdict about priors can rest on seeds."
    counts = soft.groupby("prior")["seed"].nunique() if "seed" in soft else soft.groupby("prior").size()
    listed = ", ".join(f"{p} {int(c)}" for p, c in counts.sort_index().items())
    short = int((counts < MIN_SEEDS).sum())
    verdict = (f"{short} of {len(counts)} priors have fewer than the {MIN_SEEDS} that a verdict about priors needs, "
               "so those verdicts stay inconclusive" if short else
               f"every prior has the {MIN_SEEDS} or more that a verdict about priors needs")
    converged = ""
    if "converged" in soft:
        converged = f" ({int(_converged(soft).sum())} of {len(soft)} runs converged)"
    return f"Seeds per prior in the soft-prompt MATH runs{converged}: {listed}; {verdict}."


def prompt_readout(lm, run_path: str | Path, ref: dv.ReferenceCloud | None = None) -> str:  # noqa: ANN001 - LoadedModel
    """A run's trained soft prompt [n, d] read as each vector's nearest token by cosine, with that cosine.

    ref: the token reference of `lm` (pass it to read several runs without rebuilding it).
    """
    from core.analysis.runs_compare import same_model
    from core.runs import load_run

    if not (Path(run_path) / "run.json").exists():  # the table can list a run whose folder is not (yet) on disk
        return f"(run {Path(run_path).name} is not on disk, so its prompt cannot be read)"
    run = load_run(run_path)
    if not same_model(run, lm):
        return f"(run {Path(run_path).name} was trained on another model: its vectors do not read in this one)"
    if "soft" not in run.prompt:
        return f"(run {Path(run_path).name} has no soft prompt)"
    ref = ref if ref is not None else dv.token_reference(lm)
    ids, cos = dv.nearest_by_cosine(run.prompt["soft"], ref, top_k=1)
    return " · ".join(f"{ref.texts[i]!r} ({c:.2f})" for i, c in zip(ids[:, 0], cos[:, 0], strict=True))
