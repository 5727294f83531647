"""Isotropic Gaussian N(mean, sigma² I): the paper's baseline (sigma = 0.02)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
        c = self.config
        return c.mean + c.sigma * torch.randn(n, self.dim, generator=generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[m, d] -> [m] float64."""
        c = self.config
        z = (torch.as_tensor(x, dtype=torch.float64) - c.mean) / c.sigma
        return -0.5 * z.pow(2).sum(-1) - self.dim * (math.log(c.sigma) + 0.5 * math.log(2 * math.pi))

    def describe(self) -> str:
        return f"isotropic Gaussian N({self.config.mean:g}, {self.config.sigma:g}² I), d={self._dim}"
