"""The paper's Gaussian exclusion prior: widen the fitted Gaussian, reject its dense core.

Candidates x ~ N(mu, c_dim Sigma), c_dim = exp((2/d) log c), are accepted with
probability max(0, 1 - pdf(x)/pdf_wide(x)). Writing x = mu + sqrt(c_dim) L eps
(eps ~ N(0, I), L the Cholesky factor of Sigma), the log ratio is exact and cheap:

    log pdf(x) - log pdf_wide(x) = log c - (c_dim - 1) |eps|² / 2

(the log-determinants cancel up to (d/2) log c_dim = log c): acceptance depends
on |eps|² alone. A standard normal eps is r·u with r² ~ chi²_d independent of a
direction u uniform on the sphere, so candidates are drawn as r² only (one
chi-square number each, in batches, never one per Python step); an accepted
candidate then gets its direction (a normalised Gaussian d-vector) and is mapped
through L. The accepted points have exactly the distribution of the paper's
procedure, at O(1) cost per rejected candidate instead of O(d²).
The acceptance rate has a closed form (|eps|² ~ chi²_d):

    A = P(chi²_d > q0) - P(chi²_d > c_dim q0),   q0 = 2 log c / (c_dim - 1)

(3.8% at d=576, 2.0% at d=2048 for c=5), which also gives `log_prob` its normaliser.

The widening factor c_dim is what matters, and the paper's c=5 makes it tiny in
high dimension: at d=576, c_dim = 5^(2/576) = 1.0056, each axis 0.3% wider, so the
prior is nearly the fitted Gaussian with a thin core removed. `widening` sets c_dim
directly (c = c_dim^(d/2), kept as log c since it overflows a float: c_dim = 1.21
at d=576 is c = 7e23).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from core.priors.base import SamplingError, acceptance_stats, option, register
from core.priors.fitted import FittedConfig, GaussianFitPrior

_MAX_BATCH = 1 << 22  # candidates per batch: 4M chi-square draws, 32 MB


def c_dim(c: float, dim: int) -> float:
    """Per-dimension variance factor exp((2/dim) log c): the wide Gaussian's density is 1/c of the fit's at mu."""
    return math.exp((2.0 / dim) * math.log(c))


NEARLY_FITTED = 0.05  # c_dim below 1 + this: the wide Gaussian is within 2.5% per axis of the fit itself


def c_for_widening(c_dim_target: float, dim: int) -> float:
    """The c whose c_dim is `c_dim_target` in `dim` dimensions: exp((dim / 2) log c_dim_target).
    At d=576, c_dim = 1.21 (10% wider per axis) needs c = 1.21^288, about 7e23: the paper's c=5 gives 1.006."""
    return math.exp((dim / 2.0) * math.log(c_dim_target))


MAX_WIDENING = 100.0  # c_dim above this (10x per axis) is no longer "the fit, widened": it is another prior


def expected_acceptance(c: float, dim: int) -> float:
    """Probability that a candidate from N(mu, c_dim Sigma) is accepted (exact; independent of Sigma)."""
    return acceptance_from_log_c(math.log(c), dim)


@lru_cache(maxsize=256)
def acceptance_from_log_c(log_c: float, dim: int) -> float:
    """`expected_acceptance` from log c, which stays finite where c itself overflows (large c_dim)."""
    from scipy.stats import chi2

    cd = math.exp(2.0 * log_c / dim)
    q0 = 2.0 * log_c / (cd - 1.0)
    return float(chi2.sf(q0, dim) - chi2.sf(cd * q0, dim))


@dataclass
class ExclusionConfig(FittedConfig):
    c: float = option(5.0, "Widening: the wide Gaussian's peak density is 1/c of the fit's (c > 1; paper: 5). "
                      "Its per-axis variance factor is c_dim = c^(2/d): at d=576, c=5 gives c_dim = 1.006, nearly "
                      "the fitted prior. Use `widening` to pick c_dim itself.", min=1.01, step=0.5)
    widening: float | None = option(None, f"c_dim itself, the variance factor of each axis (1 < c_dim <= "
                                    f"{MAX_WIDENING:g}; 1.21 = 10% wider per axis); sets c = c_dim^(d/2) and "
                                    "overrides c. Empty = from c.", min=1.0001, max=MAX_WIDENING, step=0.05)
    max_candidates: int = option(5_000_000, "Candidate budget; sampling stops with an error past it.",
                                 min=1000, step=100_000)

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        if not float(self.c) > 1 or not math.isfinite(float(self.c)):
            raise ValueError(f"c must be a finite number greater than 1 (c <= 1 widens nothing); got {self.c}")
        if self.widening is not None:
            w = float(self.widening)
            if not (math.isfinite(w) and 1.0 < w <= MAX_WIDENING):
                raise ValueError(f"widening (c_dim) must be a number greater than 1 and at most {MAX_WIDENING:g} "
                                 f"(1 widens nothing; above {MAX_WIDENING:g} is no longer the fit widened); got "
                                 f"{self.widening}")
        if int(self.max_candidates) < 1:
            raise ValueError(f"max_candidates must be a positive integer; got {self.max_candidates}")


@register
class ExclusionPrior(GaussianFitPrior):
    name = "exclusion"
    Config = ExclusionConfig
    summary = "the paper's Gaussian exclusion: a widened fit (x c_dim per axis) with its dense core rejected"

    @property
    def log_c(self) -> float:
        """log c, from `widening` when given (c itself may overflow a float), else from c."""
        if self.config.widening is not None:
            return 0.5 * self.dim * math.log(float(self.config.widening))
        return math.log(float(self.config.c))

    @property
    def c_dim(self) -> float:
        return math.exp(2.0 * self.log_c / self.dim)

    @property
    def expected_acceptance(self) -> float:
        return acceptance_from_log_c(self.log_c, self.dim)

    def widening_note(self) -> str:
        """The widening factor in words, with what it means at this width (for the UI, under `describe`)."""
        cd, d = self.c_dim, self.dim
        given = (f"given directly (c = {_fmt_big(self.log_c)})" if self.config.widening is not None
                 else f"from c={self.config.c:g} as c^(2/d)")
        text = (f"Widening factor c_dim = {cd:.4f} {given} at d={d}: each axis of the fit is "
                f"{(math.sqrt(cd) - 1) * 100:.1f}% wider.")
        if cd - 1.0 < NEARLY_FITTED:
            text += (f" That is nearly the fitted prior (the paper's c=5 gives {c_dim(5.0, d):.4f} here). A c that "
                     f"matters: widening=1.21 (10% wider per axis, c = {_fmt_big(0.5 * d * math.log(1.21))}).")
        return text

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        d, budget = self.dim, int(self.config.max_candidates)
        cd, rate = self.c_dim, self.expected_acceptance
        if rate * budget < n:
            raise SamplingError(self._budget_message(n, 0, 0, rate))
        # numpy draws the chi-square radii; its seed comes from the torch generator, so one seed fixes everything.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        log_c, half_gap = self.log_c, 0.5 * (cd - 1.0)
        kept: list[np.ndarray] = []
        have = candidates = 0
        while have < n:
            if candidates >= budget:
                raise SamplingError(self._budget_message(n, have, candidates, rate))
            want = math.ceil((n - have) / max(rate, 1e-9) * 1.25) + 64
            batch = max(1, min(want, budget - candidates, _MAX_BATCH))
            sq_norm = rng.chisquare(d, batch)  # |eps|² of each candidate, [batch]
            p_accept = np.clip(-np.expm1(log_c - half_gap * sq_norm), 0.0, None)  # 1 - pdf/pdf_wide
            idx = np.flatnonzero(rng.random(batch) < p_accept)[: n - have]
            if len(idx) and have + len(idx) == n:
                candidates += int(idx[-1]) + 1  # count only candidates up to the last one used
            else:
                candidates += batch
            kept.append(sq_norm[idx])
            have += len(idx)
        radius = torch.from_numpy(np.sqrt(np.concatenate(kept)))  # [n]
        direction = torch.randn(n, d, generator=generator, dtype=torch.float64)
        eps = direction / direction.norm(dim=1, keepdim=True) * radius[:, None]  # accepted N(0, I) draws, [n, d]
        self.last_stats = acceptance_stats(candidates, n) | {"expected_acceptance_rate": rate, "c_dim": cd}
        return self.fit.color(eps, scale=cd)

    def _budget_message(self, n: int, have: int, candidates: int, rate: float) -> str:
        return (
            f"exclusion prior: {have} of {n} samples after {candidates:,} candidates; the expected acceptance rate "
            f"for c_dim={self.c_dim:.4g} at d={self.dim} is {rate:.3g}, so about {n / max(rate, 1e-300):,.0f} "
            f"candidates are needed but max_candidates={self.config.max_candidates:,}. "
            "Raise c (or widening) or max_candidates."
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of the accepted samples' distribution, max(0, pdf_wide - pdf) / A, rows of x [m, d] -> [m]."""
        d, cd = self.dim, self.c_dim
        m2 = self.fit.whiten(x).pow(2).sum(1)  # squared Mahalanobis distance under the fit
        log_wide = -0.5 * (m2 / cd + d * math.log(cd) + self.fit.log_det + d * math.log(2 * math.pi))
        log_ratio = self.log_c - 0.5 * m2 * (1.0 - 1.0 / cd)  # log pdf - log pdf_wide
        inside = log_ratio < 0
        safe = torch.where(inside, log_ratio, torch.full_like(log_ratio, -1.0))
        out = log_wide + torch.log(-torch.expm1(safe)) - math.log(self.expected_acceptance)
        return torch.where(inside, out, torch.full_like(out, -math.inf))

    def describe(self) -> str:
        where = (f"c_dim={self.c_dim:.4f} given" if self.config.widening is not None
                 else f"c={self.config.c:g}, c_dim={self.c_dim:.4f}")
        text = (f"Gaussian exclusion, {where} (expected acceptance {self.expected_acceptance:.2%}) around the "
                f"{self.fit.describe()}")
        if self.c_dim - 1.0 < NEARLY_FITTED:
            text += (f". At d={self.dim}, c_dim={self.c_dim:.4f} widens each axis by only "
                     f"{(math.sqrt(self.c_dim) - 1) * 100:.1f}%: this is nearly the fitted prior. A c that matters: "
                     f"widening=1.21 (c={_fmt_big(0.5 * self.dim * math.log(1.21))}, 10% wider per axis)")
        return text


def _fmt_big(log_value: float) -> str:
    """exp(log_value) written without overflowing: '5', '7.0e+23', '1e+1151'."""
    if log_value < 700:
        return f"{math.exp(log_value):.3g}"
    exponent = math.floor(log_value / math.log(10))
    return f"{10 ** (log_value / math.log(10) - exponent):.2g}e+{exponent}"
