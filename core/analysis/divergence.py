"""Divergence and collapse measures of prompt vectors against a reference cloud.

A *reference cloud* is what a prompt vector is compared with: the token-embedding
matrix for soft prompts ([V, d], V = 49,152 on SmolLM2) or one layer's dataset
activations for deep prompts. Every measure is per prompt vector, then
aggregated:

- nearest reference point by cosine, its similarity, and the top-k read-out
  (token texts), as in the cs224u soft-prompt interpretation;
- distance to the manifold: the mean Euclidean distance to the k nearest
  reference points, divided by the median of the same quantity for the
  reference points themselves (1 = as close as a typical token is to its
  neighbours; 10 = ten times further out);
- Mahalanobis distance under the fitted Gaussian of the cloud (the fit of
  `core.priors.fitted_gaussian`, passed in; never refitted here);
- norm relative to the median norm of the reference points;
- drift from the initial sample: L2 distance and cosine distance (1 - cos);
- collapse, in the sense of Lester et al. (2021) section 7 (`collapsed`): a vector
  has collapsed onto the cloud when (a) the cosine to its most similar reference
  point is at least the cloud's own median nearest-neighbour cosine (0.79 for
  SmolLM2's tokens), and (b) its norm is within a factor of 2 of that point's norm.
  A short vector near the origin fails (b) whatever its direction; a vector
  pointing nowhere in particular (an N(0, 0.02^2) draw: cosine 0.15) fails (a);
  the vocabulary's mean vector (cosine 0.89 to its nearest token, from the
  shared mean direction, but 0.44 of its norm) fails (b). The share of
  collapsed vectors is `collapsed_share`;
- centered cosine: the nearest cosine after removing the cloud's mean from both
  sides, blind to the shared mean direction that inflates plain cosines;
- within the nearest-neighbour radius (`within_nn_radius`, formerly the
  Euclidean "collapse score"): closer to some reference point than that point's
  own nearest neighbour is. It does NOT measure collapse: a short vector near the
  cloud's centre passes it too (the smallest token norm on SmolLM2, 1.8, is below
  the median nearest-neighbour distance, 2.0, so an untrained N(0, 0.02^2) sample
  scores 1.0). Kept, labelled with that caveat, for comparison with old tables.

Mahalanobis distances in d dimensions concentrate near sqrt(d) (24 at d=576) for
points of the fitted Gaussian itself: that shell is where typical data sits, and
a distance far below it is atypical too, not "more on the data".

The reference's own k-NN distances cost a V x V pass (about two minutes for
49k tokens on 2 cores); they are computed once per cloud and kept on disk under
`cache_subdir("divergence")`.

    >>> ref = token_reference(lm)
    >>> report = divergence(prompt, ref, init=prompt0, gaussian=fitted_gaussian(lm))
    >>> report.summary["collapsed_share"], report.per_vector[["nearest", "nearest_cos", "collapsed"]]
    >>> collapsed(prompt, ref)           # np.ndarray[bool] [n]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.paths import cache_subdir

DEFAULT_K = 10
TOP_K = 5
# Rows of the reference compared at once: chunk x V float32 distances stay near 100 MB for V = 49k.
_CHUNK_ELEMENTS = 25_000_000


@dataclass
class ReferenceCloud:
    """Points a prompt is compared with.

    vectors: [V, d] float32 (token embeddings, or activations at one layer).
    key: a string that identifies the cloud (model fingerprint + what it is); it keys the disk cache.
    texts: optional label of each row (token text), used by the read-out.
    ids: optional token id of each row.
    label: a short description for the UI.
    """

    vectors: np.ndarray
    key: str
    texts: list[str] | None = None
    ids: np.ndarray | None = None
    label: str = ""
    _stats: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(np.asarray(self.vectors, dtype=np.float32))
        if self.vectors.ndim != 2 or self.vectors.shape[0] < 2:
            raise ValueError(
                f"a reference cloud needs a [V, d] array with at least 2 rows; got shape {self.vectors.shape}"
            )
        if not np.isfinite(self.vectors).all():
            raise ValueError(f"reference cloud {self.label or self.key!r} holds non-finite values")
        if self.texts is not None and len(self.texts) != len(self.vectors):
            raise ValueError(f"texts has {len(self.texts)} entries but the cloud has {len(self.vectors)} rows")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


def token_reference(lm) -> ReferenceCloud:  # noqa: ANN001 - core.models.LoadedModel
    """The token-embedding matrix of `lm` as a reference cloud, [V, d], with each token's text."""
    vectors = lm.input_embeddings().numpy()
    ids = np.arange(len(vectors))
    texts = _token_texts(lm.tokenizer, ids)
    return ReferenceCloud(vectors, key=f"{lm.fingerprint}:tokens", texts=texts, ids=ids,
                          label=f"token embeddings of {lm.name} ({len(vectors):,} tokens)")


def activation_reference(
    lm, dataset: str, layer: int, n: int = 64, seed: int = 0, source: str = "auto", max_length: int = 128  # noqa: ANN001
) -> ReferenceCloud:
    """One layer's activations on `n` examples of `dataset` as a reference cloud (the deep-prompt comparison).

    Layer 0 is the embedding output and layer L the last block's output, as in
    `core.activations`; rows are tokens (first token and padding excluded), [rows, d].
    """
    from core.activations import dataset_activations

    acts = dataset_activations(lm, dataset, [layer], n=n, seed=seed, source=source, max_length=max_length)
    vectors = acts.layer(layer)
    texts = [str(t) for t in acts.token_texts] if getattr(acts, "token_texts", None) is not None else None
    return ReferenceCloud(
        vectors,
        key=f"{lm.fingerprint}:acts:{dataset}:{source}:{n}:{seed}:{max_length}:{layer}",
        texts=texts,
        ids=np.asarray(acts.token_ids) if getattr(acts, "token_ids", None) is not None else None,
        label=f"{dataset} activations at layer {layer} ({len(vectors):,} tokens)",
    )


def _token_texts(tokenizer, ids: np.ndarray) -> list[str]:  # noqa: ANN001
    # convert_ids_to_tokens keeps byte-level marks (Ġ for a leading space); decode each id for readable text.
    return [tokenizer.decode([int(i)]) for i in ids]


# --------------------------------------------------------------------------- reference statistics


def _chunk_rows(n_cols: int) -> int:
    return max(1, min(4096, _CHUNK_ELEMENTS // max(1, n_cols)))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [m, V] between rows of a [m, d] and b [V, d], clamped at 0."""
    a_sq = (a * a).sum(1, keepdim=True)
    return (a_sq + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def reference_knn(
    ref: ReferenceCloud, k: int = DEFAULT_K, progress: Callable[[float], None] | None = None
) -> dict[str, np.ndarray]:
    """Each reference point's distances to its own neighbours (self excluded), cached on disk.

    Returns {"nn1": [V] distance to the nearest other point, "knn": [V] mean
    distance to the k nearest other points, "nn_cos": [V] cosine similarity to
    the most similar other point, "norms": [V]}. A V x V pass in
    chunks; the result is stored under `cache_subdir("divergence")`, keyed by
    the cloud's key, a hash of its values and k.
    """
    if k < 1 or k >= len(ref):
        raise ValueError(f"k must be between 1 and {len(ref) - 1} (the cloud has {len(ref)} points); got {k}")
    cache_key = _knn_key(ref, k)

    def compute() -> dict:
        hit = _artifact_knn(cache_key)
        return _compute_reference_knn(ref.vectors, k, progress) if hit is None else hit

    return _cached_stats(ref, cache_key, compute)


def _cached_stats(ref: ReferenceCloud, cache_key: str, compute: Callable[[], Any] | None) -> Any:
    """`compute()` for `ref` under `cache_key`: remembered on the cloud and kept on disk under
    `cache_subdir("divergence")`, computed only where neither has it. With `compute` None, only a look: the stored
    value, or None."""
    if cache_key in ref._stats:
        return ref._stats[cache_key]
    import diskcache

    with diskcache.Cache(str(cache_subdir("divergence")), size_limit=2**30) as cache:
        hit = cache.get(cache_key)
        if hit is None:
            if compute is None:
                return None
            hit = compute()
        cache.set(cache_key, hit)
    ref._stats[cache_key] = hit
    return hit


ARTIFACT_NAME = "reference_knn_tokens"


def _artifact_knn(cache_key: str) -> dict | None:
    """The committed table (artifacts/arrays/reference_knn_tokens.safetensors) when it was built for this key."""
    from safetensors import safe_open

    from core.paths import ARTIFACTS_DIR

    path = ARTIFACTS_DIR / "arrays" / f"{ARTIFACT_NAME}.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            if json.loads((fh.metadata() or {}).get("cache_key", "null")) != cache_key:
                return None
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except (OSError, ValueError):
        return None  # an unreadable artifact is a miss: recompute


def save_reference_knn_artifact(lm, store, k: int = DEFAULT_K) -> Path:  # noqa: ANN001 - LoadedModel, ArtifactStore
    """Write the token cloud's k-NN table into `store` (core.artifacts.ArtifactStore), float32, about 0.8 MB
    for 49k tokens, so a fresh clone's Divergence page skips the V x V pass (about 30-60 s on 2 cores)."""
    ref = token_reference(lm)
    stats = reference_knn(ref, k=k)
    key = _knn_key(ref, k)
    return store.save_arrays(ARTIFACT_NAME, {n: np.asarray(v, dtype=np.float32) for n, v in stats.items()},
                             metadata={"cache_key": key, "model_fingerprint": lm.fingerprint, "k": k})


def _knn_key(ref: ReferenceCloud, k: int) -> str:
    return f"refknn:v2:{ref.key}:{_array_digest(ref.vectors)}:{k}"


def _array_digest(x: np.ndarray) -> str:
    # Cheap identity of the values (strided sample + shape), so a changed cloud under the same key is not served stale.
    flat = x.reshape(-1)
    sample = flat[:: max(1, flat.size // 65536)]
    return hashlib.sha256(sample.tobytes() + str(x.shape).encode()).hexdigest()[:16]


def _compute_reference_knn(vectors: np.ndarray, k: int, progress: Callable[[float], None] | None) -> dict:
    ref = torch.from_numpy(vectors)
    ref_sq = (ref * ref).sum(1)
    norms = ref_sq.sqrt()
    inv_norm = 1.0 / norms.clamp_min(1e-12)
    half_sq = ref_sq / 2
    n = len(ref)
    nn1, knn, nn_cos = (np.empty(n, dtype=np.float32) for _ in range(3))
    step = _chunk_rows(n)
    with torch.no_grad():
        for start in range(0, n, step):
            stop = min(n, start + step)
            rows = torch.arange(stop - start)
            # One product per block; cosines and distances both derive from it with cheap elementwise passes.
            dot = ref[start:stop] @ ref.T  # [chunk, V]
            scaled = dot * inv_norm[None, :]
            scaled[rows, rows + start] = -float("inf")  # self excluded by index: duplicate tokens are real neighbours
            # max_j cos(t, j) = max_j (t.j / |j|) / |t|: the row's own norm factors out of the max
            nn_cos[start:stop] = (scaled.max(1).values * inv_norm[start:stop]).numpy()
            del scaled
            # |t - j|^2 = |t|^2 + 2 (|j|^2 / 2 - t.j): the k smallest brackets give the k nearest
            half = dot.neg_().add_(half_sq[None, :])
            half[rows, rows + start] = float("inf")
            near = torch.topk(half, k, dim=1, largest=False).values  # [chunk, k], ascending
            near = near.mul_(2.0).add_(ref_sq[start:stop, None]).clamp_min_(0.0).sqrt_()
            nn1[start:stop] = near[:, 0].numpy()
            knn[start:stop] = near.mean(1).numpy()
            if progress is not None:
                progress(stop / n)
    return {"nn1": nn1, "knn": knn, "nn_cos": nn_cos, "norms": norms.numpy().astype(np.float32)}


def _nearest_distances(vectors: np.ndarray, queries: np.ndarray | None = None) -> np.ndarray:
    """`_compute_reference_knn(...)["nn1"]` alone: per block one product that also adds |j|^2 / 2
    (`addmm`), then a min, where the whole table also takes cosines and a top-k (49,152 tokens of 64 dims, 2 Zen 1
    threads: 10 against 19 s, the same numbers)."""
    ref = torch.from_numpy(vectors)
    ref_sq = (ref * ref).sum(1)
    half_sq = (ref_sq / 2)[None, :]
    index = torch.arange(len(ref)) if queries is None else torch.as_tensor(queries, dtype=torch.long)
    nearest = torch.empty(len(index))
    step = _chunk_rows(len(ref))
    with torch.no_grad():
        for start in range(0, len(index), step):
            stop = min(len(index), start + step)
            own = index[start:stop]
            half = torch.addmm(half_sq, ref[own], ref.T, alpha=-1)  # |j|^2 / 2 - t.j, as in the whole table
            half[torch.arange(stop - start), own] = float("inf")  # self excluded by index
            nearest[start:stop] = half.amin(1)
    return nearest.mul_(2.0).add_(ref_sq[index]).clamp_min_(0.0).sqrt_().numpy()


def nearest_distances(ref: ReferenceCloud) -> np.ndarray:
    """Each point's distance to its nearest other point, [V]: `reference_knn(ref)["nn1"]`, read from that table
    where it is at hand (remembered, on disk, or the committed artifact), else from a pass of its own (about half the
    table's time), cached on disk."""
    table_key = _knn_key(ref, DEFAULT_K)
    table = _cached_stats(ref, table_key, None)
    if table is None:
        table = _artifact_knn(table_key)
    if table is not None:
        return table["nn1"]
    return _cached_stats(ref, f"{_knn_key(ref, 1)}:nn1", lambda: _nearest_distances(ref.vectors))


def sampled_nn1(ref: ReferenceCloud, n: int, seed: int = 0) -> np.ndarray:
    """Distances [n] from `n` points of `ref` (a fixed sample: the same for the same cloud, `n` and `seed`) to their
    nearest other point among all of `ref`: `nearest_distances(ref)` at those points, for an n x V pass instead
    of V x V. Cached on disk beside `reference_knn`'s tables."""
    if not 1 <= n <= len(ref):
        raise ValueError(f"the sample must have between 1 and {len(ref)} points (the cloud's size); got {n}")

    def compute() -> np.ndarray:
        rows = np.sort(np.random.default_rng(seed).choice(len(ref), size=n, replace=False))
        return _nearest_distances(ref.vectors, queries=rows)

    return _cached_stats(ref, f"{_knn_key(ref, 1)}:sample{n}:seed{seed}", compute)


# --------------------------------------------------------------------------- per-vector measures


@dataclass
class DivergenceReport:
    """Per-vector measures ([n] rows of `per_vector`) and their aggregate (`summary`).

    per_vector columns: index, norm, norm_ratio, nearest, nearest_id, nearest_cos, nearest_cos_centered,
    nearest_norm_ratio (norm over the nearest point's norm), top_tokens (top-k read-out as "tok (cos)"
    joined by " | "), knn_dist, manifold_ratio, mahalanobis (NaN without a fit), collapsed (`collapsed`),
    within_nn_radius (the old Euclidean test; not collapse), and drift_l2, drift_cos (NaN without an
    initial sample).
    summary: collapsed_share, within_nn_radius_share, median_nearest_cos, median_nearest_cos_centered,
    reference_median_nn_cos, median_manifold_ratio,
    median_mahalanobis, reference_median_mahalanobis, median_norm_ratio,
    mean_drift_l2, mean_drift_cos, n, reference.
    """

    per_vector: pd.DataFrame
    summary: dict
    top_ids: np.ndarray  # [n, top_k] reference rows nearest by cosine
    top_cos: np.ndarray  # [n, top_k]


def _as_matrix(x, name: str, dim: int | None = None) -> np.ndarray:  # noqa: ANN001
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a [n, d] matrix of prompt vectors; got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{name} has width {arr.shape[1]} but the reference cloud has width {dim}: "
            "compare a prompt with the cloud of the same model (and, for deep prompts, the same layer)"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf); the run that produced it diverged")
    return arr.astype(np.float32, copy=False)


@dataclass
class _Scan:
    top_ids: np.ndarray  # [n, top_k] reference rows, most cosine-similar first
    top_cos: np.ndarray  # [n, top_k]
    knn_dist: np.ndarray  # [n] mean Euclidean distance to the k nearest reference points
    margin: np.ndarray  # [n] min over points t of |p - t| - nn1(t); < 0: inside some point's neighbour radius
    centered_cos: np.ndarray  # [n] max over points t of cos(p - mu, t - mu), mu = the cloud's mean; 0 for p = mu


def _scan(p: np.ndarray, ref: ReferenceCloud, k: int, top_k: int, stats: dict) -> _Scan:
    """One chunked pass of the prompt [n, d] over the reference [V, d] for every per-vector measure.

    float32 products over [n, chunk] blocks; the collapse margin is then recomputed exactly (float64
    differences, no expansion) for the few pairs near the threshold, where rounding would decide it: a
    vector equal to a token must be at distance 0, not 1e-3.
    """
    pt = torch.from_numpy(p)
    p_sq = (pt * pt).sum(1)
    p_norm = p_sq.sqrt().clamp_min(1e-12)
    ref_t = torch.from_numpy(ref.vectors)
    ref_sq = _ref_sq(ref)
    nn1 = torch.from_numpy(stats["nn1"])
    slack = 1e-2 * float(ref_sq.sqrt().median())
    # Centered cosines from the same products: (p-mu).(t-mu) = p.t - p.mu - t.mu + mu.mu, no centered copy of the cloud.
    mu, t_mu, tc_norm = _ref_centering(ref)
    mu_sq = float(mu @ mu)
    p_mu = pt @ mu  # [n]
    pc_norm = (pt.double() - mu.double()).norm(dim=1).float()  # direct, not expanded: exact near the mean
    at_mean = pc_norm <= 1e-4 * max(float(ref_sq.sqrt().median()), 1e-12)  # p = mu: no direction, centered cos 0
    n = len(pt)
    best_d = torch.zeros((n, 0))
    best_c = torch.zeros((n, 0))
    best_i = torch.zeros((n, 0), dtype=torch.long)
    margin = torch.full((n,), float("inf"), dtype=torch.float64)
    centered = torch.full((n,), -float("inf"))
    step = max(1, min(len(ref), _CHUNK_ELEMENTS // max(1, 4 * n)))  # few big blocks: n is small
    for start in range(0, len(ref), step):
        block, b_sq = ref_t[start:start + step], ref_sq[start:start + step]
        dot = pt @ block.T  # [n, chunk]
        cos = dot / (p_norm[:, None] * b_sq.sqrt().clamp_min(1e-12)[None, :])
        cen = (dot - p_mu[:, None] - t_mu[start:start + step][None, :] + mu_sq) / (
            pc_norm.clamp_min(1e-12)[:, None] * tc_norm[start:start + step].clamp_min(1e-12)[None, :])
        centered = torch.maximum(centered, cen.max(1).values)
        del cen
        all_c = torch.cat([best_c, cos], 1)
        all_i = torch.cat([best_i, torch.arange(start, start + len(block)).expand(n, -1)], 1)
        best_c, order = torch.topk(all_c, min(top_k, all_c.shape[1]), dim=1)
        best_i = torch.gather(all_i, 1, order)
        del cos, all_c, all_i
        d = dot.mul_(-2.0).add_(b_sq[None, :]).add_(p_sq[:, None]).clamp_min_(0.0).sqrt_()  # [n, chunk]
        gap = (d - nn1[start:start + step][None, :]).double()
        rows, cols = torch.nonzero(gap < slack, as_tuple=True)
        if len(rows):
            exact = (pt[rows].double() - block[cols].double()).norm(dim=1)
            gap[rows, cols] = exact - nn1[start:start + step][cols].double()
        margin = torch.minimum(margin, gap.min(1).values)
        best_d = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + d.shape[1]), dim=1,
                            largest=False).values
    centered = torch.where(at_mean, torch.zeros_like(centered), centered.clamp(-1.0, 1.0))
    return _Scan(best_i.numpy(), best_c.double().numpy(), best_d.double().mean(1).numpy(), margin.numpy(),
                 centered.double().numpy())


def _ref_sq(ref: ReferenceCloud) -> torch.Tensor:
    """Squared norms of the reference rows [V], computed once per cloud object."""
    if "sq" not in ref._stats:
        vec = torch.from_numpy(ref.vectors)
        ref._stats["sq"] = (vec * vec).sum(1)
    return ref._stats["sq"]


def _ref_centering(ref: ReferenceCloud) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cloud's mean mu [d], each row's t.mu [V] and centered norm |t - mu| [V], computed once per cloud object."""
    if "centering" not in ref._stats:
        vec = torch.from_numpy(ref.vectors)
        mu = vec.double().mean(0).float()
        t_mu = vec @ mu
        tc_norm = (_ref_sq(ref) - 2 * t_mu + float(mu @ mu)).clamp_min(0.0).sqrt()
        ref._stats["centering"] = (mu, t_mu, tc_norm)
    return ref._stats["centering"]


def nearest_by_cosine(prompt, ref: ReferenceCloud, top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Top-k reference rows by cosine similarity: (row indices [n, top_k], cosines [n, top_k]), best first."""
    p = _as_matrix(prompt, "prompt", ref.dim)
    stats = {"nn1": np.zeros(len(ref), np.float32)}  # unused here
    scan = _scan(p, ref, 1, top_k, stats)
    return scan.top_ids, scan.top_cos


def divergence(
    prompt,  # noqa: ANN001 - torch.Tensor or numpy [n, d]
    ref: ReferenceCloud,
    init=None,  # noqa: ANN001 - [n, d], the prior sample the prompt was trained from
    gaussian=None,  # noqa: ANN001 - an object with .mahalanobis(x [m, d]) -> [m] (core.priors.FittedGaussian)
    k: int = DEFAULT_K,
    top_k: int = TOP_K,
) -> DivergenceReport:
    """All divergence and collapse measures of `prompt` [n, d] against `ref` [V, d].

    init: the initial sample [n, d] for drift (omit: drift columns are NaN).
    gaussian: the fitted Gaussian of the same cloud, for Mahalanobis distances (omit: NaN).
    """
    p = _as_matrix(prompt, "prompt", ref.dim)
    stats = reference_knn(ref, k=k)
    scan = _scan(p, ref, k, top_k, stats)
    top_ids, top_cos, knn_dist = scan.top_ids, scan.top_cos, scan.knn_dist
    ref_knn_median = float(np.median(stats["knn"]))
    ref_norm_median = float(np.median(stats["norms"]))
    norms = np.linalg.norm(p.astype(np.float64), axis=1)
    rule = collapse_rule(ref, k=k)
    nearest_norm_ratio = norms / np.maximum(stats["norms"][top_ids[:, 0]].astype(np.float64), 1e-12)
    is_collapsed = _collapsed_by_rule(top_cos[:, 0], nearest_norm_ratio, rule)
    within = _within_nn_radius(scan.margin, ref_norm_median)

    frame = pd.DataFrame({
        "index": np.arange(len(p)),
        "norm": norms,
        "norm_ratio": norms / max(ref_norm_median, 1e-12),
        "nearest_id": ref.ids[top_ids[:, 0]] if ref.ids is not None else top_ids[:, 0],
        "nearest": [ref.texts[i] for i in top_ids[:, 0]] if ref.texts is not None else top_ids[:, 0].astype(str),
        "nearest_cos": top_cos[:, 0],
        "nearest_cos_centered": scan.centered_cos,
        "nearest_norm_ratio": nearest_norm_ratio,
        "top_tokens": [_readout(ref, ids, cos) for ids, cos in zip(top_ids, top_cos, strict=True)],
        "knn_dist": knn_dist,
        "manifold_ratio": knn_dist / max(ref_knn_median, 1e-12),
        "mahalanobis": _mahalanobis(gaussian, p),
        "collapsed": is_collapsed,
        "within_nn_radius": within,
    })
    if init is not None:
        p0 = _as_matrix(init, "init", ref.dim)
        if p0.shape != p.shape:
            raise ValueError(
                f"init has shape {p0.shape} but the prompt has shape {p.shape}; pass the run's step-0 snapshot"
            )
        frame["drift_l2"], frame["drift_cos"] = drift(p, p0)
    else:
        frame["drift_l2"] = np.nan
        frame["drift_cos"] = np.nan
    summary = {
        "n": len(p),
        "reference": ref.label or ref.key,
        "collapsed_share": float(is_collapsed.mean()),
        "within_nn_radius_share": float(within.mean()),
        "median_nearest_cos": float(np.median(top_cos[:, 0])),
        "median_nearest_cos_centered": float(np.median(scan.centered_cos)),
        "reference_median_nn_cos": rule["min_cos"],
        "median_manifold_ratio": float(np.median(frame["manifold_ratio"])),
        "median_mahalanobis": float(np.median(frame["mahalanobis"])),
        "reference_median_mahalanobis": _reference_mahalanobis(gaussian, ref),
        "median_norm_ratio": float(np.median(frame["norm_ratio"])),
        "mean_drift_l2": float(frame["drift_l2"].mean()),
        "mean_drift_cos": float(frame["drift_cos"].mean()),
    }
    return DivergenceReport(per_vector=frame, summary=summary, top_ids=top_ids, top_cos=top_cos)


def _readout(ref: ReferenceCloud, ids: np.ndarray, cos: np.ndarray) -> str:
    names = [repr(ref.texts[i]) if ref.texts is not None else f"#{i}" for i in ids]
    return " | ".join(f"{n} ({c:.2f})" for n, c in zip(names, cos, strict=True))


def _mahalanobis(gaussian, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    if gaussian is None:
        return np.full(len(x), np.nan)
    out = gaussian.mahalanobis(torch.from_numpy(x))
    return np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float64)


def _reference_mahalanobis(gaussian, ref: ReferenceCloud, sample: int = 2048) -> float:  # noqa: ANN001
    # The cloud's own median distance gives the scale: in d=576 a typical point sits near sqrt(d), not near 0.
    if gaussian is None:
        return float("nan")
    key = ("ref_mahalanobis", id(gaussian), sample)
    if key not in ref._stats:
        rows = np.random.default_rng(0).choice(len(ref), size=min(sample, len(ref)), replace=False)
        ref._stats[key] = float(np.median(_mahalanobis(gaussian, ref.vectors[np.sort(rows)])))
    return ref._stats[key]


def drift(prompt, init) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Per-vector drift from the initial sample: (L2 distance [n], cosine distance 1 - cos [n])."""
    p = _as_matrix(prompt, "prompt").astype(np.float64)
    p0 = _as_matrix(init, "init").astype(np.float64)
    if p.shape != p0.shape:
        raise ValueError(f"prompt {p.shape} and init {p0.shape} must have the same shape")
    l2 = np.linalg.norm(p - p0, axis=1)
    cos = (p * p0).sum(1) / np.maximum(np.linalg.norm(p, axis=1) * np.linalg.norm(p0, axis=1), 1e-12)
    return l2, np.clip(1.0 - cos, 0.0, 2.0)  # clip rounding below 0


NORM_FACTOR = 2.0  # a collapsed vector's norm is within this factor of its nearest reference point's norm


def collapse_rule(ref: ReferenceCloud, k: int = DEFAULT_K) -> dict:
    """The collapse rule of this cloud as data: {"min_cos": the cloud's median nearest-neighbour cosine,
    "norm_factor": 2.0, "test": a one-line statement}. The median comes from the cached k-NN table
    (`reference_knn`, the committed artifact for the embedded model's tokens) and is kept on the cloud object."""
    key = ("collapse_rule", k)
    if key not in ref._stats:
        median = float(np.median(reference_knn(ref, k=k)["nn_cos"]))
        ref._stats[key] = {
            "min_cos": median, "norm_factor": NORM_FACTOR,
            "test": (f"collapsed when the cosine to the nearest reference point is >= {median:.3f} (the reference's "
                     f"median nearest-neighbour cosine) and the norm is within x{NORM_FACTOR:g} of that point's norm"),
        }
    return ref._stats[key]


def _collapsed_by_rule(nearest_cos: np.ndarray, norm_ratio: np.ndarray, rule: dict) -> np.ndarray:
    factor = rule["norm_factor"]
    # A hair of slack on the cosine: a vector equal to a reference point must pass even after float32 rounding.
    return (nearest_cos >= rule["min_cos"] - 1e-6) & (norm_ratio >= 1.0 / factor) & (norm_ratio <= factor)


def collapsed(prompt, ref: ReferenceCloud, k: int = DEFAULT_K) -> np.ndarray:  # noqa: ANN001
    """Which prompt vectors [n, d] have collapsed onto the reference cloud: np.ndarray[bool] [n].

    In the sense of Lester et al. (2021) section 7: a vector is collapsed when both hold:
    (a) the cosine to its most similar reference point is at least the reference's own median
    nearest-neighbour cosine (`collapse_rule(ref)["min_cos"]`, cached per cloud);
    (b) its norm is within a factor of 2 of that point's norm.
    `ref`: `token_reference(lm)` for soft prompts, `activation_reference(...)` for deep ones.

        >>> collapsed(lm.input_embeddings()[:5], token_reference(lm))        # rows of the cloud: all True
        >>> collapsed(0.1 * lm.input_embeddings()[:5], token_reference(lm))  # right direction, too short: False
    """
    p = _as_matrix(prompt, "prompt", ref.dim)
    ids, cos = nearest_by_cosine(p, ref, top_k=1)
    stats = reference_knn(ref, k=k)
    ratio = np.linalg.norm(p.astype(np.float64), axis=1) / np.maximum(stats["norms"][ids[:, 0]].astype(np.float64),
                                                                       1e-12)
    return _collapsed_by_rule(cos[:, 0], ratio, collapse_rule(ref, k=k))


def centered_cosine(prompt, ref: ReferenceCloud) -> np.ndarray:  # noqa: ANN001
    """Cosine to the most similar reference point after removing the cloud's mean from both: [n].

    Plain cosines between token embeddings share the vocabulary's mean direction (the mean vector itself has
    cosine 0.89 to its nearest token on SmolLM2); centered, that shared part is gone. The mean itself gives 0.
    """
    p = _as_matrix(prompt, "prompt", ref.dim)
    stats = {"nn1": np.zeros(len(ref), np.float32)}
    return _scan(p, ref, 1, 1, stats).centered_cos


def _within_nn_radius(margin: np.ndarray, scale: float) -> np.ndarray:
    # margin = min over points t of (|p - t| - nn1(t)). Strictly inside some point's nearest-neighbour radius,
    # or on a point whose duplicate makes its radius 0 (margin ~ 0 up to rounding). Not a collapse test: see above.
    return margin <= 1e-6 * max(scale, 1e-12)


def snapshot_divergence(
    snapshots,  # noqa: ANN001 - [S, n, d]
    steps: list[int],
    ref: ReferenceCloud,
    gaussian=None,  # noqa: ANN001
    k: int = DEFAULT_K,
) -> pd.DataFrame:
    """Aggregate measures at every snapshot: one row per step.

    snapshots: [S, n, d] aligned with `steps`; the first snapshot is the initial sample (drift is measured from it).
    Columns: step, collapsed_share, within_nn_radius_share, median_nearest_cos, median_nearest_cos_centered,
    median_manifold_ratio, median_mahalanobis,
    median_norm_ratio, mean_drift_l2, mean_drift_cos.
    """
    snaps = snapshots.detach().float().cpu().numpy() if isinstance(snapshots, torch.Tensor) else np.asarray(snapshots)
    if snaps.ndim != 3 or len(snaps) != len(steps):
        raise ValueError(
            f"snapshots must be [S, n, d] with S = len(steps) = {len(steps)}; got shape {snaps.shape}"
        )
    n_snap, n = snaps.shape[:2]
    # One pass over the reference for all S x n vectors, then aggregate per snapshot.
    flat = divergence(snaps.reshape(n_snap * n, -1), ref, init=np.tile(snaps[0], (n_snap, 1)), gaussian=gaussian,
                      k=k, top_k=1).per_vector
    flat["snapshot"] = np.repeat(np.arange(n_snap), n)
    g = flat.groupby("snapshot")
    frame = pd.DataFrame({
        "step": [int(s) for s in steps],
        "collapsed_share": g["collapsed"].mean().to_numpy(dtype=float),
        "within_nn_radius_share": g["within_nn_radius"].mean().to_numpy(dtype=float),
        "median_nearest_cos": g["nearest_cos"].median().to_numpy(),
        "median_nearest_cos_centered": g["nearest_cos_centered"].median().to_numpy(),
        "median_manifold_ratio": g["manifold_ratio"].median().to_numpy(),
        "median_mahalanobis": g["mahalanobis"].median().to_numpy(),
        "median_norm_ratio": g["norm_ratio"].median().to_numpy(),
        "mean_drift_l2": g["drift_l2"].mean().to_numpy(),
        "mean_drift_cos": g["drift_cos"].mean().to_numpy(),
    })
    return frame[["step", *TRACKED]]


TRACKED = ("collapsed_share", "within_nn_radius_share", "median_nearest_cos", "median_nearest_cos_centered",
          "median_manifold_ratio", "median_mahalanobis",
          "median_norm_ratio", "mean_drift_l2", "mean_drift_cos")


def readout_settling(
    snapshots,  # noqa: ANN001 - [S, n, d]
    steps: list[int],
    ref: ReferenceCloud,
    top_k: int = 3,
) -> pd.DataFrame:
    """When does each vector's nearest-token read-out settle? One row per prompt vector.

    snapshots: [S, n, d] aligned with `steps` (the first is the prior sample). Columns: vector,
    settled_step (the first snapshot step from which the top-1 reference point no longer changes; the
    first step when it never changed), changes (how many times top-1 changed), initial and final
    (top-1 text at the first and last snapshot), final_cos, topk_overlap (share of the final top-k
    already in the first snapshot's top-k), topk_changes (snapshots whose top-k set differs from the
    one before).
    """
    snaps = snapshots.detach().float().cpu().numpy() if isinstance(snapshots, torch.Tensor) else np.asarray(snapshots)
    if snaps.ndim != 3 or len(snaps) != len(steps):
        raise ValueError(
            f"snapshots must be [S, n, d] with S = len(steps) = {len(steps)}; got shape {snaps.shape}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}")
    n_snap, n = snaps.shape[:2]
    ids, cos = nearest_by_cosine(snaps.reshape(n_snap * n, -1), ref, top_k=top_k)
    ids, cos = ids.reshape(n_snap, n, -1), cos.reshape(n_snap, n, -1)  # [S, n, top_k]
    top1 = ids[:, :, 0]  # [S, n]
    changed = top1[1:] != top1[:-1]  # [S-1, n]
    sets = [[frozenset(ids[s, v]) for v in range(n)] for s in range(n_snap)]
    rows = []
    for v in range(n):
        moves = np.nonzero(changed[:, v])[0]
        settled = int(steps[moves[-1] + 1]) if len(moves) else int(steps[0])
        first, last = sets[0][v], sets[-1][v]
        rows.append({
            "vector": v, "settled_step": settled, "changes": len(moves),
            "initial": _label(ref, top1[0, v]), "final": _label(ref, top1[-1, v]), "final_cos": float(cos[-1, v, 0]),
            "topk_overlap": len(first & last) / len(last),
            "topk_changes": sum(sets[s][v] != sets[s - 1][v] for s in range(1, n_snap)),
        })
    return pd.DataFrame(rows, columns=["vector", "settled_step", "changes", "initial", "final", "final_cos",
                                       "topk_overlap", "topk_changes"])


def settled_share(settling: pd.DataFrame, steps: list[int]) -> pd.DataFrame:
    """Share of vectors whose top-1 read-out has settled by each step: columns step, settled_share."""
    settled = settling["settled_step"].to_numpy()
    return pd.DataFrame({"step": [int(s) for s in steps],
                         "settled_share": [float((settled <= s).mean()) if len(settled) else np.nan for s in steps]})


def _label(ref: ReferenceCloud, row: int) -> str:
    return repr(ref.texts[row]) if ref.texts is not None else f"#{row}"
