"""kNN low-density prior (planned in the paper, never built): fitted-Gaussian candidates kept only
where they are far from the reference cloud.

A candidate's distance to its k-th nearest reference point (scikit-learn
NearestNeighbors, brute force) measures how empty the cloud is around it. The
threshold is the `quantile` of that distance over a fixed calibration pool of
candidates, so about (1 - quantile) of candidates are kept: the Gaussian's draws
from the emptiest regions of the data. The reference is subsampled to
`max_reference` rows (seeded) to bound the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from core.models import LoadedModel
from core.priors.base import SamplingError, acceptance_stats, option, register
from core.priors.fit import ProgressFn, reference_cloud
from core.priors.fitted import FittedConfig, GaussianFitPrior


@dataclass
class KnnConfig(FittedConfig):
    k: int = option(10, "Neighbours: a candidate's density is read from its k-th nearest reference point.",
                    min=1, max=100)
    quantile: float = option(0.9, "Keep candidates whose k-NN distance is above this quantile (in [0, 1)).",
                             min=0.0, max=0.99, step=0.05)
    calibration: int = option(2000, "Candidates used to set the distance threshold.", min=100, max=20000)
    max_reference: int = option(20000, "Reference rows used for the neighbour search (seeded subsample).",
                                min=100, step=1000)
    max_candidates: int = option(1_000_000, "Candidate budget; sampling stops with an error past it.", min=1000)

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        if int(self.k) < 1:
            raise ValueError(f"k must be a positive integer; got {self.k}")
        if not 0.0 <= float(self.quantile) < 1.0:
            raise ValueError(f"quantile must be in [0, 1); got {self.quantile}")
        if int(self.calibration) < 10 or int(self.max_reference) < 2 or int(self.max_candidates) < 1:
            raise ValueError("calibration must be >= 10, max_reference >= 2 and max_candidates >= 1")


@register
class KnnLowDensityPrior(GaussianFitPrior):
    name = "knn_low_density"
    Config = KnnConfig
    summary = "fitted-Gaussian draws kept only far from the cloud (k-NN distance in an upper quantile)"

    def __init__(self, config: KnnConfig, lm: LoadedModel | None = None, dim: int | None = None,
                 reference: torch.Tensor | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(config, lm, dim, reference, progress)
        from sklearn.neighbors import NearestNeighbors

        cloud = reference if reference is not None else reference_cloud(
            lm, config.source, config.layer, config.n_docs, config.data_seed)
        cloud = torch.as_tensor(cloud, dtype=torch.float32).numpy()
        if len(cloud) <= config.k:
            raise ValueError(f"k={config.k} needs more than k reference points; the cloud has {len(cloud)}")
        if len(cloud) > config.max_reference:
            rows = np.random.default_rng(config.seed).choice(len(cloud), config.max_reference, replace=False)
            cloud = cloud[np.sort(rows)]
        self.index = NearestNeighbors(n_neighbors=int(config.k), algorithm="brute").fit(cloud)
        pool = self.fit.sample(int(config.calibration), torch.Generator().manual_seed(int(config.seed) + 7919))
        self.calibration_distances = self.knn_distance(pool)  # [calibration]
        self.threshold = float(np.quantile(self.calibration_distances, config.quantile))

    def knn_distance(self, x: torch.Tensor) -> np.ndarray:
        """Distance of each row of x [m, d] to its k-th nearest reference point -> [m]."""
        dist, _ = self.index.kneighbors(torch.as_tensor(x, dtype=torch.float32).numpy())
        return dist[:, -1]

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        keep_rate = max(1.0 - float(self.config.quantile), 1e-3)
        kept: list[torch.Tensor] = []
        have = candidates = 0
        while have < n:
            if candidates >= self.config.max_candidates:
                raise SamplingError(
                    f"knn_low_density: {have} of {n} samples after {candidates:,} candidates "
                    f"(max_candidates={self.config.max_candidates:,}); lower quantile or raise max_candidates"
                )
            batch = min(math.ceil((n - have) / keep_rate * 1.3) + 16, 4096,
                        int(self.config.max_candidates) - candidates)
            cand = self.fit.sample(batch, generator)
            good = torch.from_numpy(self.knn_distance(cand) >= self.threshold)
            idx = good.nonzero().squeeze(1)[: n - have]
            candidates += int(idx[-1]) + 1 if len(idx) and have + len(idx) == n else batch
            kept.append(cand[idx])
            have += len(idx)
        self.last_stats = acceptance_stats(candidates, n) | {"knn_threshold": self.threshold}
        return torch.cat(kept)

    def describe(self) -> str:
        c = self.config
        return (
            f"k-NN low density: {self.fit.describe()} draws whose distance to the {c.k}-th nearest reference point "
            f"is above the {c.quantile:g} quantile ({self.threshold:.3g})"
        )
