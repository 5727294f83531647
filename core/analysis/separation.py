"""How far apart are the datasets' activations, layer by layer? Silhouette, centroid ratio, linear probe.

    >>> table = dataset_separation(lm, n=48)       # pandas DataFrame, one row per (layer, comparison)
    >>> table.query("comparison == 'math vs c4'")[["layer", "silhouette", "probe_accuracy"]]

The unit is the *document*: each text is mean-pooled over its tokens (first,
attention-sink token left out) at every layer, as in the paper's Figure 5. That
makes the samples independent (tokens of one text are not), keeps every layer of
every text in memory, and lets one forward pass serve all 31 layers. Per layer
and comparison:

- silhouette: scikit-learn `silhouette_score`, Euclidean, on the raw pooled vectors (-1..1)
- centroid_ratio: distance between dataset centroids / within-dataset spread, the spread
  being the root mean squared distance of documents to their own centroid, averaged over
  the datasets (for 3 datasets: mean pairwise centroid distance over the same spread);
  above ~2 the clouds barely touch
- probe_accuracy: stratified k-fold held-out accuracy of a standardised logistic
  regression telling the datasets apart; `chance` is the majority-class rate

The table is a plain DataFrame (`to_csv` / `read_csv` round-trip), so a page can
show a precomputed one.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from core.activations import cache_key, cached_bytes, check_layers, dataset_document_means, resolve_compute, source_key
from core.data import dataset_task
from core.models import LoadedModel

DATASETS = ("c4", "squad", "math")
DEFAULT_COMPARISONS: dict[str, tuple[str, ...]] = {
    "math vs c4": ("math", "c4"),
    "squad vs c4": ("squad", "c4"),
    "math vs squad": ("math", "squad"),
    "all three": ("c4", "squad", "math"),
}
COLUMNS = [
    "layer", "comparison", "silhouette", "centroid_ratio", "probe_accuracy", "probe_std", "chance", "n_docs",
]


def separation_scores(groups: dict[str, np.ndarray], seed: int = 0, folds: int = 5) -> dict[str, float]:
    """Scores for one set of groups, name -> [n_g, d] pooled vectors (at least `folds` per group)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if len(groups) < 2:
        raise ValueError(f"separation needs at least 2 datasets; got {list(groups)}")
    small = {k: len(v) for k, v in groups.items() if len(v) < folds}
    if small:
        raise ValueError(f"each dataset needs at least {folds} documents for {folds}-fold probing; got {small}")
    x = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()])
    y = np.concatenate([np.full(len(v), g) for g, v in enumerate(groups.values())])
    centroids = [np.asarray(v, dtype=np.float64).mean(0) for v in groups.values()]
    spreads = [
        np.sqrt(((np.asarray(v, dtype=np.float64) - c) ** 2).sum(1).mean())
        for v, c in zip(groups.values(), centroids, strict=True)
    ]
    pair_d = [
        np.linalg.norm(centroids[a] - centroids[b]) for a in range(len(centroids)) for b in range(a + 1, len(centroids))
    ]
    # Standardise: a few massive dimensions would otherwise dominate the probe's penalty.
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One BLAS thread: these are small problems, and spinning threads on a shared CPU made them ~10x slower.
    with threadpool_limits(1):
        acc = cross_val_score(probe, x, y, cv=cv, scoring="accuracy")
        silhouette = float(silhouette_score(x, y, metric="euclidean"))
    return {
        "silhouette": silhouette,
        "centroid_ratio": float(np.mean(pair_d) / max(np.mean(spreads), 1e-12)),
        "probe_accuracy": float(acc.mean()),
        "probe_std": float(acc.std()),
        "chance": float(np.bincount(y).max() / len(y)),
        "n_docs": int(len(y)),
    }


def separation_table(
    means: dict[str, dict[int, np.ndarray]],
    comparisons: dict[str, tuple[str, ...]] | None = None,
    seed: int = 0,
    folds: int = 5,
) -> pd.DataFrame:
    """Long table of separation scores: one row per (layer, comparison), columns `COLUMNS`.

    means: dataset -> layer -> [n_docs, d] pooled activations (as `dataset_document_means` returns).
    comparisons: name -> datasets; default every pair/triple of `DEFAULT_COMPARISONS` whose datasets are present.
    """
    if not means:
        raise ValueError("no datasets given: pass dataset -> layer -> [n, d] document means")
    comps = comparisons or {k: v for k, v in DEFAULT_COMPARISONS.items() if all(d in means for d in v)}
    if not comps:
        raise ValueError(f"no comparison is possible with datasets {list(means)}: give at least two")
    layers = sorted(set.intersection(*(set(m) for m in means.values())))
    rows = []
    for layer in layers:
        for name, members in comps.items():
            missing = [d for d in members if d not in means]
            if missing:
                raise ValueError(f"comparison {name!r} needs datasets {missing} that were not given")
            scores = separation_scores({d: means[d][layer] for d in members}, seed=seed, folds=folds)
            rows.append({"layer": layer, "comparison": name, **scores})
    return pd.DataFrame(rows, columns=COLUMNS)


def dataset_separation(
    lm: LoadedModel,
    datasets: Sequence[str] = DATASETS,
    n: int = 48,
    seed: int = 0,
    source: str = "auto",
    max_length: int = 64,
    layers: Sequence[int] | None = None,
    progress: Callable[[float], None] | None = None,
) -> pd.DataFrame:
    """`separation_table` for `datasets` on `lm`, all layers by default; the table is cached on disk.

    n: documents per dataset; each text is truncated to `max_length` tokens. The document
    means come from `dataset_document_means` (one cached forward pass per dataset, all layers).
    """
    layer_t = check_layers(lm, range(lm.num_layers + 1) if layers is None else layers)
    key = cache_key(
        "separation", lm, datasets=list(datasets), tasks=[dataset_task(d, source) for d in datasets],
        source=source_key(source), n=n, seed=seed,
        max_length=max_length, layers=list(layer_t), compute=resolve_compute(lm), folds=5,
    )

    def compute() -> bytes:
        every = len(layer_t) == lm.num_layers + 1  # then share the all-layer means with other views
        means = all_layer_means(
            lm, datasets, n=n, seed=seed, source=source, max_length=max_length,
            layers=None if every else layer_t, progress=progress,
        )
        return separation_table(means, seed=seed).to_csv(index=False).encode()

    return cached_bytes(key, compute, lambda blob: pd.read_csv(io.BytesIO(blob)))


def all_layer_means(
    lm: LoadedModel,
    datasets: Sequence[str] = DATASETS,
    n: int = 48,
    seed: int = 0,
    source: str = "auto",
    max_length: int = 64,
    layers: Sequence[int] | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, dict[int, np.ndarray]]:
    """dataset -> layer -> [n, d] document means, every layer by default (cached per dataset).

    For the separation table and the mean-activation-per-document view (paper Fig. 5).
    """
    means = {}
    for k, dataset in enumerate(datasets):
        def sub_progress(f: float, k: int = k) -> None:
            if progress is not None:
                progress((k + f) / len(datasets))

        means[dataset] = dataset_document_means(
            lm, dataset, layers, n=n, seed=seed, source=source, max_length=max_length, progress=sub_progress
        )
    return means


def summary_at(table: pd.DataFrame, layers: Sequence[int], comparisons: Sequence[str]) -> pd.DataFrame:
    """Silhouette and probe accuracy at chosen layers, comparisons as columns (for reports)."""
    sub = table[table["layer"].isin(layers) & table["comparison"].isin(comparisons)]
    return sub.pivot(index="layer", columns="comparison", values=["silhouette", "probe_accuracy"])


def centroid_gap(math: np.ndarray, squad: np.ndarray, c4: np.ndarray) -> float:
    """centroid_ratio(MATH vs C4) - centroid_ratio(SQuAD vs C4) on [n, d] document means: > 0 when MATH sits
    further from C4 than SQuAD does, relative to the clouds' spread."""
    def ratio(a: np.ndarray, b: np.ndarray) -> float:
        spread = np.mean([np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()) for x in (a, b)])
        return float(np.linalg.norm(a.mean(0) - b.mean(0)) / max(spread, 1e-12))

    return ratio(math, c4) - ratio(squad, c4)


def separation_gaps(means: dict[str, dict[int, np.ndarray]], layers: Sequence[int], seed: int = 0) -> pd.DataFrame:
    """The MATH-vs-SQuAD gap of centroid ratios (`centroid_gap`) at `layers`, with a 95% bootstrap CI over
    documents (each dataset resampled on its own; scipy.stats.bootstrap). Layer 0 is the lexical control:
    token embeddings only, so a gap there comes from which tokens the texts use (MATH's digits), not from
    what the model computes. Columns: layer, gap, ci_low, ci_high, n_docs."""
    from core.analysis.claims import bootstrap_ci

    for d in ("math", "squad", "c4"):
        if d not in means:
            raise ValueError(f"separation gaps need document means of math, squad and c4; {d!r} is missing")
    rows = []
    for layer in layers:
        groups = tuple(np.asarray(means[d][layer], dtype=np.float64) for d in ("math", "squad", "c4"))
        # scipy's bootstrap resamples 1-D samples: resample document indices, then gather the rows
        index = tuple(np.arange(len(g)) for g in groups)
        def gap(*ix: np.ndarray, groups: tuple = groups) -> float:
            return centroid_gap(*(g[np.asarray(i, dtype=int)] for g, i in zip(groups, ix, strict=True)))

        low, high = bootstrap_ci(index, gap, seed=seed)
        rows.append({"layer": int(layer), "gap": centroid_gap(*groups), "ci_low": low, "ci_high": high,
                     "n_docs": int(sum(len(g) for g in groups))})
    return pd.DataFrame(rows, columns=["layer", "gap", "ci_low", "ci_high", "n_docs"])
