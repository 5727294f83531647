"""Xavier (Glorot) uniform for an n x d matrix: U(-b, b), b = gain * sqrt(6 / (n + d))."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.priors.base import Prior, PriorConfig, option, register


@dataclass
class XavierConfig(PriorConfig):
    gain: float = option(1.0, "Scale of the bound gain * sqrt(6 / (n + d)) (1 = torch.nn.init.xavier_uniform_).",
                         min=0.0, step=0.1)

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        if not float(self.gain) > 0:
            raise ValueError(f"gain must be positive; got {self.gain}")


@register
class XavierPrior(Prior):
    name = "xavier"
    Config = XavierConfig
    summary = "Xavier uniform for the n x d prompt matrix"

    def bound(self, n: int) -> float:
        """Half-width of the uniform for an n x d matrix."""
        return self.config.gain * math.sqrt(6.0 / (n + self.dim))

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        b = self.bound(n)
        return (torch.rand(n, self.dim, generator=generator) * 2 - 1) * b

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Density of rows of x [m, d] -> [m], for the bound of an m x d matrix (the bound depends on n)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        b = self.bound(x.shape[0])
        inside = (x.abs() <= b).all(-1)
        return torch.where(inside, torch.tensor(-self.dim * math.log(2 * b), dtype=torch.float64),
                           torch.tensor(-math.inf, dtype=torch.float64))

    def describe(self) -> str:
        return f"Xavier uniform U(±{self.config.gain:g}·sqrt(6/(n+d))), d={self._dim}"
