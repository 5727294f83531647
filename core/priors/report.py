"""What the Prior lab shows about a sample: per-vector measures and a 2-D view over the reference cloud.

    >>> table, summary = sample_report(lm, prior, x)   # x [n, d] from prior.sample(n)
    >>> view = prior_view(lm, prior, x)                 # view.frame: group, x, y, label, norm per point

Nearest-token read-out comes from `core.analysis.divergence.nearest_by_cosine`,
the projections from `core.analysis.projections` (PCA fitted on the reference
cloud only, so samples sit on the cloud's axes); nothing is recomputed here.
"""

from __future__ import annotations

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
               seed: int = 0, method: str = "pca"):  # noqa: ANN201 - core.analysis.projections.View
    """Samples [n, d] over the prior's reference cloud(s) in 2-D, as a `core.analysis.projections.View`
    (frame columns: group, row, x, y, inside, label, norm).

    method "pca": axes fitted on the reference cloud(s) only (massive-activation rows left out of
    the fit, as `project_groups` does), the samples projected onto them; "tsne": one joint t-SNE of a
    reference subsample and every sample. About `max_reference` reference points per cloud are drawn.
    """
    from core.analysis.projections import fit_pca, massive_rows, project_groups

    x = torch.as_tensor(samples, dtype=torch.float32).numpy()
    clouds = _clouds(lm, prior)
    groups = {name: vectors for name, vectors, _ in clouds} | {"sample": x}
    meta = {name: pd.DataFrame({"label": texts, "norm": np.linalg.norm(vectors, axis=1)})
            for name, vectors, texts in clouds}
    meta["sample"] = pd.DataFrame({"label": [f"vector {i}" for i in range(len(x))],
                                   "norm": np.linalg.norm(x, axis=1)})
    reference = clouds[0][0]
    if method == "pca" and len(clouds) > 1:  # several clouds (interpolation): axes of their union
        union = np.concatenate([v for _, v, _ in clouds])
        massive = massive_rows(union)
        reference = fit_pca(union[~massive] if (~massive).sum() >= 3 else union, seed=seed)
    per_cloud = max_reference if method == "pca" else min(max_reference, 1000)
    return project_groups(groups, meta=meta, method=method, reference=reference if method == "pca" else None,
                          max_points=per_cloud * len(clouds) + len(x), keep_groups=("sample",), seed=seed)
