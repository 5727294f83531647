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
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.activations import array_digest, cached_bytes

# Robust range: median ± ROBUST_K · IQR per axis (Tukey's fences use 1.5; 3 keeps only clear outliers out).
ROBUST_K = 3.0
# Rows with a norm above this multiple of the median are "massive activations" (LLaMA models give a
# few tokens besides the first norms 50x the rest); a PCA fitted with them spends its first axis on them.
MASSIVE_FACTOR = 5.0
TSNE_MAX_POINTS = 5000  # hard cap: t-SNE is O(n log n) per iteration but slow on 2 CPU cores past this
# OpenMP/BLAS threads for PCA and t-SNE. On a small shared CPU spinning threads made t-SNE ~7x slower
# (1,000 points: 68 s with default threads vs 9 s with one, load ~10 on 2 cores); raise it on a big machine.
ANALYSIS_THREADS = int(os.environ.get("PRIOR_LAB_ANALYSIS_THREADS", "1"))


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
    from threadpoolctl import threadpool_limits

    ref = _check_cloud(reference, "reference", max(2, n_components))
    if n_components > min(ref.shape):
        raise ValueError(f"n_components={n_components} exceeds min(n, d)={min(ref.shape)} of the reference")

    def compute() -> bytes:
        solver = "randomized" if ref.shape[0] > 2000 else "full"
        with threadpool_limits(ANALYSIS_THREADS):
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
    key = pca_cache_key(ref, n_components, seed)

    def stored_or_compute() -> bytes:
        # `python -m core precompute` commits the fits of large clouds (the vocabulary) under their
        # content key, so a fresh clone skips the fit; any other cloud is fitted here.
        from core.artifacts import ArtifactStore

        stored = (ArtifactStore().load_json(PCA_ARTIFACT) or {}).get(key)
        return json.dumps(stored).encode() if stored else compute()

    return cached_bytes(key, stored_or_compute, decode, cache="projections")


PCA_ARTIFACT = "projections"  # tables/projections.json: {content key: Projection.to_dict()}


def pca_cache_key(reference: np.ndarray, n_components: int = 2, seed: int = 0) -> str:
    """Content key of a PCA fit: the same cloud, width and seed give the same axes."""
    return f"pca/{array_digest(np.asarray(reference, dtype=np.float32))}/k={n_components}/seed={seed}"


def massive_rows(x: np.ndarray, factor: float = MASSIVE_FACTOR) -> np.ndarray:
    """bool [n]: rows of `x` [n, d] whose norm exceeds `factor` times the median norm."""
    norms = np.linalg.norm(np.asarray(x, dtype=np.float32), axis=1)
    return norms > factor * np.median(norms)


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
    from threadpoolctl import threadpool_limits

    data = _check_cloud(x, "points", 5)
    if not 5 <= max_points <= TSNE_MAX_POINTS:
        raise ValueError(f"max_points must be in 5..{TSNE_MAX_POINTS} for t-SNE on this machine; got {max_points}")
    index = subsample_indices(len(data), max_points, seed=seed, keep=keep)
    sub = data[index]
    perp = float(min(perplexity, (len(sub) - 1) / 3))  # scikit-learn requires perplexity < n

    def compute() -> bytes:
        reduced = sub
        with threadpool_limits(ANALYSIS_THREADS):
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


# --------------------------------------------------------------------------- views for pages


@dataclass(frozen=True)
class View:
    """Points of several groups on one 2-D frame, ready to draw.

    frame: one row per shown point with columns group, row (index within its group), x, y,
    inside (within the robust range) and any metadata columns given; x_label / y_label
    name the axes; note says how many points fall outside the robust range; n_total counts
    all input points, len(frame) those shown after subsampling.
    """

    frame: pd.DataFrame
    x_label: str
    y_label: str
    note: str
    n_total: int
    method: str


def project_groups(
    groups: dict[str, np.ndarray],
    meta: dict[str, pd.DataFrame] | None = None,
    method: str = "pca",
    reference: str | Projection | None = None,
    max_points: int = 3000,
    keep_groups: tuple[str, ...] = (),
    seed: int = 0,
    perplexity: float = 30.0,
) -> View:
    """Draw every group on the same axes: PCA fitted on `reference`, or one joint t-SNE.

    groups: name -> [n_g, d] points (same d). meta: name -> DataFrame with n_g rows joined onto
    the points (token text, document, ...). reference (PCA only): a group name, a fitted
    `Projection`, or None for all groups together. max_points caps the points shown (and fed to
    t-SNE); groups in `keep_groups` (a trajectory, found tokens) are never subsampled.
    """
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne'; got {method!r}")
    if not groups:
        raise ValueError("no groups to draw: pass name -> [n, d] arrays")
    names = list(groups)
    arrays = [_check_cloud(groups[g], f"group {g!r}", 1) for g in names]
    widths = {a.shape[1] for a in arrays}
    if len(widths) != 1:
        raise ValueError(f"all groups need the same width d; got {({g: a.shape[1] for g, a in groups.items()})}")
    unknown = [g for g in keep_groups if g not in groups]
    if unknown:
        raise ValueError(f"keep_groups {unknown} are not among the groups {names}")
    data = np.concatenate(arrays)
    group_col = np.concatenate([np.full(len(a), g, dtype=object) for g, a in zip(names, arrays, strict=True)])
    row_col = np.concatenate([np.arange(len(a)) for a in arrays])
    keep = np.flatnonzero(np.isin(group_col, list(keep_groups)))
    fit_note = ""
    if method == "pca":
        if isinstance(reference, Projection):
            proj = reference
        elif reference is None or reference in groups:
            ref = data if reference is None else np.asarray(groups[reference], dtype=np.float32)
            massive = massive_rows(ref)
            if massive.any() and (~massive).sum() >= 3:
                ref = ref[~massive]
                fit_note = (f" PCA fitted without {int(massive.sum())} massive-activation rows "
                            f"(norm > {MASSIVE_FACTOR:g}x the median), which would take the first axis.")
            proj = fit_pca(ref, seed=seed)
        else:
            raise ValueError(f"reference {reference!r} is neither a group ({names}) nor a Projection")
        index = subsample_indices(len(data), max_points, seed=seed, keep=keep)
        xy = proj.transform(data[index])
        x_label, y_label = proj.axis_labels()[:2]
    else:
        result = tsne(data, max_points=min(max_points, TSNE_MAX_POINTS), seed=seed, perplexity=perplexity, keep=keep)
        index, xy = result.index, result.coords
        x_label, y_label = "t-SNE 1", "t-SNE 2"
    frame = pd.DataFrame({"group": group_col[index], "row": row_col[index], "x": xy[:, 0], "y": xy[:, 1]})
    frame["inside"] = robust_mask(xy)
    if meta:
        parts = []
        for g in names:
            part = frame[frame["group"] == g]
            if g in meta:
                extra = meta[g].reset_index(drop=True)
                if len(extra) != len(groups[g]):
                    raise ValueError(f"meta for {g!r} has {len(extra)} rows but the group has {len(groups[g])}")
                part = part.join(extra, on="row")
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
    return View(frame, x_label, y_label, outlier_note(frame["inside"].to_numpy()) + fit_note, len(data), method)


def token_table(lm, ids: np.ndarray) -> pd.DataFrame:  # noqa: ANN001 - a LoadedModel
    """token_id and decoded token text for each id (hover data)."""
    ids = np.asarray(ids, dtype=np.int64)
    return pd.DataFrame({"token_id": ids, "token": [repr(lm.tokenizer.decode([int(i)])) for i in ids]})


def find_tokens(lm, query: str, limit: int = 20) -> np.ndarray:  # noqa: ANN001 - a LoadedModel
    """Ids of tokens whose text matches `query`: the query's own tokens, then vocabulary entries
    that equal it once stripped of spaces and case (e.g. 'cat' finds 'cat', ' cat', ' Cat'). int64 [<= limit]."""
    query = query.strip()
    if not query:
        raise ValueError("type a word or a token to find")
    want = query.lower()
    found = list(dict.fromkeys(lm.tokenizer(query, add_special_tokens=False)["input_ids"]))
    for token, idx in lm.tokenizer.get_vocab().items():
        if len(found) >= limit:
            break
        text = lm.tokenizer.convert_tokens_to_string([token]).strip().lower()
        if text == want and idx not in found:
            found.append(idx)
    return np.asarray(found[:limit], dtype=np.int64)
