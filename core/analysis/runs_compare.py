"""Comparing trained runs: the run table (one row per run) and steps to a loss.

The rest of the comparison has its own modules, and every name stays importable from here too:
`core.analysis.claims` (spread, significance, speed), `core.analysis.transfer` (prompt transfer),
`core.analysis.loss_curves`, `core.analysis.run_views` (the Divergence and Interpolation pages' views).

Runs come from two roots: the user's `RUNS_DIR` ("yours") and the committed
gallery `artifacts/runs` ("precomputed", read-only). Everything here reads run
folders through `core.runs` and never trains.

    >>> infos = all_runs()
    >>> table = runs_table(lm, infos, target_loss=1.5)     # one row per run
    >>> prior_significance(table, "final_val_loss")       # spread across priors, Kruskal-Wallis where seeds repeat
    >>> divergence_vs_speed(table)                        # do diverged priors take longer to reach the same loss?
    >>> transfer = transfer_matrix(lm, [i.path for i in infos])   # prompt of task A scored on task B
    >>> distance_vs_transfer(transfer)                    # Frobenius distance against transfer, with correlation
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core import runs as runs_mod
from core.analysis import divergence as dv
from core.paths import ARTIFACTS_DIR, RUNS_DIR

ORIGINS = {"yours": RUNS_DIR, "precomputed": ARTIFACTS_DIR / "runs"}


@dataclass
class RunEntry:
    """A run in a list: its `core.runs.RunInfo` and where it came from ("yours" or "precomputed")."""

    info: runs_mod.RunInfo
    origin: str

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def label(self) -> str:
        return f"{self.info.name} [{self.origin}]"


def all_runs(roots: dict[str, Path] | None = None) -> list[RunEntry]:
    """Runs under every root (default: the user's runs, then the precomputed gallery), newest first per root, each
    root followed by the trials of the sweep folders in it (named "<sweep>/<trial>")."""
    from core.sweep.record import list_sweeps

    out = []
    for origin, root in (roots or ORIGINS).items():
        out.extend(RunEntry(info, origin) for info in runs_mod.list_runs(root))
        for sweep in list_sweeps([root]):
            if sweep.path.resolve() != Path(root).resolve():
                for info in runs_mod.list_runs(sweep.path):
                    info.name = f"{sweep.name}/{info.name}"
                    out.append(RunEntry(info, origin))
    return out


def runs_for_model(lm, roots: dict[str, Path] | None = None) -> tuple[list[RunEntry], list[RunEntry]]:  # noqa: ANN001
    """(runs trained on the loaded model's weights, runs trained on other weights), from every root."""
    mine, others = [], []
    for entry in all_runs(roots):
        fingerprint = runs_mod.read_run_json(entry.path).get("config", {}).get("model_fingerprint")
        (mine if fingerprint == lm.fingerprint else others).append(entry)
    return mine, others


def prompt_tensors(run_paths: Iterable[str | Path]) -> list[str]:
    """Names of the prompt tensors every given run holds ("soft" first, then "deep.{l}" by layer)."""
    from safetensors import safe_open

    common: set[str] | None = None
    for path in run_paths:
        with safe_open(str(Path(path) / runs_mod.SNAPSHOT_FILE), framework="pt") as fh:
            names = set(fh.keys())
        common = names if common is None else common & names
    return sorted(common or [], key=lambda k: (k != "soft", int(k.split(".")[1]) if "." in k else -1))


# --------------------------------------------------------------------------- per-run numbers


def steps_to_loss(history: list[dict], target: float) -> int | None:
    """First step whose validation loss is at or below `target`; None if the run never got there."""
    for row in history:
        val = row.get("val_loss")
        if val is not None and val <= target:
            return int(row["step"])
    return None


def headline_metric(metrics: dict) -> tuple[str, float | None, float | None]:
    """(name, tuned value, no-prompt baseline value) of the task metric of a run, or (name, None, None)."""
    ev = metrics.get("eval", {}) if isinstance(metrics, dict) else {}
    tuned, base = ev.get("prompt", {}) or {}, ev.get("no_prompt", ev.get("baseline", {})) or {}
    for name in ("accuracy", "f1", "exact_match"):
        if name in tuned:
            return name, float(tuned[name]), (float(base[name]) if name in base else None)
    return "", None, None


def _eval_loss_columns(metrics: dict) -> dict:
    """Answer-token loss on the held-out evaluation items, of the run's kept prompt and of no prompt (NaN when the
    run was not evaluated): unlike the validation loss, the kept prompt was not selected on these items."""
    ev = metrics.get("eval", {}) if isinstance(metrics, dict) else {}
    def loss(kind: str) -> float:
        value = (ev.get(kind) or {}).get("answer_loss")
        return float(value) if value is not None else math.nan
    return {"eval_answer_loss": loss("prompt"), "eval_answer_loss_no_prompt": loss("no_prompt")}


def same_model(run: runs_mod.Run, lm) -> bool:  # noqa: ANN001
    """Whether the run was trained on the loaded model's weights (its vectors live in this model's space)."""
    return run.config.get("model_fingerprint") == lm.fingerprint


def prompt_reference(lm, name: str, run: runs_mod.Run) -> tuple[dv.ReferenceCloud, object]:  # noqa: ANN001
    """The cloud a prompt tensor is compared with, and its fitted Gaussian.

    "soft" -> the token embeddings; "deep.{l}" -> activations at layer l of the
    run's own dataset (a deep vector at block l is prepended to block l's input,
    which is activation layer l: layer 0 is the embedding output).
    """
    from core.priors import fitted_gaussian

    if name == "soft":
        return dv.token_reference(lm), fitted_gaussian(lm)
    if not name.startswith("deep."):
        raise ValueError(f"unknown prompt tensor {name!r}; a run holds 'soft' and, for deep prompts, 'deep.<layer>'")
    layer = int(name.split(".", 1)[1])
    dataset = run.config.get("dataset", "math")
    return dv.activation_reference(lm, dataset, layer), fitted_gaussian(lm, source=dataset, layer=layer)


def run_divergence(lm, run: runs_mod.Run, name: str = "soft") -> dv.DivergenceReport:  # noqa: ANN001
    """Divergence of a run's trained tensor `name` [n, d] from its reference, drift measured from step 0."""
    if not same_model(run, lm):
        raise ValueError(
            f"run {run.path.name} was trained on {run.config.get('model_fingerprint')!r}, not the loaded "
            f"{lm.fingerprint!r}: its vectors do not live in this model's space; load that model first"
        )
    if name not in run.prompt:
        raise ValueError(f"run {run.path.name} has no tensor {name!r}; it has {', '.join(run.prompt)}")
    ref, gauss = prompt_reference(lm, name, run)
    init = run.snapshots[name][0] if name in run.snapshots else None
    return dv.divergence(run.prompt[name], ref, init=init, gaussian=gauss)


def runs_table(
    lm,  # noqa: ANN001
    entries: Iterable[RunEntry],
    target_loss: float | str | None = "auto",
    tensor: str = "soft",
    progress: Callable[[float], None] | None = None,
    stored: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per run: run, origin, method, dataset, prior, lr, seed, steps (the budget), compute (the dtype the
    run trained in, run.json `compute_resolved`: a gallery built over sittings on several machines may mix them;
    None for runs from before it was recorded), steps_done, converged
    (bool: the plateau rule stopped it, `core.runs.run_converged`), stop_reason, initial and final val loss,
    best val loss, steps_to_loss (to `target_loss`; NaN when never reached; "auto": per method and dataset,
    the largest best loss of that group's runs, a loss every one of them reaches; None: not computed),
    kept_step (the step whose prompt the run kept: its best validation, or its last step), eval_answer_loss and
    eval_answer_loss_no_prompt (answer-token loss on the held-out evaluation items),
    target_loss, the task metric and its no-prompt baseline, and divergence of tensor `tensor` ("soft" by
    default: every run has one): collapsed_share (`core.analysis.divergence.collapsed`), within_nn_radius_share
    (the old Euclidean test, not collapse), median_nearest_cos, median_nearest_cos_centered,
    median_manifold_ratio, median_mahalanobis, mean_drift_l2, mean_drift_cos, and the same measures of the
    initial sample (init_collapsed_share, init_nearest_cos, init_manifold_ratio, init_mahalanobis), and the
    drift of `tensor` the run recorded (drift_rel_init: mean L2 drift over the initial norm; drift_rel_nn_gap:
    over the token nearest-neighbour gap; NaN for runs from before drift was recorded).
    Divergence columns are NaN for runs trained on other weights
    (column `same_model`). `stored`: a table this function wrote before (the committed artifacts' runs.csv);
    divergence columns of precomputed runs found in it are reused instead of recomputed."""
    entries = list(entries)
    reuse = {}
    if stored is not None and not stored.empty and "run" in stored and set(_ALL_DIV_COLUMNS) <= set(stored):
        cols = list(_ALL_DIV_COLUMNS)  # a table from before the collapse measure changed is recomputed
        reuse = {r["run"]: {c: r[c] for c in cols} for _, r in stored.iterrows()}
    rows = []
    for i, entry in enumerate(entries):
        run = runs_mod.load_run(entry.path)
        vals = [(h["step"], h["val_loss"]) for h in run.history if h.get("val_loss") is not None]
        metric, tuned, base = headline_metric(run.metrics)
        row = {
            "run": entry.info.name, "origin": entry.origin, "method": run.config.get("method"),
            "dataset": run.config.get("dataset"), "prior": run.config.get("prior"),
            "lr": run.config.get("lr"), "seed": run.config.get("seed"), "steps": run.config.get("steps"),
            "compute": run.config.get("compute_resolved"),
            "steps_done": run.info.get("steps_done", vals[-1][0] if vals else 0),
            "converged": runs_mod.run_converged(run.info), "stop_reason": run.info.get("stop_reason"),
            **_drift_columns(run.metrics, tensor),
            "initial_val_loss": vals[0][1] if vals else math.nan,
            "final_val_loss": vals[-1][1] if vals else math.nan,
            "best_val_loss": min(v for _, v in vals) if vals else math.nan,
            "kept_step": (run.info.get("kept") or {}).get("step", run.info.get("steps_done")),
            **_eval_loss_columns(run.metrics),
            "steps_to_loss": math.nan, "metric": metric, "metric_value": tuned, "metric_no_prompt": base,
            "same_model": same_model(run, lm), "path": str(entry.path),
        }
        row["target_loss"] = target_loss if isinstance(target_loss, int | float) else math.nan
        row["_history"] = run.history
        cached = reuse.get(entry.info.name) if entry.origin == "precomputed" and tensor == "soft" else None
        row.update(cached if cached is not None and row["same_model"] else _divergence_columns(lm, run, tensor))
        rows.append(row)
        if progress is not None:
            progress((i + 1) / len(entries))
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    if target_loss == "auto":
        groups = table.groupby(["method", "dataset"])["best_val_loss"].transform("max")
        table["target_loss"] = groups
    elif target_loss is not None and not isinstance(target_loss, int | float):
        raise ValueError(f"target_loss must be a number, 'auto' or None; got {target_loss!r}")
    if target_loss is not None:
        reached = [steps_to_loss(h, t) if not math.isnan(t) else None
                   for h, t in zip(table["_history"], table["target_loss"], strict=True)]
        table["steps_to_loss"] = [math.nan if r is None else r for r in reached]
    return table.drop(columns="_history")


_DIV_COLUMNS = ("collapsed_share", "within_nn_radius_share", "median_nearest_cos", "median_nearest_cos_centered",
                "median_manifold_ratio", "median_mahalanobis", "mean_drift_l2", "mean_drift_cos")
_INIT_COLUMNS = {"init_collapsed_share": "collapsed_share", "init_nearest_cos": "median_nearest_cos",
                 "init_manifold_ratio": "median_manifold_ratio", "init_mahalanobis": "median_mahalanobis"}
_ALL_DIV_COLUMNS = (*_DIV_COLUMNS, *_INIT_COLUMNS)


def _drift_columns(metrics: dict, tensor: str) -> dict:
    drift = {r["tensor"]: r for r in runs_mod.drift_rows(metrics)}.get(tensor, {})
    values = {"drift_rel_init": drift.get("relative_to_init_norm"),
              "drift_rel_nn_gap": drift.get("relative_to_token_nn_gap")}
    return {k: math.nan if v is None else float(v) for k, v in values.items()}


def _divergence_columns(lm, run: runs_mod.Run, tensor: str) -> dict:  # noqa: ANN001
    out = {c: math.nan for c in _ALL_DIV_COLUMNS}
    if not same_model(run, lm) or tensor not in run.prompt:
        return out
    ref, gauss = prompt_reference(lm, tensor, run)
    init = run.snapshots[tensor][0] if tensor in run.snapshots else None
    summary = dv.divergence(run.prompt[tensor], ref, init=init, gaussian=gauss, top_k=1).summary
    out.update({c: summary[c] for c in _DIV_COLUMNS})
    if init is not None:
        first = dv.divergence(init, ref, gaussian=gauss, top_k=1).summary
        out.update({col: first[key] for col, key in _INIT_COLUMNS.items()})
    return out


def common_target(table: pd.DataFrame) -> float:
    """A validation loss every run in `table` reaches: the largest of the runs' best losses."""
    best = table["best_val_loss"].dropna()
    if best.empty:
        raise ValueError("no run in the table has a validation loss; train a run first")
    return float(best.max())


# --------------------------------------------------------------------------- moved, still importable from here

# The claims, prompt transfer, loss curves and page views live in their own modules; these names stay
# importable from `core.analysis.runs_compare` (loaded on first use, so no import cycle).
_MOVED = {
    "prior_spread": "claims", "prior_significance": "claims", "divergence_vs_speed": "claims",
    "prompt_from_run": "transfer", "prompt_loss": "transfer", "transfer_matrix": "transfer",
    "distance_vs_transfer": "transfer", "loss_curves": "loss_curves",
    "math_c4_axis": "run_views", "axis_position": "run_views", "interpolation_positions": "run_views",
    "DivergenceView": "run_views", "divergence_view": "run_views", "InterpolationView": "run_views",
    "interpolation_view": "run_views", "save_interpolation_view": "run_views", "load_interpolation_view": "run_views",
}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 module attribute
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"core.analysis.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
