"""Fitted Gaussian N(mu, Sigma) of a reference cloud (token embeddings or a dataset's activations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.models import LoadedModel
from core.priors.base import COVARIANCES, Prior, ReferenceConfig, option, register
from core.priors.fit import FittedGaussian, ProgressFn, fit_for


@dataclass
class FittedConfig(ReferenceConfig):
    covariance: str = option("full", "full: Ledoit-Wolf shrunk covariance; diagonal: per-dimension variances.",
                             choices=COVARIANCES)
    shrinkage: float | None = option(None, "Shrinkage coefficient in [0, 1]; empty = Ledoit-Wolf's estimate.",
                                     min=0.0, max=1.0, step=0.01)

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {self.covariance!r}")
        if self.shrinkage is not None and not 0.0 <= float(self.shrinkage) <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1] or empty (Ledoit-Wolf); got {self.shrinkage}")


class GaussianFitPrior(Prior):
    """Base of priors built on the Gaussian fit of a reference cloud (`self.fit`)."""

    def __init__(self, config: FittedConfig, lm: LoadedModel | None = None, dim: int | None = None,
                 reference: torch.Tensor | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(config, lm, dim)
        self.fit: FittedGaussian = fit_for(config, lm, reference, progress)
        if self._dim is not None and self._dim != self.fit.dim:
            raise ValueError(f"the reference cloud has width {self.fit.dim} but dim={self._dim}")
        self._dim = self.fit.dim
        self.custom_reference = reference is not None

    @property
    def params(self) -> dict:
        out = super().params
        if self.custom_reference:
            out["source"] = f"given cloud [{self.fit.n_points}, {self.fit.dim}]"
        return out


@register
class FittedPrior(GaussianFitPrior):
    name = "fitted"
    Config = FittedConfig
    summary = "Gaussian fitted to the token embeddings or a dataset's activations"

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.fit.sample(n, generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[m, d] -> [m] float64."""
        return self.fit.log_prob(x)

    def describe(self) -> str:
        return f"fitted {self.fit.describe()}"
