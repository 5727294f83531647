"""Isotropic Gaussian N(mean, sigma² I): the paper's baseline (sigma = 0.02), and the same at the token scale.

`gaussian_tokens` sets sigma to the token embeddings' RMS per coordinate: a draw has the norm of a typical
token but none of the vocabulary's shape (mean, covariance). It separates "far from the tokens because
tiny" (sigma 0.02 sits near the origin) from "far because unlike them".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.models import LoadedModel
from core.priors.base import Prior, PriorConfig, option, register


@dataclass
class GaussianConfig(PriorConfig):
    sigma: float = option(0.02, "Standard deviation of every coordinate (0.02: the paper's baseline).",
                          min=0.0, step=0.005)
    mean: float = option(0.0, "Mean of every coordinate.", step=0.01)

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        if not float(self.sigma) > 0 or not math.isfinite(float(self.sigma)):
            raise ValueError(f"sigma must be a positive finite number; got {self.sigma}")


@register
class GaussianPrior(Prior):
    name = "gaussian"
    Config = GaussianConfig
    summary = "isotropic Gaussian N(0, sigma^2 I), the paper's baseline"

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.config.mean + self.sigma * torch.randn(n, self.dim, generator=generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[m, d] -> [m] float64."""
        z = (torch.as_tensor(x, dtype=torch.float64) - self.config.mean) / self.sigma
        return -0.5 * z.pow(2).sum(-1) - self.dim * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    @property
    def sigma(self) -> float:
        return float(self.config.sigma)

    def describe(self) -> str:
        return f"isotropic Gaussian N({self.config.mean:g}, {self.sigma:g}² I), d={self._dim}"


def token_rms(lm: LoadedModel) -> float:
    """sqrt(mean(E²)) over every entry of the token-embedding matrix E [V, d]: the per-coordinate scale of a
    token vector about the origin (where a zero-mean Gaussian is centred)."""
    return float(lm.input_embeddings().double().pow(2).mean().sqrt())


@dataclass
class TokenGaussianConfig(PriorConfig):
    mean: float = option(0.0, "Mean of every coordinate.", step=0.01)


@register
class TokenGaussianPrior(GaussianPrior):
    """N(mean, s² I) with s = `token_rms(lm)`: its own name, so runs and tables never pool it with sigma 0.02."""

    name = "gaussian_tokens"
    Config = TokenGaussianConfig
    summary = "isotropic Gaussian at the token embeddings' scale (sigma = their RMS per coordinate)"

    def __init__(self, config: TokenGaussianConfig, lm: LoadedModel | None = None, dim: int | None = None) -> None:
        if lm is None:
            raise ValueError("the gaussian_tokens prior takes its sigma from the model's token embeddings: pass lm= "
                             "(a loaded model), or use the gaussian prior with sigma=")
        super().__init__(config, lm, dim)
        self._sigma = token_rms(lm)

    @property
    def sigma(self) -> float:
        return self._sigma

    def describe(self) -> str:
        return (f"isotropic Gaussian N({self.config.mean:g}, {self.sigma:.4g}² I) at the token embeddings' RMS per "
                f"coordinate, d={self._dim}")
