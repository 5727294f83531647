"""Comparing trained runs: the run table, steps to a loss, the paper's claims, prompt transfer.

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

import numpy as np
import pandas as pd
import torch

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
    """Runs under every root (default: the user's runs, then the precomputed gallery), newest first per root."""
    out = []
    for origin, root in (roots or ORIGINS).items():
        out.extend(RunEntry(info, origin) for info in runs_mod.list_runs(root))
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
    """One row per run: run, origin, method, dataset, prior, lr, seed, steps, initial and final val loss,
    best val loss, steps_to_loss (to `target_loss`; NaN when never reached; "auto": per method and dataset,
    the largest best loss of that group's runs, a loss every one of them reaches; None: not computed),
    target_loss, the task metric and its no-prompt baseline, and divergence of tensor `tensor` ("soft" by
    default: every run has one): collapse_score, collapse_score_cos, median_nearest_cos, median_manifold_ratio,
    median_mahalanobis, mean_drift_l2, mean_drift_cos, and the same divergence of the initial sample
    (init_manifold_ratio, init_mahalanobis). Divergence columns are NaN for runs trained on other weights
    (column `same_model`). `stored`: a table this function wrote before (the committed artifacts' runs.csv);
    divergence columns of precomputed runs found in it are reused instead of recomputed."""
    entries = list(entries)
    reuse = {}
    if stored is not None and not stored.empty and "run" in stored and "collapse_score" in stored:
        cols = [c for c in (*_DIV_COLUMNS, "init_manifold_ratio", "init_mahalanobis") if c in stored]
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
            "initial_val_loss": vals[0][1] if vals else math.nan,
            "final_val_loss": vals[-1][1] if vals else math.nan,
            "best_val_loss": min(v for _, v in vals) if vals else math.nan,
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


_DIV_COLUMNS = ("collapse_score", "collapse_score_cos", "median_nearest_cos", "median_manifold_ratio",
                "median_mahalanobis", "mean_drift_l2", "mean_drift_cos")


def _divergence_columns(lm, run: runs_mod.Run, tensor: str) -> dict:  # noqa: ANN001
    out = {c: math.nan for c in _DIV_COLUMNS} | {"init_manifold_ratio": math.nan, "init_mahalanobis": math.nan}
    if not same_model(run, lm) or tensor not in run.prompt:
        return out
    ref, gauss = prompt_reference(lm, tensor, run)
    init = run.snapshots[tensor][0] if tensor in run.snapshots else None
    summary = dv.divergence(run.prompt[tensor], ref, init=init, gaussian=gauss, top_k=1).summary
    out.update({c: summary[c] for c in _DIV_COLUMNS})
    if init is not None:
        first = dv.divergence(init, ref, gaussian=gauss, top_k=1).summary
        out["init_manifold_ratio"] = first["median_manifold_ratio"]
        out["init_mahalanobis"] = first["median_mahalanobis"]
    return out


def common_target(table: pd.DataFrame) -> float:
    """A validation loss every run in `table` reaches: the largest of the runs' best losses."""
    best = table["best_val_loss"].dropna()
    if best.empty:
        raise ValueError("no run in the table has a validation loss; train a run first")
    return float(best.max())


def loss_curves(entries: Iterable[RunEntry]) -> pd.DataFrame:
    """Long table of every run's losses: run, origin, prior, step, kind ("train"/"validation"), loss."""
    rows = []
    for entry in entries:
        data = runs_mod.read_run_json(entry.path)
        prior = data.get("config", {}).get("prior")
        for h in data.get("history", []):
            for kind, key in (("train", "train_loss"), ("validation", "val_loss")):
                if h.get(key) is not None:
                    rows.append({"run": entry.info.name, "origin": entry.origin, "prior": prior,
                                 "step": h["step"], "kind": kind, "loss": h[key]})
    return pd.DataFrame(rows, columns=["run", "origin", "prior", "step", "kind", "loss"])


# --------------------------------------------------------------------------- the paper's claims


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


# --------------------------------------------------------------------------- prompt transfer


def prompt_from_run(run: runs_mod.Run, lm) -> torch.nn.Module:  # noqa: ANN001
    """The run's trained prompt as a `core.tuning` prompt module on `lm`'s device."""
    from core.tuning import build_prompt

    params = dict(run.config.get("prompt") or {})
    params.pop("num_layers", None)
    params.setdefault("n_tokens", int(run.config.get("n_tokens", 20)))
    prompt = build_prompt(run.config.get("method", "soft"), lm.hidden_size, lm.num_layers, **params)
    prompt.load_tensors(run.prompt)
    return prompt.to(lm.device).eval()


@torch.no_grad()
def prompt_loss(lm, prompt, examples: list, batch_size: int = 8, compute: str = "auto",  # noqa: ANN001
                max_length: int = 320) -> float:
    """Mean answer-token cross-entropy of `examples` with `prompt` prepended (None: no prompt), encoded as in
    training (`max_length` tokens of prompt + answer), so a run's own validation loss is reproduced."""
    from core.tuning import answer_loss, collate, compute_model, encode_examples
    from core.tuning.batches import fixed_batches

    model, autocast = compute_model(lm, compute)
    items = encode_examples(lm.tokenizer, examples, max_length)
    total, count = 0.0, 0
    for idx in fixed_batches(items, batch_size):
        batch = collate([items[i] for i in idx], lm.tokenizer.pad_token_id).to(lm.device)
        total += float(answer_loss(model, prompt, batch, autocast))
        count += batch.n_answer
    return total / max(count, 1)


def transfer_matrix(
    lm,  # noqa: ANN001
    run_paths: Iterable[str | Path],
    datasets: Iterable[str] = ("math", "squad"),
    n: int = 32,
    seed: int = 1234,
    compute: str = "auto",
    max_length: int = 320,
    progress: Callable[[float], None] | None = None,
) -> pd.DataFrame:
    """Every run's prompt scored on every dataset's held-out examples (validation split, `n` examples, `seed`).

    Returns a long table: run, path, trained_on, prior, evaluated_on, loss, no_prompt_loss,
    own_loss (the loss of the prompt trained on `evaluated_on` with the same prior, method and seed when one
    is among the runs), gain = no_prompt_loss - loss. Runs trained on other weights are refused.
    """
    from core.data import load_examples

    paths = [Path(p) for p in run_paths]
    datasets = list(datasets)
    if not paths:
        raise ValueError("no runs given: train some or run `python -m core precompute`")
    loaded = [runs_mod.load_run(p) for p in paths]
    for run in loaded:
        if not same_model(run, lm):
            raise ValueError(f"run {run.path.name} was trained on other weights ({run.config.get('model_fingerprint')})"
                             f"; transfer needs runs of the loaded model {lm.fingerprint}")
    examples = {d: load_examples(d, split="validation", n=n, seed=seed) for d in datasets}
    baseline = {d: prompt_loss(lm, None, examples[d], compute=compute, max_length=max_length) for d in datasets}
    rows, total, done = [], len(loaded) * len(datasets), 0
    for run in loaded:
        prompt = prompt_from_run(run, lm)
        for d in datasets:
            loss = prompt_loss(lm, prompt, examples[d], compute=compute, max_length=max_length)
            rows.append({"run": run.path.name, "path": str(run.path), "trained_on": run.config.get("dataset"),
                         "method": run.config.get("method"), "prior": run.config.get("prior"),
                         "seed": run.config.get("seed"), "evaluated_on": d, "loss": loss,
                         "no_prompt_loss": baseline[d], "gain": baseline[d] - loss})
            done += 1
            if progress is not None:
                progress(done / total)
    return pd.DataFrame(rows)


def distance_vs_transfer(transfer: pd.DataFrame, tensor: str = "soft",
                         base: Path = ARTIFACTS_DIR) -> tuple[pd.DataFrame, dict]:
    """Prompt distance against transfer, over ordered pairs (A, B) of runs trained on different tasks.

    For each pair: distance = Frobenius norm of P_A - P_B (tensor `tensor`, [n, d]), and
    transfer = share of B's own gain on B's task that A's prompt recovers:
    (no_prompt - loss of A on task B) / (no_prompt - loss of B on task B); 1 = as good as B's own prompt.
    Relative run paths (as stored in the committed artifacts) are read under `base`.
    Returns (pairs table, {"n", "pearson", "spearman", "p_value", "statement"}).
    """
    from scipy.stats import pearsonr, spearmanr

    needed = {"path", "trained_on", "evaluated_on", "loss", "no_prompt_loss"}
    if not needed <= set(transfer.columns):
        raise ValueError(f"transfer table lacks columns {sorted(needed - set(transfer.columns))}; "
                         "build it with transfer_matrix()")
    runs_by_path = {p: runs_mod.load_run(Path(p) if Path(p).is_absolute() else Path(base) / p)
                    for p in transfer["path"].unique()}
    lookup = transfer.set_index(["path", "evaluated_on"])
    rows = []
    for a, run_a in runs_by_path.items():
        for b, run_b in runs_by_path.items():
            task_b = run_b.config.get("dataset")
            if a == b or run_a.config.get("dataset") == task_b or (a, task_b) not in lookup.index:
                continue
            if tensor not in run_a.prompt or tensor not in run_b.prompt:
                continue
            own = lookup.loc[(b, task_b)]
            other = lookup.loc[(a, task_b)]
            own_gain = float(own["no_prompt_loss"] - own["loss"])
            if own_gain <= 0:
                continue  # B's prompt did not help on its own task: nothing to recover
            rows.append({
                "prompt_of": run_a.path.name, "evaluated_with_task_of": run_b.path.name, "task": task_b,
                "distance": float(torch.linalg.matrix_norm(run_a.prompt[tensor] - run_b.prompt[tensor])),
                "transfer": float(other["no_prompt_loss"] - other["loss"]) / own_gain,
                "prior_a": run_a.config.get("prior"), "prior_b": run_b.config.get("prior"),
            })
    pairs = pd.DataFrame(rows, columns=["prompt_of", "evaluated_with_task_of", "task", "distance", "transfer",
                                        "prior_a", "prior_b"])
    stats = {"n": len(pairs), "pearson": math.nan, "spearman": math.nan, "p_value": math.nan}
    if len(pairs) < 3 or pairs["distance"].nunique() < 2 or pairs["transfer"].nunique() < 2:
        stats["statement"] = (f"Only {len(pairs)} cross-task pairs: need 3 or more (runs on both tasks whose "
                              "prompts beat no prompt on their own task).")
        return pairs, stats
    stats["pearson"] = float(pearsonr(pairs["distance"], pairs["transfer"])[0])
    rho, p = spearmanr(pairs["distance"], pairs["transfer"])
    stats["spearman"], stats["p_value"] = float(rho), float(p)
    closer = "transfer better" if rho < 0 else "transfer worse"
    stats["statement"] = (f"Over {len(pairs)} cross-task pairs, closer prompts {closer} (Spearman rho={rho:.2f}, "
                          f"p={p:.3f}; Pearson r={stats['pearson']:.2f}). The cs224u write-up found closer "
                          "prompts transfer better, i.e. a negative correlation here.")
    return pairs, stats


# --------------------------------------------------------------------------- the MATH-C4 axis


def math_c4_axis(lm, layer: int, n_docs: int = 64, data_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(C4 mean [d], MATH mean [d]) of the activations at `layer`: the same Gaussian fits the interpolation
    prior samples between (core.priors.fitted_gaussian, cached)."""
    from core.priors import fitted_gaussian

    c4 = fitted_gaussian(lm, source="c4", layer=layer, n_docs=n_docs, data_seed=data_seed).mean
    maths = fitted_gaussian(lm, source="math", layer=layer, n_docs=n_docs, data_seed=data_seed).mean
    return c4.numpy().astype(np.float64), maths.numpy().astype(np.float64)


def axis_position(x, axis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:  # noqa: ANN001
    """Where each row of x [m, d] projects on the segment from axis[0] (0) to axis[1] (1): [m]."""
    start, end = axis
    x = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    direction = end - start
    length2 = float(direction @ direction)
    if length2 == 0:
        raise ValueError("the two cluster means coincide: there is no axis to project on")
    return (x - start) @ direction / length2


def interpolation_positions(lm, run_paths: Iterable[str | Path]) -> pd.DataFrame:  # noqa: ANN001
    """Prior (step 0) and posterior (final) position of every prompt vector on the MATH-C4 axis of its layer.

    Each tensor "deep.{l}" is projected on the axis of activation layer l and "soft" on layer 0
    (0 = the C4 mean, 1 = the MATH mean). Long table: run, prior, seed, tensor, layer, vector,
    kind ("prior" or "posterior"), position.
    """
    rows = []
    axes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for path in run_paths:
        run = runs_mod.load_run(path)
        if not same_model(run, lm):
            raise ValueError(f"run {run.path.name} was trained on other weights ({run.config.get('model_fingerprint')})"
                             f"; its vectors cannot be placed among the loaded model's activations")
        for name, final in run.prompt.items():
            layer = 0 if name == "soft" else int(name.split(".", 1)[1])
            if layer not in axes:
                axes[layer] = math_c4_axis(lm, layer)
            kinds = [("posterior", final)]
            if name in run.snapshots:
                kinds.insert(0, ("prior", run.snapshots[name][0]))
            for kind, tensor in kinds:
                for i, pos in enumerate(axis_position(tensor, axes[layer])):
                    rows.append({"run": run.path.name, "prior": run.config.get("prior"),
                                 "seed": run.config.get("seed"), "tensor": name, "layer": layer, "vector": i,
                                 "kind": kind, "position": float(pos)})
    return pd.DataFrame(rows, columns=["run", "prior", "seed", "tensor", "layer", "vector", "kind", "position"])


# --------------------------------------------------------------------------- views for the pages


@dataclass
class DivergenceView:
    """What the Divergence page draws, for one prompt tensor of several runs, on the reference's PCA axes.

    cloud: x, y, text of a subsample of the reference cloud.
    paths: run, step, vector, x, y, nearest (token text), nearest_cos for every snapshot of every vector.
    per_vector: the final prompt's per-vector divergence table, with a run column.
    by_step: run, step and the aggregate measures of every snapshot (`snapshot_divergence`).
    summary: run -> final aggregate measures. x_label, y_label: PCA axis names. note: outliers and reference.
    """

    cloud: pd.DataFrame
    paths: pd.DataFrame
    per_vector: pd.DataFrame
    by_step: pd.DataFrame
    summary: dict
    x_label: str
    y_label: str
    note: str
    reference: str

    def at_step(self, step: int) -> pd.DataFrame:
        """Each run's vectors at its last snapshot at or before `step` (runs may have different lengths)."""
        upto = self.paths[self.paths["step"] <= step]
        last = upto.groupby("run")["step"].transform("max")
        return upto[upto["step"] == last]

    def cloud_domain(self, pad: float = 0.05) -> tuple[list[float], list[float]]:
        """x and y ranges [lo, hi] of the reference cloud shown, padded: to zoom the view onto the cloud."""
        out = []
        for col in ("x", "y"):
            lo, hi = float(self.cloud[col].min()), float(self.cloud[col].max())
            out.append([lo - pad * (hi - lo), hi + pad * (hi - lo)])
        return out[0], out[1]

    def outside_cloud(self, step: int) -> int:
        """How many vectors at `step` (see at_step) fall outside the cloud's padded range."""
        (x0, x1), (y0, y1) = self.cloud_domain()
        now = self.at_step(step)
        return int((~now["x"].between(x0, x1) | ~now["y"].between(y0, y1)).sum())


def divergence_view(
    lm,  # noqa: ANN001
    run_paths: Iterable[str | Path],
    tensor: str = "soft",
    max_points: int = 3000,
    seed: int = 0,
    with_mahalanobis: bool = True,
) -> DivergenceView:
    """Prior sample, path and trained prompt of each run over the reference cloud, with every measure.

    The PCA is fitted on the reference cloud only (token embeddings for "soft", the first run's dataset
    activations at layer l for "deep.{l}"), so every run and step sits on the same axes.
    """
    from core.analysis.projections import fit_pca, outlier_note, robust_mask, subsample_indices

    loaded = [runs_mod.load_run(p) for p in run_paths]
    if not loaded:
        raise ValueError("choose at least one run")
    for run in loaded:
        if not same_model(run, lm):
            raise ValueError(f"run {run.path.name} was trained on other weights ({run.config.get('model_fingerprint')})"
                             f"; load that model to view it")
        if tensor not in run.snapshots:
            raise ValueError(f"run {run.path.name} has no snapshots of {tensor!r}; it has {', '.join(run.snapshots)}")
    ref, gauss = prompt_reference(lm, tensor, loaded[0])
    gauss = gauss if with_mahalanobis else None
    proj = fit_pca(ref.vectors, seed=seed)
    index = subsample_indices(len(ref), max_points, seed=seed)
    xy = proj.transform(ref.vectors[index])
    cloud = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                          "text": [repr(ref.texts[i]) for i in index] if ref.texts else index.astype(str)})
    paths, per_vector, by_step, summary = [], [], [], {}
    for run in loaded:
        name = run.path.name
        snaps = run.snapshots[tensor].float().numpy()  # [S, n, d]
        s, n, d = snaps.shape
        flat = snaps.reshape(s * n, d)
        pxy = proj.transform(flat)
        ids, cos = dv.nearest_by_cosine(flat, ref, top_k=1)
        paths.append(pd.DataFrame({
            "run": name, "step": np.repeat(run.snapshot_steps, n), "vector": np.tile(np.arange(n), s),
            "x": pxy[:, 0], "y": pxy[:, 1],
            "nearest": [repr(ref.texts[i]) if ref.texts else str(i) for i in ids[:, 0]], "nearest_cos": cos[:, 0]}))
        report = dv.divergence(run.prompt[tensor], ref, init=snaps[0], gaussian=gauss)
        per_vector.append(report.per_vector.assign(run=name))
        summary[name] = report.summary
        by_step.append(dv.snapshot_divergence(snaps, run.snapshot_steps, ref, gaussian=gauss).assign(run=name))
    note = (f"PCA fitted on {ref.label}; {len(index):,} of {len(ref):,} reference points drawn. "
            + outlier_note(robust_mask(xy), "reference points shown"))
    return DivergenceView(cloud, pd.concat(paths, ignore_index=True), pd.concat(per_vector, ignore_index=True),
                          pd.concat(by_step, ignore_index=True), summary, *proj.axis_labels()[:2], note,
                          ref.label)


@dataclass
class InterpolationView:
    """The Interpolation page: activations of C4, SQuAD and MATH at one layer with prompts over them.

    points: group ("c4", "squad", "math", "interpolation prior sample", "<run> prior", "<run> trained"),
    kind ("data", "prior sample", "prior", "trained"), x, y, text, position (on the MATH-C4 axis).
    positions: run, kind ("prior"/"posterior"), vector, position: trained deep prompts at this layer and the
    fresh interpolation-prior sample (run "interpolation prior sample", kind "prior").
    """

    points: pd.DataFrame
    positions: pd.DataFrame
    x_label: str
    y_label: str
    note: str


def interpolation_view(
    lm,  # noqa: ANN001
    layer: int,
    run_paths: Iterable[str | Path] = (),
    n_docs: int = 64,
    n_prior: int = 200,
    max_points: int = 1500,
    seed: int = 0,
) -> InterpolationView:
    """C4 / SQuAD / MATH activations at `layer` (first token and padding excluded) on PCA axes fitted on the
    three together, with `n_prior` samples of the MATH-C4 interpolation prior at that layer and the prior
    and trained tensors of runs that hold a prompt at this layer ("deep.{layer}", or "soft" for layer 0)."""
    from core.activations import dataset_activations
    from core.analysis.projections import fit_pca, outlier_note, robust_mask, subsample_indices
    from core.priors import make_prior
    from core.priors.fit import MAX_LENGTH

    tensor = "soft" if layer == 0 else f"deep.{layer}"
    clouds, texts = {}, {}
    for d in ("c4", "squad", "math"):
        # n_docs and MAX_LENGTH as the priors' fits use, so the activations cache is shared with them
        acts = dataset_activations(lm, d, [layer], n=n_docs, seed=0, max_length=MAX_LENGTH)
        clouds[d], texts[d] = acts.layer(layer), [repr(str(t)) for t in acts.token_texts]
    proj = fit_pca(np.concatenate(list(clouds.values())), seed=seed)
    axis = math_c4_axis(lm, layer, n_docs=n_docs)
    frames = []
    for d, cloud in clouds.items():
        idx = subsample_indices(len(cloud), max_points, seed=seed)
        frames.append(_points(proj, axis, cloud[idx], d, "data", [texts[d][i] for i in idx]))
    prior = make_prior("interpolation", lm=lm, source_a="math", source_b="c4", layer=layer, n_docs=n_docs)
    sample = prior.sample(n_prior, generator=torch.Generator().manual_seed(seed)).numpy()
    frames.append(_points(proj, axis, sample, "interpolation prior sample", "prior sample"))
    positions = [pd.DataFrame({"run": "interpolation prior sample", "kind": "prior", "vector": np.arange(n_prior),
                               "position": axis_position(sample, axis)})]
    for path in run_paths:
        run = runs_mod.load_run(path)
        if not same_model(run, lm) or tensor not in run.prompt:
            continue
        name = run.path.name
        parts = [("trained", "posterior", run.prompt[tensor].numpy())]
        if tensor in run.snapshots:
            parts.insert(0, ("prior", "prior", run.snapshots[tensor][0].numpy()))
        for kind, pos_kind, x in parts:
            frames.append(_points(proj, axis, x, f"{name} {kind}", kind))
            positions.append(pd.DataFrame({"run": name, "kind": pos_kind, "vector": np.arange(len(x)),
                                           "position": axis_position(x, axis)}))
    points = pd.concat(frames, ignore_index=True)
    data_xy = points.loc[points["kind"] == "data", ["x", "y"]].to_numpy()
    note = (f"PCA fitted on the three datasets' activations at layer {layer} ({n_docs} documents each, first token "
            "and padding excluded). " + outlier_note(robust_mask(data_xy), "activation points shown"))
    return InterpolationView(points, pd.concat(positions, ignore_index=True), *proj.axis_labels()[:2], note)


def _points(proj, axis, x: np.ndarray, group: str, kind: str, text: list[str] | None = None) -> pd.DataFrame:  # noqa: ANN001
    xy = proj.transform(x)
    return pd.DataFrame({"group": group, "kind": kind, "x": xy[:, 0], "y": xy[:, 1],
                         "text": text if text is not None else [f"vector {i}" for i in range(len(x))],
                         "position": axis_position(x, axis)})


def save_interpolation_view(store, lm, layer: int, run_paths: Iterable[str | Path]) -> InterpolationView:  # noqa: ANN001
    """Build `interpolation_view` and write it into `store` (core.artifacts.ArtifactStore) for the page to open at
    once: tables/interpolation_view_l{layer}.csv (points) and .json (axes, note, runs, model fingerprint)."""
    paths = list(run_paths)
    view = interpolation_view(lm, layer, paths)
    store.save_table(f"interpolation_view_l{layer}", view.points)
    store.save_table(f"interpolation_view_positions_l{layer}", view.positions)
    store.save_json(f"interpolation_view_l{layer}", {
        "x_label": view.x_label, "y_label": view.y_label, "note": view.note, "layer": layer,
        "runs": [Path(p).name for p in paths], "model_fingerprint": lm.fingerprint})
    return view


def load_interpolation_view(store, fingerprint: str, layer: int, run_names: Iterable[str]) -> InterpolationView | None:  # noqa: ANN001
    """The stored view for `layer` restricted to `run_names`, or None when there is none for this model or it
    lacks one of the runs (the page then computes live)."""
    meta = store.load_json(f"interpolation_view_l{layer}")
    names = set(run_names)
    if not meta or meta.get("model_fingerprint") != fingerprint or not names <= set(meta.get("runs", [])):
        return None
    points = store.load_table(f"interpolation_view_l{layer}")
    positions = store.load_table(f"interpolation_view_positions_l{layer}")
    if points is None or positions is None:
        return None
    run_of = points["group"].str.rsplit(" ", n=1).str[0]
    keep = points["kind"].isin(["data", "prior sample"]) | run_of.isin(names)
    positions = positions[(positions["run"] == "interpolation prior sample") | positions["run"].isin(names)]
    return InterpolationView(points[keep].reset_index(drop=True), positions.reset_index(drop=True),
                             meta["x_label"], meta["y_label"], meta["note"] + " (precomputed)")
