"""What the Divergence and Interpolation pages draw from stored runs, and the MATH-C4 axis they share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core import runs as runs_mod
from core.analysis import divergence as dv
from core.analysis.runs_compare import prompt_reference, same_model


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
    baseline: run, measure, low, high, mean, draws: each measure over fresh draws of the run's prior (the
    band an untrained prompt falls in; empty where the prior could not be rebuilt, see baseline_note).
    settling: run and `core.analysis.divergence.readout_settling` per vector (when the top-1 read-out settles).
    settled: run, step, settled_share (share of vectors whose top-1 read-out no longer changes after step).
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
    baseline: pd.DataFrame = field(default_factory=pd.DataFrame)
    settling: pd.DataFrame = field(default_factory=pd.DataFrame)
    settled: pd.DataFrame = field(default_factory=pd.DataFrame)
    baseline_note: str = ""

    def step0(self) -> pd.DataFrame:
        """Each run's aggregate measures at its first snapshot (the prior sample) beside the final ones:
        columns run, measure, step0, final."""
        rows = []
        for run, group in self.by_step.groupby("run"):
            first, last = group.sort_values("step").iloc[0], group.sort_values("step").iloc[-1]
            rows += [{"run": run, "measure": m, "step0": float(first[m]), "final": float(last[m])}
                     for m in dv.TRACKED]
        return pd.DataFrame(rows, columns=["run", "measure", "step0", "final"])

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
    baseline_draws: int = 8,
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
    settling, settled, baseline, notes = [], [], [], []
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
        settle = dv.readout_settling(snaps, run.snapshot_steps, ref)
        settling.append(settle.assign(run=name))
        settled.append(dv.settled_share(settle, run.snapshot_steps).assign(run=name))
        band, why = prior_baseline(lm, run, tensor, ref, gauss, n=n, draws=baseline_draws)
        baseline.append(band.assign(run=name))
        if why:
            notes.append(f"{name}: {why}")
    note = (f"PCA fitted on {ref.label}; {len(index):,} of {len(ref):,} reference points drawn. "
            + outlier_note(robust_mask(xy), "reference points shown"))
    return DivergenceView(cloud, pd.concat(paths, ignore_index=True), pd.concat(per_vector, ignore_index=True),
                          pd.concat(by_step, ignore_index=True), summary, *proj.axis_labels()[:2], note,
                          ref.label, pd.concat(baseline, ignore_index=True), pd.concat(settling, ignore_index=True),
                          pd.concat(settled, ignore_index=True), " ".join(notes))


def prior_draws(lm, run: runs_mod.Run, tensor: str, n: int, draws: int = 8, seed: int = 10_000) -> np.ndarray:  # noqa: ANN001
    """`draws` fresh samples [draws, n, d] of the prior run `run` drew tensor `tensor` from (its recorded
    prior and parameters; a per-layer prior at that tensor's layer), with seeds seed, seed + 1, ...
    Raises ValueError when the run's prior cannot be rebuilt (e.g. a caller-given initial sample)."""
    from core.priors import make_prior

    config = run.config
    name, params = config.get("prior"), dict(config.get("prior_params") or {})
    if not name or name == "custom":
        raise ValueError(f"run {run.path.name} records no prior to draw from")
    for recorded in ("name", "dim"):  # the recorded description, not options
        params.pop(recorded, None)
    layers = config.get("deep_prior_layers") or {}
    if tensor in layers:
        params["layer"] = int(layers[tensor])
    prior = make_prior(name, lm=lm, **params)
    return np.stack([prior.sample(n, generator=torch.Generator().manual_seed(seed + i)).float().numpy()
                     for i in range(draws)])


def prior_baseline(lm, run: runs_mod.Run, tensor: str, ref: dv.ReferenceCloud, gaussian=None, n: int = 20,  # noqa: ANN001
                   draws: int = 8) -> tuple[pd.DataFrame, str]:
    """Every tracked measure over fresh draws of the run's prior: (table measure, low, high, mean, draws; a note
    saying why it is empty, or ""). An untrained prompt's values fall in [low, high]."""
    columns = ["measure", "low", "high", "mean", "draws"]
    if draws < 1:
        return pd.DataFrame(columns=columns), ""
    try:
        sample = prior_draws(lm, run, tensor, n, draws)
    except (ValueError, RuntimeError, OSError) as err:
        return pd.DataFrame(columns=columns), f"no prior baseline ({err})"
    frame = dv.snapshot_divergence(sample, list(range(draws)), ref, gaussian=gaussian)
    return pd.DataFrame([{"measure": m, "low": float(frame[m].min()), "high": float(frame[m].max()),
                          "mean": float(frame[m].mean()), "draws": draws}
                         for m in dv.TRACKED if not m.startswith("mean_drift") and frame[m].notna().all()],
                        columns=columns), ""


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
