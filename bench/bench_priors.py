"""Gaussian exclusion prior: our batched, cached sampler against the reference notebook's loop.

Theirs (a faithful copy of the method the paper's notebooks used): fit the mean
and `torch.cov` of the cloud, build two `torch.distributions.MultivariateNormal`
(Sigma and c_dim * Sigma), then draw ONE candidate per Python iteration from the
wide one and accept it with probability max(0, 1 - pdf/pdf_wide). (The ratio
is taken in log space: exp(log_prob) overflows float32 at d=576.)

Ours: `make_prior("exclusion", reference=cloud)` (one-pass Ledoit-Wolf fit and
Cholesky, then candidates in batches, see core/priors/exclusion.py).

- cold: the fit is included (from the [N, d] cloud in memory, nothing cached);
- warm: a second call on the same reference cloud: the fit is kept (ours: the
  same prior object; theirs: the two distributions already built, loop only).

Clouds: d=576 is SmolLM2's token-embedding matrix [49152, 576]; d=2048 is a
synthetic [49152, 2048] cloud: the token embeddings through a fixed random
projection (seed 0, N(0, 1/576) entries) plus isotropic Gaussian noise with
0.3x the projected cloud's mean per-dimension std (so the covariance has full rank).

Theirs for 2,000 samples would loop over 50k-100k candidates (minutes at d=2048):
the loop runs a fixed number of candidates and its time is extrapolated from
its measured per-candidate time and its measured acceptance rate; the output
says where. Run: `.venv/bin/python bench/bench_priors.py` (a few minutes on 2 cores); it first
prints each prior's medians over 20 samples on the embedded model (`--skip-table` to omit).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributions import MultivariateNormal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from core.models import load_model  # noqa: E402
from core.priors import expected_acceptance, make_prior  # noqa: E402


def reference_fit(cloud: torch.Tensor, c: float) -> tuple[MultivariateNormal, MultivariateNormal]:
    """The notebook's fit: mean, torch.cov, and the narrow and wide Gaussians."""
    mean = cloud.mean(0)
    cov = torch.cov(cloud.T)
    dim = cloud.shape[1]
    c_dim = math.exp((2 / dim) * math.log(c))
    return MultivariateNormal(mean, covariance_matrix=cov), MultivariateNormal(mean, covariance_matrix=c_dim * cov)


def reference_loop(narrow: MultivariateNormal, wide: MultivariateNormal, n: int, max_candidates: int | None = None,
                   seed: int = 0) -> tuple[list[torch.Tensor], int]:
    """One candidate per iteration until n accepted (or max_candidates tried): (samples, candidates)."""
    torch.manual_seed(seed)
    samples, candidates = [], 0
    while len(samples) < n and (max_candidates is None or candidates < max_candidates):
        x = wide.sample()
        candidates += 1
        p = max(0.0, 1.0 - float(torch.exp(narrow.log_prob(x) - wide.log_prob(x))))
        if torch.rand(1).item() < p:
            samples.append(x)
    return samples, candidates


def timed(fn, repeat: int = 1):  # noqa: ANN001, ANN201
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def synthetic_cloud(emb: torch.Tensor, dim: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(emb.shape[1], dim, generator=g) / math.sqrt(emb.shape[1])
    cloud = emb @ proj  # [N, dim], rank 576
    noise_std = 0.3 * float(cloud.std(0).mean())
    return cloud + noise_std * torch.randn(cloud.shape, generator=g)


def bench_width(name: str, cloud: torch.Tensor, sizes: list[int], c: float, loop_cap: int) -> list[str]:
    d = cloud.shape[1]
    results = []
    fit_t, (narrow, wide) = timed(lambda: reference_fit(cloud, c))
    ours_fit_t, prior = timed(lambda: make_prior("exclusion", reference=cloud, c=c), repeat=2)
    print(f"[{name}] cloud {tuple(cloud.shape)}; expected acceptance {expected_acceptance(c, d):.4f}; "
          f"fit: theirs {fit_t:.3f} s (torch.cov + 2 MultivariateNormal), ours {ours_fit_t:.3f} s "
          f"(Ledoit-Wolf shrinkage {prior.fit.shrinkage:.4g} + Cholesky)")
    for n in sizes:
        needed = n / expected_acceptance(c, d)
        cap = None if needed * 1.5 < loop_cap else loop_cap
        loop_t, (samples, cand) = timed(lambda n=n, cap=cap: reference_loop(narrow, wide, n, cap))
        rate = len(samples) / cand
        if cap is None:
            theirs_warm, how = loop_t, f"full loop, {cand:,} candidates, acceptance {rate:.4f}"
        else:
            per_cand = loop_t / cand
            theirs_warm = per_cand * n / rate
            how = (f"EXTRAPOLATED from {cand:,} candidates ({per_cand * 1e3:.3f} ms each, measured acceptance "
                   f"{rate:.4f}) to {n / rate:,.0f} candidates")
        ours_cold, _ = timed(lambda n=n: make_prior("exclusion", reference=cloud, c=c).sample(n, seeded()), repeat=1)
        ours_warm, _ = timed(lambda n=n: prior.sample(n, seeded()), repeat=3)
        stats = prior.last_stats
        theirs_cold = fit_t + theirs_warm
        print(f"[{name}] n={n}: theirs warm {theirs_warm:.3f} s ({how}); theirs cold {theirs_cold:.3f} s; "
              f"ours cold {ours_cold:.3f} s, warm {ours_warm:.4f} s ({stats['candidates']:,} candidates, "
              f"acceptance {stats['acceptance_rate']:.4f})")
        for mode, ours, theirs in (("cold", ours_cold, theirs_cold), ("warm", ours_warm, theirs_warm)):
            results.append(f"RESULT exclusion_{mode}_n{n}_d{d} ratio={theirs / ours:.1f} ours={ours:.4f} "
                           f"theirs={theirs:.4f} unit=s")
    return results


def prior_table(lm, n: int = 20) -> None:  # noqa: ANN001
    """Each prior's default on the embedded model: medians over n samples (seed 0) of the Prior lab's measures."""
    from core.priors import PRIOR_NAMES
    from core.priors.report import sample_report

    print(f"prior table: {n} samples per prior (generator seed 0), embedded model, default options")
    for name in PRIOR_NAMES:
        prior = make_prior(name, lm=lm)
        x = prior.sample(n, torch.Generator().manual_seed(0))
        _, s = sample_report(lm, prior, x)
        maha = "; ".join(f"{s[k]:.1f} ({s[k.removeprefix('median_') + '_fit']})"
                         for k in s if k.startswith("median_mahalanobis"))
        rate = f" acceptance {s['acceptance_rate']:.4f} of {s['candidates']:,}" if "acceptance_rate" in s else ""
        print(f"  {name:16s} median nearest-token cos {s['median_nearest_cos']:.3f}  median Mahalanobis {maha}  "
              f"median norm ratio {s['median_norm_ratio']:.2f}{rate}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c", type=float, default=5.0)
    parser.add_argument("--loop-cap", type=int, default=4000, help="candidates the reference loop runs before "
                        "its time is extrapolated")
    parser.add_argument("--skip-table", action="store_true", help="skip the per-prior table of medians")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows both sides)")
    lm = load_model(device="cpu")
    emb = lm.input_embeddings()
    if not args.skip_table:
        prior_table(lm)
    results = bench_width("d=576 tokens", emb, [20, 2000], args.c, args.loop_cap)
    del lm
    results += bench_width("d=2048 synthetic", synthetic_cloud(emb), [20, 2000], args.c, args.loop_cap)
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
