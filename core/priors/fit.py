"""The Gaussian fit of a reference cloud, computed once per cloud and cached (memory + disk).

    >>> g = fitted_gaussian(lm)                       # token embeddings, Ledoit-Wolf shrunk covariance
    >>> g.mean.shape, g.cov.shape, g.shrinkage
    (torch.Size([576]), torch.Size([576, 576]), 0.0018)
    >>> g.mahalanobis(prompt)                         # [m]
    >>> fitted_gaussian(lm, source="squad", layer=30) # a dataset's activations at a layer

Why a hand-written Ledoit-Wolf: scikit-learn's `LedoitWolf.fit` makes three passes
over the [N, d] cloud (its float64 empirical covariance and two block products);
the same shrinkage follows from the one Gram matrix X^T X, because
sum(X²ᵀX²) = sum_i |x_i|⁴. `tests/test_priors.py` checks it equals
`sklearn.covariance.LedoitWolf` to 1e-6. The shrunk covariance
(1-s)·S + s·(tr S / d)·I is positive definite whenever s > 0; if Cholesky still
fails (s = 0 asked for explicitly on a rank-deficient cloud) a ridge of
1e-6·tr(S)/d, growing tenfold, is added and recorded in `.ridge`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core.models import LoadedModel
from core.priors.base import COVARIANCES, MIN_FIT_POINTS, check_source, resolve_layer

FORMAT_VERSION = 1
MAX_LENGTH = 128  # tokens per text for activation clouds, as core.activations defaults
_MEMORY: OrderedDict[str, FittedGaussian] = OrderedDict()
_MEMORY_ENTRIES = 8  # d=2048 fits are ~70 MB each (cov + Cholesky in float64)
ProgressFn = Callable[[float], None]  # called with the fraction done while activations are computed


@dataclass
class FittedGaussian:
    """N(mean, cov) fitted to a cloud [N, d].

    mean [d], cov [d, d], chol [d, d] (lower, cov = chol chol^T), all float64 on the CPU;
    log_det = log|cov|; covariance "full" or "diagonal"; shrinkage is the
    Ledoit-Wolf (or given) coefficient, ridge what had to be added to the diagonal.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    chol: torch.Tensor
    log_det: float
    covariance: str
    shrinkage: float
    ridge: float
    n_points: int
    label: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def precision(self) -> torch.Tensor:
        """cov^-1 [d, d] float64, from the Cholesky factor (prefer `whiten`/`mahalanobis`, which never invert)."""
        return torch.cholesky_inverse(self.chol)

    def describe(self) -> str:
        if self.covariance == "diagonal":
            cov = "diagonal covariance"
        else:
            cov = f"full covariance, Ledoit-Wolf shrinkage {self.shrinkage:.4g}"
        ridge = f", ridge {self.ridge:.2g}" if self.ridge else ""
        return f"Gaussian fit of {self.label or 'a cloud'} ({self.n_points:,} points, d={self.dim}; {cov}{ridge})"

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [m, {self.dim}]; got {tuple(x.shape)}")
        return x.detach().to("cpu", torch.float64)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """z = chol^-1 (x - mean) for rows of x [m, d] -> [m, d] float64; z ~ N(0, I) under the fit."""
        x = self._check(x)
        return torch.linalg.solve_triangular(self.chol, (x - self.mean).T, upper=False).T

    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance sqrt((x-mean)^T cov^-1 (x-mean)) of rows of x [m, d] -> [m] float64.

        A typical sample of the fit itself sits near sqrt(d) (24 for d=576), not near 0.
        """
        return self.whiten(x).norm(dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of rows of x [m, d] -> [m] float64."""
        m2 = self.whiten(x).pow(2).sum(1)
        return -0.5 * (m2 + self.log_det + self.dim * math.log(2 * math.pi))

    def color(self, eps: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """mean + sqrt(scale) chol eps for standard-normal rows eps [m, d] -> float32 [m, d]."""
        return (self.mean + math.sqrt(scale) * (eps.to(torch.float64) @ self.chol.T)).float()

    def sample(self, n: int, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """n draws from N(mean, scale * cov) -> float32 [n, d]."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.color(eps, scale)

    # ---- storage
    def to_arrays(self) -> dict:
        return {
            "mean": self.mean.numpy(), "cov": self.cov.numpy(), "chol": self.chol.numpy(),
            "meta": {k: getattr(self, k) for k in ("log_det", "covariance", "shrinkage", "ridge", "n_points", "label")},
        }

    @classmethod
    def from_arrays(cls, blob: dict) -> FittedGaussian:
        return cls(
            mean=torch.from_numpy(blob["mean"]), cov=torch.from_numpy(blob["cov"]),
            chol=torch.from_numpy(blob["chol"]), **blob["meta"],
        )


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean [d], Ledoit-Wolf shrunk covariance [d, d] (float64) and the shrinkage of a cloud x [N, d].

    Same estimator as sklearn.covariance.LedoitWolf (biased empirical covariance,
    target tr(S)/d · I), from one Gram matrix instead of three passes.
    """
    n, d = x.shape
    x = x.to(torch.float32)
    mean = x.mean(0)  # [d]; torch's reduction is pairwise, accurate in float32
    xc = x - mean
    gram = (xc.T @ xc).double()  # [d, d]; the one O(N d²) product
    emp = gram / n
    mu = float(torch.trace(emp)) / d
    sq_norms = torch.linalg.vector_norm(xc, dim=1).double().pow(2)  # [N], one fused pass
    beta_ = float(sq_norms.pow(2).sum())  # = sum(X²ᵀ X²)
    delta_ = float(emp.pow(2).sum())  # = sum((XᵀX)²) / N²
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(torch.trace(emp)) + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    cov = (1.0 - shrinkage) * emp
    cov.diagonal().add_(shrinkage * mu)
    return mean.double(), cov, float(shrinkage)


def _cholesky_with_ridge(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    scale = max(float(torch.trace(cov)) / cov.shape[0], 1e-30)
    ridge = 0.0
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(cov if ridge == 0 else cov + ridge * torch.eye(len(cov), dtype=cov.dtype))
        if int(info) == 0:
            return (cov if ridge == 0 else cov + ridge * torch.eye(len(cov), dtype=cov.dtype)), chol, ridge
        ridge = 1e-6 * scale if ridge == 0 else ridge * 10
    raise ValueError(
        "the covariance stays singular even with a ridge of 1e5 x its mean variance; the cloud is degenerate"
    )


def fit_gaussian(
    x: torch.Tensor | np.ndarray, covariance: str = "full", shrinkage: float | None = None, label: str = ""
) -> FittedGaussian:
    """Fit N(mean, cov) to a cloud x [N, d] (no caching; see `fitted_gaussian` for the cached fit).

    covariance: "full" (shrunk: Ledoit-Wolf when shrinkage is None, else the given
    coefficient in [0, 1]) or "diagonal" (per-dimension variances).
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {covariance!r}")
    if shrinkage is not None and not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1] or None (Ledoit-Wolf); got {shrinkage}")
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"a reference cloud must be [N, d]; got shape {tuple(x.shape)}")
    if x.shape[0] < MIN_FIT_POINTS:
        raise ValueError(
            f"too few points to fit a Gaussian: {x.shape[0]} rows, at least {MIN_FIT_POINTS} needed "
            "(use more dataset texts, n_docs, or the token cloud)"
        )
    n, d = x.shape
    if covariance == "diagonal":
        xd = x.to(torch.float64)
        mean = xd.mean(0)
        cov = torch.diag(xd.var(0, unbiased=False))
        used = 0.0
    elif shrinkage is None:
        mean, cov, used = ledoit_wolf(x)
    else:
        xf = x.to(torch.float32)
        mean = xf.mean(0)
        xc = xf - mean
        mean = mean.double()
        emp = (xc.T @ xc).double() / n
        used = float(shrinkage)
        cov = (1 - used) * emp
        cov.diagonal().add_(used * float(torch.trace(emp)) / d)
    # A NaN or inf anywhere in the cloud reaches the mean or the covariance: checked there, not over [N, d].
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise ValueError("the reference cloud holds non-finite values (NaN or inf); drop those rows")
    cov, chol, ridge = _cholesky_with_ridge(cov)
    log_det = 2.0 * float(torch.log(torch.diagonal(chol)).sum())
    return FittedGaussian(mean, cov, chol, log_det, covariance, used, ridge, n, label)


# --------------------------------------------------------------------------- reference clouds


def reference_cloud(
    lm: LoadedModel, source: str | None = None, layer: int | None = None, n_docs: int = 64, data_seed: int = 0,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """The cloud a prior is fitted to, float32 [N, d]: token embeddings [V, d] for source None/"tokens",
    else a dataset's activations at `layer` (default: last), first token and padding excluded."""
    source = source or "tokens"
    check_source(source, layer, lm)
    layer = resolve_layer(source, layer, lm)
    if source == "tokens":
        return lm.input_embeddings()
    from core.activations import dataset_activations

    acts = dataset_activations(
        lm, source, [layer], n=int(n_docs), seed=int(data_seed), max_length=MAX_LENGTH, progress=progress
    )
    return torch.from_numpy(acts.layer(layer))


def reference_label(lm: LoadedModel | None, source: str | None, layer: int | None) -> str:
    source = source or "tokens"
    if source == "tokens":
        return "token embeddings"
    return f"{source} activations at layer {resolve_layer(source, layer, lm)}"


def fit_key(
    lm: LoadedModel, source: str | None, layer: int | None, n_docs: int, data_seed: int,
    covariance: str, shrinkage: float | None,
) -> str:
    """Explicit cache key: everything that changes the fit."""
    source = source or "tokens"
    layer = resolve_layer(source, layer, lm)
    cloud = "tokens"
    if source != "tokens":
        from core.data import dataset_task  # "math:add_sub_multiple@easy": a fit on another MATH task must miss

        cloud = f"{dataset_task(source)},layer={layer},n={n_docs},seed={data_seed},max_length={MAX_LENGTH}"
    shrink = "ledoit-wolf" if shrinkage is None else f"{float(shrinkage):g}"
    return f"gauss/v{FORMAT_VERSION}/{lm.fingerprint}/{cloud}/cov={covariance},shrinkage={shrink}"


def disk_cache():  # noqa: ANN201 - diskcache.Cache
    """The priors' disk cache (fits, trained VAEs) under cache_subdir("priors"): the activations' bounded cache
    (least recently used out first, a damaged index started afresh), with its own size limit."""
    from core.activations import disk_cache as bounded_cache

    return bounded_cache("priors", size_limit=int(float(os.environ.get("PRIOR_LAB_PRIOR_CACHE_GB", "1")) * 2**30))


def fitted_gaussian(
    lm: LoadedModel,
    source: str | None = None,
    layer: int | None = None,
    n_docs: int = 64,
    data_seed: int = 0,
    covariance: str = "full",
    shrinkage: float | None = None,
    refresh: bool = False,
    progress: ProgressFn | None = None,
) -> FittedGaussian:
    """The Gaussian fit of `lm`'s token embeddings (source None/"tokens") or of a dataset's
    activations at `layer`, computed once and cached in memory and on disk under
    `cache_subdir("priors")`, keyed by fingerprint, source, layer, n_docs, data_seed,
    covariance and shrinkage. `refresh=True` recomputes and overwrites; `progress` hears
    how far the activations are when they must be computed.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {covariance!r}")
    source = source or "tokens"
    check_source(source, layer, lm)
    key = fit_key(lm, source, layer, n_docs, data_seed, covariance, shrinkage)
    if not refresh and key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    fit = None
    with disk_cache() as disk:
        if not refresh:
            try:
                blob = disk.get(key, default=None, retry=True)
                fit = FittedGaussian.from_arrays(blob) if blob is not None else None
            except Exception:  # noqa: BLE001 - an unreadable entry is a miss, recomputed below
                fit = None
        if fit is None:
            cloud = reference_cloud(lm, source, layer, n_docs, data_seed, progress)
            fit = fit_gaussian(cloud, covariance, shrinkage, label=reference_label(lm, source, layer))
            disk.set(key, fit.to_arrays(), retry=True)
    _MEMORY[key] = fit
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return fit


def clear_memory_cache() -> None:
    """Forget in-memory fits (the disk cache stays); for benchmarks and tests."""
    _MEMORY.clear()


def fit_for(  # noqa: ANN001 - config: a prior config with source, layer, n_docs, data_seed
    config, lm: LoadedModel | None, reference: torch.Tensor | None, progress: ProgressFn | None = None
) -> FittedGaussian:
    """The fit a prior's config asks for: of `reference` [N, d] when given (not cached), else the cached
    `fitted_gaussian` of lm's source cloud."""
    covariance = getattr(config, "covariance", "full")
    shrinkage = getattr(config, "shrinkage", None)
    if reference is not None:
        return fit_gaussian(reference, covariance, shrinkage, label="a given cloud")
    if lm is None:
        raise ValueError("this prior fits a reference cloud: pass lm= (a loaded model) or reference= ([N, d] tensor)")
    return fitted_gaussian(
        lm, config.source, config.layer, config.n_docs, config.data_seed, covariance, shrinkage, progress=progress
    )
