"""The paper's Gaussian interpolation prior: e = alpha x + (1 - alpha) y, x ~ N(mu_a, S_a), y ~ N(mu_b, S_b).

Defaults follow the paper's section 4.5: Gaussians fitted on MATH (a) and C4 (b)
activations at the last layer, alpha ~ U[0, 1] per vector, or one fixed alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.models import LoadedModel
from core.priors.base import COVARIANCES, SOURCES, Prior, PriorConfig, check_source, option, register
from core.priors.fit import FittedGaussian, ProgressFn, fit_gaussian, fitted_gaussian


@dataclass
class InterpolationConfig(PriorConfig):
    source_a: str = option("math", "First cloud (alpha = 1 gives its Gaussian).", choices=SOURCES)
    source_b: str = option("c4", "Second cloud (alpha = 0 gives its Gaussian).", choices=SOURCES)
    layer: int | None = option(None, "Layer of the dataset activations; empty = last layer.", min=0)
    alpha: float | None = option(None, "Fixed mixing weight in [0, 1]; empty = alpha ~ U[0, 1] per vector.",
                                 min=0.0, max=1.0, step=0.05)
    n_docs: int = option(64, "Number of dataset texts per cloud.", min=2, max=512)
    data_seed: int = option(0, "Seed choosing the dataset texts.", min=0)
    covariance: str = option("full", "full (Ledoit-Wolf shrunk) or diagonal.", choices=COVARIANCES)

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        for src in (self.source_a, self.source_b):
            check_source(src, None if src == "tokens" else self.layer, lm)
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (or empty for alpha ~ U[0, 1]); got {self.alpha}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {self.covariance!r}")


@register
class InterpolationPrior(Prior):
    name = "interpolation"
    Config = InterpolationConfig
    summary = "alpha x + (1 - alpha) y between Gaussians fitted on two clouds (paper: MATH and C4)"

    def __init__(self, config: InterpolationConfig, lm: LoadedModel | None = None, dim: int | None = None,
                 reference_a: torch.Tensor | None = None, reference_b: torch.Tensor | None = None,
                 progress: ProgressFn | None = None) -> None:
        super().__init__(config, lm, dim)
        half = (lambda f: progress(0.5 * f), lambda f: progress(0.5 + 0.5 * f)) if progress else (None, None)
        self.fit_a = self._fit(config.source_a, reference_a, half[0])
        self.fit_b = self._fit(config.source_b, reference_b, half[1])
        if self.fit_a.dim != self.fit_b.dim:
            raise ValueError(f"the two clouds have different widths: {self.fit_a.dim} and {self.fit_b.dim}")
        self._dim = self.fit_a.dim
        self.last_alpha: torch.Tensor | None = None
        self._fixed_fit: FittedGaussian | None = None

    def _fit(self, source: str, reference: torch.Tensor | None, progress: ProgressFn | None) -> FittedGaussian:
        c = self.config
        if reference is not None:
            return fit_gaussian(reference, c.covariance, label="a given cloud")
        if self.lm is None:
            raise ValueError("interpolation fits two clouds: pass lm= or reference_a= and reference_b=")
        layer = None if source == "tokens" else c.layer
        return fitted_gaussian(self.lm, source, layer, c.n_docs, c.data_seed, c.covariance, progress=progress)

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x = self.fit_a.sample(n, generator)  # [n, d]
        y = self.fit_b.sample(n, generator)  # [n, d]
        if self.config.alpha is None:
            alpha = torch.rand(n, 1, generator=generator)
        else:
            alpha = torch.full((n, 1), float(self.config.alpha))
        self.last_alpha = alpha.squeeze(1)
        self.last_stats = {"alpha_mean": float(alpha.mean())}
        return alpha * x + (1 - alpha) * y

    def position(self, e: torch.Tensor) -> torch.Tensor:
        """Where rows of e [m, d] project on the line from mu_b (0) to mu_a (1) -> [m]."""
        axis = (self.fit_a.mean - self.fit_b.mean)
        return ((torch.as_tensor(e, dtype=torch.float64) - self.fit_b.mean) @ axis) / axis.dot(axis)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """With a fixed alpha the prior is N(a mu_a + (1-a) mu_b, a² S_a + (1-a)² S_b): rows of x [m, d] -> [m].
        With alpha ~ U[0, 1] it is a continuous mixture with no closed form: NotImplementedError."""
        a = self.config.alpha
        if a is None:
            raise NotImplementedError("interpolation with alpha ~ U[0, 1] has no analytic density; fix alpha")
        if self._fixed_fit is None:
            cov = a * a * self.fit_a.cov + (1 - a) ** 2 * self.fit_b.cov
            chol = torch.linalg.cholesky(cov)
            self._fixed_fit = FittedGaussian(
                a * self.fit_a.mean + (1 - a) * self.fit_b.mean, cov, chol,
                2.0 * float(torch.log(torch.diagonal(chol)).sum()), "full", math.nan, 0.0, 0, "interpolation",
            )
        return self._fixed_fit.log_prob(x)

    def describe(self) -> str:
        c = self.config
        alpha = "alpha ~ U[0, 1]" if c.alpha is None else f"alpha = {c.alpha:g}"
        a, b = self.fit_a.label or c.source_a, self.fit_b.label or c.source_b
        return f"Gaussian interpolation between {a} and {b}, {alpha}"
