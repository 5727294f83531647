"""2-D views of high-dimensional clouds: PCA fitted once on a reference, t-SNE, outlier accounting.

    >>> proj = fit_pca(token_embeddings)          # [vocab, d] reference cloud
    >>> xy = proj.transform(prompt_vectors)       # [m, 2], on the reference's axes
    >>> inside = robust_mask(proj.transform(token_embeddings))

PCA is fitted on the reference only, so prior samples, trained prompts and
sentence paths drawn later sit on the same axes as the cloud. t-SNE has no
`transform`: it embeds everything it is given jointly, so callers concatenate
all groups and pass the indices that must survive subsampling. Both are
deterministic for a seed; t-SNE results are cached on disk (content-hashed
inputs), as are PCA fits of large references.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from core.activations import array_digest, cached_bytes

# Robust range: median ± ROBUST_K · IQR per axis (Tukey's fences use 1.5; 3 keeps only clear outliers out).
ROBUST_K = 3.0
TSNE_MAX_POINTS = 5000  # hard cap: t-SNE is O(n log n) per iteration but slow on 2 CPU cores past this


@dataclass(frozen=True)
class Projection:
    """A linear map to 2 (or k) axes fitted on a reference cloud.

    mean [d], components [k, d], explained_variance_ratio [k], n_reference: rows fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    n_reference: int

    def transform(self, x: np.ndarray) -> np.ndarray:
        """[m, d] -> [m, k] on the reference's principal axes."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"points must be [m, {self.mean.shape[0]}] to match the reference; got shape {tuple(x.shape)}"
            )
        return (x - self.mean) @ self.components.T

    def axis_labels(self) -> list[str]:
        """'PC1 (12.3% var.)' style labels for chart axes."""
        return [f"PC{i + 1} ({100 * r:.1f}% var.)" for i, r in enumerate(self.explained_variance_ratio)]

    def to_dict(self) -> dict:
        """JSON-serialisable form (for artifacts)."""
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "n_reference": self.n_reference,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Projection:
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float32),
            components=np.asarray(data["components"], dtype=np.float32),
            explained_variance_ratio=np.asarray(data["explained_variance_ratio"], dtype=np.float64),
            n_reference=int(data["n_reference"]),
        )


def _check_cloud(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d]; got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows; got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values: drop those rows first")
    return x


def fit_pca(reference: np.ndarray, n_components: int = 2, seed: int = 0) -> Projection:
    """PCA of `reference` [n, d] -> `Projection` with `.transform(x [m, d]) -> [m, n_components]`.

    Uses scikit-learn's randomized solver for large clouds (deterministic for `seed`);
    fits on more than 20,000 rows are cached on disk by content.
    """
    from sklearn.decomposition import PCA

    ref = _check_cloud(reference, "reference", max(2, n_components))
    if n_components > min(ref.shape):
        raise ValueError(f"n_components={n_components} exceeds min(n, d)={min(ref.shape)} of the reference")

    def compute() -> bytes:
        solver = "randomized" if ref.shape[0] > 2000 else "full"
        pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed).fit(ref)
        proj = Projection(
            mean=pca.mean_.astype(np.float32),
            components=pca.components_.astype(np.float32),
            explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
            n_reference=ref.shape[0],
        )
        return json.dumps(proj.to_dict()).encode()

    def decode(blob: bytes) -> Projection:
        return Projection.from_dict(json.loads(blob))

    if ref.shape[0] <= 20000:
        return decode(compute())
    key = f"pca/{array_digest(ref)}/k={n_components}/seed={seed}"
    return cached_bytes(key, compute, decode, cache="projections")


def subsample_indices(n: int, max_points: int, seed: int = 0, keep: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of at most `max_points` of `n` rows, always containing `keep` (seeded)."""
    keep = np.unique(np.asarray([] if keep is None else keep, dtype=np.int64))
    if len(keep) and (keep.min() < 0 or keep.max() >= n):
        raise ValueError(f"keep indices must lie in 0..{n - 1}")
    if len(keep) > max_points:
        raise ValueError(f"{len(keep)} points must be kept but max_points is {max_points}: raise max_points")
    if n <= max_points:
        return np.arange(n)
    rest = np.setdiff1d(np.arange(n), keep)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(rest, size=max_points - len(keep), replace=False)
    return np.sort(np.concatenate([keep, chosen]))


@dataclass(frozen=True)
class TsneResult:
    """coords [m, 2] for the rows `index` [m] of the input (sorted), and the settings used."""

    coords: np.ndarray
    index: np.ndarray
    perplexity: float
    seed: int
    n_input: int


def tsne(
    x: np.ndarray,
    max_points: int = 2000,
    seed: int = 0,
    perplexity: float = 30.0,
    keep: np.ndarray | None = None,
    pca_dims: int = 50,
) -> TsneResult:
    """Joint t-SNE of at most `max_points` rows of `x` [n, d]; rows in `keep` are always included.

    Rows are first reduced to `pca_dims` by PCA (the usual speed-up; t-SNE looks at
    neighbourhoods, which survive it). Deterministic for `seed`, cached on disk by content.
    Returns `TsneResult` with coords [m, 2] and the chosen row indices [m].
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    data = _check_cloud(x, "points", 5)
    if not 5 <= max_points <= TSNE_MAX_POINTS:
        raise ValueError(f"max_points must be in 5..{TSNE_MAX_POINTS} for t-SNE on this machine; got {max_points}")
    index = subsample_indices(len(data), max_points, seed=seed, keep=keep)
    sub = data[index]
    perp = float(min(perplexity, (len(sub) - 1) / 3))  # scikit-learn requires perplexity < n

    def compute() -> bytes:
        reduced = sub
        if sub.shape[1] > pca_dims and len(sub) > pca_dims:
            reduced = PCA(n_components=pca_dims, random_state=seed).fit_transform(sub)
        coords = TSNE(
            n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed, max_iter=750,
        ).fit_transform(reduced)
        buf = io.BytesIO()
        np.save(buf, coords.astype(np.float32), allow_pickle=False)
        return buf.getvalue()

    def decode(blob: bytes) -> np.ndarray:
        coords = np.load(io.BytesIO(blob), allow_pickle=False)
        if coords.shape != (len(index), 2):
            raise ValueError("cached t-SNE has the wrong shape")
        return coords

    key = f"tsne/{array_digest(sub)}/perp={perp:.3f}/seed={seed}/pca={pca_dims}/iter=750"
    coords = cached_bytes(key, compute, decode, cache="projections")
    return TsneResult(coords=coords, index=index, perplexity=perp, seed=seed, n_input=len(data))


def robust_mask(xy: np.ndarray, k: float = ROBUST_K) -> np.ndarray:
    """True for rows of `xy` [m, k'] inside median ± k·IQR on every axis (bool [m]).

    Used to fit the view to the bulk of a cloud and to say how many points fall
    outside it, instead of silently moving or dropping them.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2:
        raise ValueError(f"xy must be [m, k]; got shape {tuple(xy.shape)}")
    if len(xy) == 0:
        return np.zeros(0, dtype=bool)
    q1, med, q3 = np.percentile(xy, [25, 50, 75], axis=0)
    iqr = np.maximum(q3 - q1, 1e-12)
    return np.all(np.abs(xy - med) <= k * iqr, axis=1)


def outlier_note(mask: np.ndarray, what: str = "points") -> str:
    """One sentence for the UI: how many points fall outside the robust range."""
    n_out = int((~np.asarray(mask)).sum())
    if n_out == 0:
        return f"All {len(mask)} {what} lie within the robust range (median ± {ROBUST_K:g}·IQR per axis)."
    return (
        f"{n_out} of {len(mask)} {what} ({100 * n_out / len(mask):.1f}%) fall outside the robust range "
        f"(median ± {ROBUST_K:g}·IQR per axis)."
    )
