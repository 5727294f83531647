"""What the Prior lab shows about a sample: per-vector measures and a 2-D view over the reference cloud.

    >>> table, summary = sample_report(lm, prior, x)   # x [n, d] from prior.sample(n)
    >>> view = prior_view(lm, prior, x)                 # view.points: x, y, group, label per point

Nearest-token read-out comes from `core.analysis.divergence.nearest_by_cosine`,
the projections from `core.analysis.projections` (PCA fitted on the reference
cloud only, so samples sit on the cloud's axes); nothing is recomputed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.models import LoadedModel
from core.priors.base import Prior, resolve_layer
from core.priors.fit import FittedGaussian, fitted_gaussian

_TOKEN_REFS: dict[str, object] = {}  # fingerprint -> divergence.ReferenceCloud of the vocabulary


def token_cloud(lm: LoadedModel):  # noqa: ANN201 - core.analysis.divergence.ReferenceCloud
    """The vocabulary as a divergence ReferenceCloud [V, d], built once per model (token texts decode in ~0.4 s)."""
    from core.analysis.divergence import token_reference

    if lm.fingerprint not in _TOKEN_REFS:
        _TOKEN_REFS.clear()  # one model at a time: the matrix is 100+ MB
        _TOKEN_REFS[lm.fingerprint] = token_reference(lm)
    return _TOKEN_REFS[lm.fingerprint]


def reference_specs(prior: Prior) -> list[tuple[str, int | None]]:
    """The (source, layer) clouds a prior lives over: its fitted cloud(s), else the token embeddings."""
    c = prior.config
    if getattr(prior, "custom_reference", False):
        return []
    if hasattr(c, "source_a"):  # interpolation: both clouds
        return [(s, None if s == "tokens" else resolve_layer(s, c.layer, prior.lm)) for s in (c.source_a, c.source_b)]
    if hasattr(c, "source"):
        return [(c.source, resolve_layer(c.source, c.layer, prior.lm))]
    return [("tokens", None)]


def reference_fits(lm: LoadedModel, prior: Prior) -> dict[str, FittedGaussian]:
    """Fits used for Mahalanobis distances, by cloud name: the prior's own fits where it has them."""
    fits = {}
    for attr in ("fit", "fit_a", "fit_b"):
        if isinstance(getattr(prior, attr, None), FittedGaussian):
            fits[getattr(prior, attr).label or attr] = getattr(prior, attr)
    if not fits:
        c = prior.config
        for source, layer in reference_specs(prior):
            fit = fitted_gaussian(lm, source, layer, getattr(c, "n_docs", 64), getattr(c, "data_seed", 0))
            fits[fit.label] = fit
    return fits


def sample_report(lm: LoadedModel, prior: Prior, samples: torch.Tensor, top_k: int = 3) -> tuple[pd.DataFrame, dict]:
    """Per-vector measures of samples [n, d] and their medians.

    Columns: vector, norm, norm_ratio (over the vocabulary's median norm), nearest
    (token), nearest_cos, top_tokens, and one `mahalanobis` column per fitted
    cloud (`mahalanobis` alone when there is one). Summary: medians, the
    reference clouds' own median Mahalanobis distance (the scale: about sqrt(d)),
    and the sampler's acceptance rate where it has one.
    """
    from core.analysis.divergence import nearest_by_cosine

    x = torch.as_tensor(samples, dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != lm.hidden_size:
        raise ValueError(f"samples must be [n, {lm.hidden_size}] for {lm.name}; got {tuple(x.shape)}")
    ref = token_cloud(lm)
    ids, cos = nearest_by_cosine(x, ref, top_k=top_k)  # [n, top_k] each
    vocab_norm = float(np.median(np.linalg.norm(ref.vectors, axis=1)))
    norms = x.double().norm(dim=1).numpy()
    table = pd.DataFrame({
        "vector": np.arange(len(x)),
        "norm": norms,
        "norm_ratio": norms / vocab_norm,
        "nearest": [ref.texts[i] for i in ids[:, 0]],
        "nearest_cos": cos[:, 0],
        "top_tokens": [" | ".join(f"{ref.texts[i]!r} ({c:.2f})" for i, c in zip(r, cr, strict=True))
                       for r, cr in zip(ids, cos, strict=True)],
    })
    fits = reference_fits(lm, prior)
    summary = {
        "n": len(x),
        "median_nearest_cos": float(np.median(cos[:, 0])),
        "median_norm_ratio": float(np.median(table["norm_ratio"])),
        "vocab_median_norm": vocab_norm,
    }
    for i, (label, fit) in enumerate(fits.items()):
        col = "mahalanobis" if len(fits) == 1 else f"mahalanobis_{'ab'[i] if i < 2 else i}"
        table[col] = fit.mahalanobis(x).numpy()
        summary[f"median_{col}"] = float(np.median(table[col]))
        summary[f"{col}_fit"] = label
    if "acceptance_rate" in prior.last_stats:
        summary["acceptance_rate"] = prior.last_stats["acceptance_rate"]
        summary["candidates"] = prior.last_stats["candidates"]
    return table, summary


@dataclass
class PriorView:
    """Points for a 2-D chart: reference cloud(s) and the sample on the reference's PCA axes.

    points: DataFrame with x, y, group ("sample" or the cloud's name), label (token text or
    vector index), norm; axis_labels: two strings; note: outlier accounting for the view.
    """

    points: pd.DataFrame
    axis_labels: list[str]
    note: str


def _clouds(lm: LoadedModel, prior: Prior) -> list[tuple[str, np.ndarray, list[str]]]:
    from core.analysis.divergence import activation_reference

    c = prior.config
    out = []
    for source, layer in reference_specs(prior) or [("tokens", None)]:
        if source == "tokens":
            ref = token_cloud(lm)
        else:
            ref = activation_reference(lm, source, layer, n=getattr(c, "n_docs", 64), seed=getattr(c, "data_seed", 0))
        name = "token embeddings" if source == "tokens" else f"{source} activations, layer {layer}"
        out.append((name, ref.vectors, ref.texts or [""] * len(ref.vectors)))
    return out


def prior_view(lm: LoadedModel, prior: Prior, samples: torch.Tensor, max_reference: int = 3000,
               seed: int = 0, method: str = "pca") -> PriorView:
    """Samples [n, d] over the prior's reference cloud(s) in 2-D.

    method "pca": axes fitted on the whole reference (samples projected onto them);
    "tsne": one joint t-SNE of a reference subsample plus every sample.
    At most `max_reference` points per cloud are drawn (seeded subsample).
    """
    from core.analysis.projections import fit_pca, outlier_note, robust_mask, subsample_indices, tsne

    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne'; got {method!r}")
    x = torch.as_tensor(samples, dtype=torch.float32).numpy()
    clouds = _clouds(lm, prior)
    parts, groups, labels = [], [], []
    for name, vectors, texts in clouds:
        idx = subsample_indices(len(vectors), max_reference, seed=seed)
        parts.append(vectors[idx])
        groups += [name] * len(idx)
        labels += [texts[i] for i in idx]
    parts.append(x)
    groups += ["sample"] * len(x)
    labels += [f"vector {i}" for i in range(len(x))]
    points = np.concatenate(parts)
    if method == "pca":
        proj = fit_pca(np.concatenate([v for _, v, _ in clouds]), seed=seed)
        xy, axes = proj.transform(points), proj.axis_labels()
    else:
        keep = np.arange(len(points) - len(x), len(points))
        res = tsne(points, max_points=min(len(points), 5000), seed=seed, keep=keep)
        xy = np.full((len(points), 2), np.nan, dtype=np.float32)
        xy[res.index] = res.coords
        axes = ["t-SNE 1", "t-SNE 2"]
    frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "group": groups, "label": labels,
                          "norm": np.linalg.norm(points, axis=1)}).dropna(subset=["x"])
    ref_rows = frame["group"] != "sample"
    note = outlier_note(robust_mask(frame.loc[ref_rows, ["x", "y"]].to_numpy()), "reference points")
    return PriorView(frame.reset_index(drop=True), axes, note)
