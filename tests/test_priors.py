"""Priors: statistics of every sampler, exact fits, determinism, and every documented error.

Unit tests run on the tiny random LLaMA (d=64) or on synthetic clouds; the
`integration` ones on the embedded SmolLM2 (d=576).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core.priors import (
    PRIOR_NAMES,
    SamplingError,
    expected_acceptance,
    fit_gaussian,
    fitted_gaussian,
    make_prior,
    prior_from_params,
    prior_options,
)
from core.priors.fit import clear_memory_cache, ledoit_wolf

ALL = ["gaussian", "xavier", "fitted", "exclusion", "interpolation", "vae", "gaussian_tokens", "vocab", "text",
       "knn_low_density"]
FAST_OPTS = {  # small clouds and short training keep the unit set fast on 2 CPU cores
    "interpolation": {"n_docs": 8},
    "vae": {"n_docs": 8, "steps": 60},
    "knn_low_density": {"max_reference": 3000, "calibration": 500},
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_cloud(n: int, d: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """[n, d] Gaussian cloud with a random full covariance and mean `shift` in every coordinate."""
    g = gen(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    return torch.randn(n, d, generator=g) @ mix.T + shift + 0.1 * torch.randn(d, generator=g)


# --------------------------------------------------------------------------- registry and errors


def test_registry_lists_every_prior():
    assert sorted(PRIOR_NAMES) == sorted(ALL)
    for name in ALL:
        assert all("help" in f.metadata for f in prior_options(name)), name


def test_unknown_name_and_option_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown prior 'gausian'; choose one of .*gaussian"):
        make_prior("gausian", dim=8)
    with pytest.raises(ValueError, match="no option sigmaa; its options are .*sigma"):
        make_prior("gaussian", dim=8, sigmaa=0.1)
    with pytest.raises(ValueError, match="takes no reference"):
        make_prior("gaussian", dim=8, reference=torch.zeros(10, 8))


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("gaussian", {"sigma": -0.1}, "sigma must be a positive"),
        ("gaussian", {"sigma": 0.0}, "sigma must be a positive"),
        ("exclusion", {"c": 1.0}, "c must be a finite number greater than 1"),
        ("exclusion", {"c": 0.5}, "greater than 1"),
        ("exclusion", {"widening": 1.0}, r"widening \(c_dim\) must be a number greater than 1 and at most 100"),
        ("exclusion", {"widening": 0.5}, r"widening \(c_dim\) must be .* got 0.5"),
        ("exclusion", {"widening": 150.0}, "no longer the fit widened"),
        ("exclusion", {"widening": float("nan")}, "widening"),
        ("interpolation", {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ("interpolation", {"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ("fitted", {"source": "squad", "layer": 5}, r"layer 5 is past the depth .* allowed 0..4"),
        ("fitted", {"source": "tokens", "layer": 2}, "layer applies only to a dataset source"),
        ("fitted", {"source": "wiki"}, "source must be one of tokens, c4, squad, math"),
        ("fitted", {"covariance": "banded"}, "covariance must be one of full, diagonal"),
        ("fitted", {"shrinkage": 2.0}, r"shrinkage must be in \[0, 1\]"),
        ("knn_low_density", {"quantile": 1.0}, r"quantile must be in \[0, 1\)"),
        ("vae", {"latent_dim": 0}, "latent_dim must be a positive integer"),
        ("text", {"text": "  "}, "text must be a non-empty string"),
        ("gaussian", {"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_invalid_parameters_raise(tiny_lm, name, opts, match):
    with pytest.raises(ValueError, match=match):
        make_prior(name, lm=tiny_lm, **opts)


def test_string_options_from_a_command_line_are_typed():
    prior = make_prior("interpolation", reference_a=torch.randn(50, 8), reference_b=torch.randn(50, 8) + 1,
                       alpha="none", seed="3")
    assert prior.config.alpha is None and prior.config.seed == 3
    assert make_prior("gaussian", dim=8, sigma="0.05").config.sigma == 0.05
    with pytest.raises(ValueError, match="option sigma expects float; got 'abc'"):
        make_prior("gaussian", dim=8, sigma="abc")


def test_bad_sample_count_and_missing_model(tiny_lm):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        make_prior("gaussian", dim=8).sample(0)
    with pytest.raises(ValueError, match="needs lm= .* or dim="):
        make_prior("gaussian").sample(3)
    with pytest.raises(ValueError, match="pass lm= .* or reference="):
        make_prior("fitted")
    with pytest.raises(ValueError, match="dim=32 disagrees with the model's width 64"):
        make_prior("gaussian", lm=tiny_lm, dim=32)


def test_non_finite_cloud_is_refused():
    cloud = torch.randn(50, 8)
    cloud[7, 3] = float("nan")
    for covariance in ("full", "diagonal"):
        with pytest.raises(ValueError, match="non-finite values"):
            fit_gaussian(cloud, covariance)


def test_too_few_points_to_fit():
    with pytest.raises(ValueError, match="too few points to fit a Gaussian: 5 rows, at least 8"):
        make_prior("fitted", reference=torch.randn(5, 16))


def test_exclusion_budget_error():
    prior = make_prior("exclusion", reference=correlated_cloud(200, 16), c=1.01, max_candidates=1000)
    with pytest.raises(SamplingError, match=r"max_candidates=1,000. Raise c \(or widening\) or max_candidates"):
        prior.sample(500)


# --------------------------------------------------------------------------- every prior on the tiny model


@pytest.mark.parametrize("name", ALL)
def test_every_prior_samples_deterministically(tiny_lm, name):
    prior = make_prior(name, lm=tiny_lm, **FAST_OPTS.get(name, {}))
    a = prior.sample(12, gen(3))
    b = prior.sample(12, gen(3))
    assert a.shape == (12, 64) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.equal(prior.sample(12), prior.sample(12))  # config.seed when no generator
    if name != "text":  # the text init does not depend on the seed
        assert not torch.equal(a, prior.sample(12, gen(4)))
    params = json.loads(json.dumps(prior.params))
    assert params["name"] == name and params["dim"] == 64
    rebuilt = prior_from_params(params, lm=tiny_lm)
    assert torch.equal(rebuilt.sample(12, gen(3)), a)
    assert isinstance(prior.describe(), str) and prior.describe()


# --------------------------------------------------------------------------- statistics


def test_gaussian_std_and_density():
    prior = make_prior("gaussian", dim=64, sigma=0.05)
    x = prior.sample(4000, gen())
    assert abs(float(x.std()) - 0.05) < 0.05 * 0.02
    assert abs(float(x.mean())) < 0.001
    ref = torch.distributions.Normal(0.0, 0.05).log_prob(x[:5].double()).sum(1)
    torch.testing.assert_close(prior.log_prob(x[:5]), ref)


def test_token_scale_gaussian_takes_sigma_from_the_token_embeddings(tiny_lm):
    from core.priors.gaussian import token_rms

    prior = make_prior("gaussian_tokens", lm=tiny_lm)
    rms = float(tiny_lm.input_embeddings().pow(2).mean().sqrt())
    assert token_rms(tiny_lm) == pytest.approx(rms, rel=1e-5)
    x = prior.sample(4000, gen())
    assert float(x.std()) == pytest.approx(rms, rel=0.02)
    assert f"{rms:.4g}" in prior.describe()
    with pytest.raises(ValueError, match="gaussian_tokens prior takes its sigma from the model's token embeddings"):
        make_prior("gaussian_tokens", dim=64)


def test_xavier_bound_and_spread():
    prior = make_prior("xavier", dim=64)
    x = prior.sample(20, gen())
    bound = math.sqrt(6 / (20 + 64))
    assert float(x.abs().max()) <= bound
    assert abs(float(x.std()) - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.isfinite(prior.log_prob(x)).all()
    assert prior.log_prob(x * 10).isinf().all()


def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import LedoitWolf

    x = correlated_cloud(300, 40)
    mean, cov, shrink = ledoit_wolf(x)
    sk = LedoitWolf().fit(x.double().numpy())
    assert shrink == pytest.approx(sk.shrinkage_, rel=1e-5)
    np.testing.assert_allclose(cov.numpy(), sk.covariance_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean.numpy(), sk.location_, atol=1e-6)


def test_singular_covariance_is_shrunk_or_ridged():
    x = torch.randn(10, 64, generator=gen())  # rank <= 9 in 64 dims
    shrunk = fit_gaussian(x)
    assert shrunk.shrinkage > 0 and shrunk.ridge == 0
    assert "Ledoit-Wolf shrinkage" in shrunk.describe()
    ridged = fit_gaussian(x, shrinkage=0.0)
    assert ridged.ridge > 0 and "ridge" in ridged.describe()
    assert torch.isfinite(ridged.mahalanobis(torch.randn(3, 64))).all()


def test_mahalanobis_and_log_prob_match_explicit_formulas():
    fit = fit_gaussian(correlated_cloud(500, 16))
    x = torch.randn(7, 16, generator=gen(1)).double()
    diff = x - fit.mean
    m2 = torch.einsum("md,de,me->m", diff, torch.linalg.inv(fit.cov), diff)
    torch.testing.assert_close(fit.mahalanobis(x), m2.sqrt())
    torch.testing.assert_close(fit.precision, torch.linalg.inv(fit.cov))
    mvn = torch.distributions.MultivariateNormal(fit.mean, fit.cov)
    torch.testing.assert_close(fit.log_prob(x), mvn.log_prob(x))


def test_fitted_matches_cloud_mean_and_spread():
    cloud = correlated_cloud(4000, 32, shift=1.0)
    for covariance in ("full", "diagonal"):
        prior = make_prior("fitted", reference=cloud, covariance=covariance)
        x = prior.sample(20000, gen()).double()
        c = cloud.double()
        torch.testing.assert_close(x.mean(0), c.mean(0), atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), c.std(0), atol=0, rtol=0.05)
    assert "diagonal covariance" in prior.describe()


def test_exclusion_lies_further_out_at_the_expected_rate():
    cloud = correlated_cloud(3000, 64)
    fitted = make_prior("fitted", reference=cloud)
    excl = make_prior("exclusion", reference=cloud, c=5.0)
    x_fit, x_exc = fitted.sample(2000, gen()), excl.sample(2000, gen())
    m_fit, m_exc = fitted.fit.mahalanobis(x_fit), excl.fit.mahalanobis(x_exc)
    assert float(m_exc.median()) > float(m_fit.median()) + 0.3
    # Accepted points satisfy pdf < pdf_wide, i.e. Mahalanobis^2 > d log(c_dim) / (1 - 1/c_dim).
    cd = excl.c_dim
    assert float(m_exc.min()) ** 2 > 64 * math.log(cd) / (1 - 1 / cd) - 1e-6
    z = excl.fit.whiten(x_exc) / math.sqrt(cd)  # the accepted standard-normal draws, [2000, 64]
    assert float(z.mean(0).abs().max()) < 0.15  # directions uniform: no preferred side
    cov = z.T @ z / len(z)
    assert float((cov.diagonal() / cov.diagonal().mean() - 1).abs().max()) < 0.2  # isotropic
    assert float((cov - torch.diag(cov.diagonal())).abs().max()) < 0.15 * float(cov.diagonal().mean())
    stats = excl.last_stats
    expected = expected_acceptance(5.0, 64)  # 11.3%
    sd = math.sqrt(expected * (1 - expected) / stats["candidates"])
    assert abs(stats["acceptance_rate"] - expected) < 4 * sd
    assert f"{expected:.2%}" in excl.describe()


def test_exclusion_matches_the_papers_procedure_run_literally():
    # The paper's procedure with full d-dim candidates and both densities evaluated, vectorised here;
    # its accepted points must have the same Mahalanobis distribution as our sampler's.
    from scipy.stats import ks_2samp

    excl = make_prior("exclusion", reference=correlated_cloud(2000, 16), c=5.0)
    fit, cd = excl.fit, excl.c_dim
    wide = torch.distributions.MultivariateNormal(fit.mean, cd * fit.cov)
    narrow = torch.distributions.MultivariateNormal(fit.mean, fit.cov)
    torch.manual_seed(0)
    cand = wide.sample((60000,))
    p = (1 - (narrow.log_prob(cand) - wide.log_prob(cand)).exp()).clamp_min(0)
    literal = cand[torch.rand(len(cand), dtype=torch.float64) < p]
    ours = excl.sample(len(literal), gen(1))
    assert len(literal) / len(cand) == pytest.approx(expected_acceptance(5.0, 16), abs=0.01)
    assert ks_2samp(fit.mahalanobis(literal).numpy(), fit.mahalanobis(ours).numpy()).pvalue > 1e-3
    assert ks_2samp(literal[:, 0].numpy(), ours[:, 0].numpy()).pvalue > 1e-3


def test_exclusion_log_prob_is_normalised():
    # Importance check: E_wide[p_excl(x) / p_wide(x)] = 1 when log_prob integrates to one.
    cloud = correlated_cloud(2000, 16)
    excl = make_prior("exclusion", reference=cloud, c=5.0)
    wide = excl.fit.sample(40000, gen(2), scale=excl.c_dim)
    m2 = excl.fit.whiten(wide).pow(2).sum(1)
    log_wide = -0.5 * (m2 / excl.c_dim + 16 * math.log(excl.c_dim) + excl.fit.log_det + 16 * math.log(2 * math.pi))
    ratio = (excl.log_prob(wide) - log_wide).exp()
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.04)


def test_exclusion_widening_sets_c_dim_directly_and_samples_widen():
    # At d=576 the paper's c=5 is c_dim 1.0056 (nearly the fit); widening=1.21 needs c = 1.21^288 ~ 7e23,
    # and widening=4 needs c = 4^288, past a float: both go through log c.
    cloud = torch.from_numpy(np.random.default_rng(3).normal(size=(1500, 576)).astype(np.float32))
    paper = make_prior("exclusion", reference=cloud, c=5.0)
    wide = make_prior("exclusion", reference=cloud, widening=1.21)
    huge = make_prior("exclusion", reference=cloud, widening=4.0)
    assert paper.c_dim == pytest.approx(1.0056, abs=1e-4) and wide.c_dim == pytest.approx(1.21)
    assert huge.c_dim == pytest.approx(4.0) and math.isfinite(huge.expected_acceptance)
    assert "nearly the fitted prior" in paper.widening_note() and "widening=1.21" in paper.widening_note()
    assert "c_dim = 1.2100 given directly (c = 6.95e+23)" in wide.widening_note()
    assert "nearly the fitted prior" not in wide.describe() and "c_dim=1.2100" in wide.describe()
    # squared Mahalanobis distance under the fit over d: about c_dim for the widened prior (its rejected core is
    # small), and for c=5 just past 1 (only the outer half of the fit's shell, |eps|^2 > q0 = 575, is kept)
    m2_paper = float(paper.fit.whiten(paper.sample(400, gen())).pow(2).sum(1).mean()) / 576
    m2_wide = float(wide.fit.whiten(wide.sample(400, gen())).pow(2).sum(1).mean()) / 576
    assert 1.0 < m2_paper < 1.12 and m2_wide == pytest.approx(1.21, abs=0.05)
    assert float(wide.log_prob(wide.sample(5, gen())).isfinite().all())


def test_interpolation_lies_between_the_two_means():
    a, b = correlated_cloud(1500, 24, seed=1, shift=2.0), correlated_cloud(1500, 24, seed=2, shift=-2.0)
    fixed = make_prior("interpolation", reference_a=a, reference_b=b, alpha=0.3)
    pos = fixed.position(fixed.sample(2000, gen()))
    assert float(pos.mean()) == pytest.approx(0.3, abs=0.02)
    uniform = make_prior("interpolation", reference_a=a, reference_b=b)
    pos = uniform.position(uniform.sample(2000, gen()))
    assert float(pos.mean()) == pytest.approx(0.5, abs=0.03)
    assert float(pos.quantile(0.05)) < 0.15 and float(pos.quantile(0.95)) > 0.85
    x = fixed.sample(5, gen())
    mvn = torch.distributions.MultivariateNormal(
        0.3 * fixed.fit_a.mean + 0.7 * fixed.fit_b.mean, 0.09 * fixed.fit_a.cov + 0.49 * fixed.fit_b.cov)
    torch.testing.assert_close(fixed.log_prob(x), mvn.log_prob(x.double()))
    with pytest.raises(NotImplementedError, match="fix alpha"):
        uniform.log_prob(x)


def test_interpolation_on_model_activations(tiny_lm):
    prior = make_prior("interpolation", lm=tiny_lm, n_docs=8, alpha=0.5)
    assert "math activations at layer 4" in prior.describe() and "c4 activations at layer 4" in prior.describe()
    assert float(prior.position(prior.sample(400, gen())).mean()) == pytest.approx(0.5, abs=0.05)


def test_vae_learns_a_low_rank_cloud_and_reports_diagnostics():
    g = gen(5)
    cloud = torch.randn(3000, 4, generator=g) @ torch.randn(4, 32, generator=g) + 0.05 * torch.randn(3000, 32,
                                                                                                      generator=g)
    prior = make_prior("vae", reference=cloud, latent_dim=8, steps=400)
    diag = prior.diagnostics
    assert 3 <= diag["active_units"] <= 8  # about the 4 true factors, not all 8 dims
    assert diag["recon_rel_error"] < 0.2
    assert 0.3 < diag["spread_ratio"] < 2.0
    x = prior.sample(500, gen())
    assert float(x.var(0).sum() / cloud.var(0).sum()) == pytest.approx(diag["spread_ratio"], rel=0.25)


def test_vae_samples_carry_the_decoders_noise():
    # A structureless cloud: 2 latent dims cannot explain 32 independent ones, so the decoder learns a large
    # output variance and the samples' spread comes from that noise, not from the decoded means.
    cloud = torch.randn(3000, 32, generator=gen(6)) * 3.0 + 1.0
    prior = make_prior("vae", reference=cloud, latent_dim=2, steps=300)
    diag = prior.diagnostics
    assert diag["noise_std"] > 0.5 and diag["noise_share"] > 0.5  # learned variance, not the initial 1 by chance
    assert diag["spread_ratio_mean"] < 0.5 < diag["spread_ratio"]
    total = float(cloud.var(0).sum())
    noisy = prior.sample(2000, gen())
    assert float(noisy.var(0).sum()) / total == pytest.approx(diag["spread_ratio"], rel=0.1)
    means = make_prior("vae", reference=cloud, latent_dim=2, steps=300, decoder_noise=False).sample(2000, gen())
    assert float(means.var(0).sum()) / total == pytest.approx(diag["spread_ratio_mean"], rel=0.15)
    assert "decoded means alone" in prior.describe()


def test_vae_spread_by_seed_fits_the_last_layer(tiny_lm):
    from core.priors.vae import spread_by_seed

    out = spread_by_seed(tiny_lm, seeds=(0, 1), n_docs=8, steps=60)
    assert out["layer"] == out["num_layers"] == tiny_lm.num_layers == 4
    assert "squad activations at layer 4" in out["describe"]
    assert [r["seed"] for r in out["seeds"]] == [0, 1]
    assert all(r["spread_ratio"] >= r["spread_ratio_mean"] > 0 for r in out["seeds"])
    assert out["seeds"][0]["spread_ratio"] != out["seeds"][1]["spread_ratio"]  # training seeds differ


def test_vae_training_is_cached(tiny_lm):
    first = make_prior("vae", lm=tiny_lm, n_docs=8, steps=60)
    second = make_prior("vae", lm=tiny_lm, n_docs=8, steps=60)
    assert second.diagnostics["cached"] is True
    assert torch.equal(first.sample(5, gen()), second.sample(5, gen()))


def test_vocab_samples_real_distinct_tokens(tiny_lm):
    prior = make_prior("vocab", lm=tiny_lm)
    x = prior.sample(50, gen())
    emb = tiny_lm.input_embeddings()
    assert torch.equal(x, emb[prior.last_token_ids])
    assert len(set(prior.last_token_ids.tolist())) == 50
    assert not set(prior.last_token_ids.tolist()) & set(tiny_lm.tokenizer.all_special_ids)


def test_text_tiles_and_cuts(tiny_lm):
    prior = make_prior("text", lm=tiny_lm, text="two plus two")
    t = len(prior.token_ids)
    long, short = prior.sample(2 * t + 1), prior.sample(t - 1)
    assert torch.equal(long[:t], long[t:2 * t]) and torch.equal(long[2 * t], long[0])
    assert torch.equal(short, tiny_lm.input_embeddings()[prior.token_ids[: t - 1]])


def test_knn_low_density_keeps_the_far_candidates():
    cloud = correlated_cloud(3000, 16)
    prior = make_prior("knn_low_density", reference=cloud, quantile=0.8, k=5, calibration=1000)
    x = prior.sample(300, gen())
    assert (prior.knn_distance(x) >= prior.threshold - 1e-6).all()
    assert prior.last_stats["acceptance_rate"] == pytest.approx(0.2, abs=0.05)
    plain = make_prior("fitted", reference=cloud).sample(300, gen(1))
    assert np.median(prior.knn_distance(x)) > np.median(prior.knn_distance(plain))


def test_progress_is_reported_while_activations_are_computed(tiny_lm, tmp_path, monkeypatch):
    import core.activations
    import core.priors.fit

    def fresh(name):
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        return path

    monkeypatch.setattr(core.activations, "cache_subdir", fresh)  # the fits' cache is one of the activations'
    clear_memory_cache()
    seen = []
    make_prior("fitted", lm=tiny_lm, source="math", layer=2, n_docs=4, progress=seen.append)
    assert seen and seen[-1] == pytest.approx(1.0)
    make_prior("gaussian", lm=tiny_lm, progress=seen.append)  # needs no activations: accepted, unused
    clear_memory_cache()


def test_a_damaged_fit_cache_is_set_aside_and_the_fit_recomputed(tiny_lm, tmp_path, monkeypatch):
    import core.activations

    monkeypatch.setattr(core.activations, "cache_subdir", lambda name: (tmp_path / name).mkdir(exist_ok=True)
                        or tmp_path / name)
    clear_memory_cache()
    first = fitted_gaussian(tiny_lm)
    (tmp_path / "priors" / "cache.db").write_bytes(b"this is not sqlite" * 100)  # as after a crash mid-write
    clear_memory_cache()
    again = fitted_gaussian(tiny_lm)
    assert torch.equal(again.chol, first.chol) and list(tmp_path.glob("priors.damaged-*"))
    clear_memory_cache()


def test_fit_is_cached_in_memory_and_on_disk(tiny_lm):
    first = fitted_gaussian(tiny_lm)
    assert fitted_gaussian(tiny_lm) is first
    clear_memory_cache()
    again = fitted_gaussian(tiny_lm)
    assert again is not first and torch.equal(again.chol, first.chol)
    assert fitted_gaussian(tiny_lm, covariance="diagonal").covariance == "diagonal"


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.integration
def test_token_priors_on_the_embedded_model(real_lm):
    fitted = make_prior("fitted", lm=real_lm)
    emb = real_lm.input_embeddings().double()
    x = fitted.sample(5000, gen()).double()
    assert float((x.mean(0) - emb.mean(0)).abs().max()) < 0.02
    assert float((x.std(0) / emb.std(0)).median()) == pytest.approx(1.0, abs=0.05)
    excl = make_prior("exclusion", lm=real_lm)
    xe = excl.sample(2000, gen())
    expected = expected_acceptance(5.0, 576)
    assert expected == pytest.approx(0.0378, abs=0.001)
    sd = math.sqrt(expected * (1 - expected) / excl.last_stats["candidates"])
    assert abs(excl.last_stats["acceptance_rate"] - expected) < 4 * sd
    assert float(excl.fit.mahalanobis(xe).median()) > float(fitted.fit.mahalanobis(x[:2000]).median())
    gauss = make_prior("gaussian", lm=real_lm).sample(2000, gen())
    assert float(gauss.std()) == pytest.approx(0.02, rel=0.01)


@pytest.mark.integration
@pytest.mark.parametrize("name", ALL)
def test_every_prior_on_the_embedded_model(real_lm, name, real_prior_options):
    prior = make_prior(name, lm=real_lm, **real_prior_options(name))
    x = prior.sample(20, gen())
    assert x.shape == (20, 576) and torch.isfinite(x).all()
    assert torch.equal(x, prior.sample(20, gen()))


@pytest.mark.integration
def test_interpolation_between_math_and_c4_on_the_embedded_model(real_lm, real_prior_options):
    prior = make_prior("interpolation", lm=real_lm, **real_prior_options("interpolation"))
    assert "layer 30" in prior.describe()
    pos = prior.position(prior.sample(500, gen()))
    assert float(pos.mean()) == pytest.approx(0.5, abs=0.1)
    assert float(pos.quantile(0.1)) > -0.5 and float(pos.quantile(0.9)) < 1.5


# --------------------------------------------------------------------------- what the Prior lab shows


def test_sample_report_and_view(tiny_lm):
    from core.priors.report import prior_view, sample_report

    vocab = make_prior("vocab", lm=tiny_lm)
    x = vocab.sample(6, gen())
    table, summary = sample_report(tiny_lm, vocab, x)
    assert list(table["nearest_cos"].round(4)) == [1.0] * 6  # a token's own embedding is its nearest token
    assert summary["median_nearest_cos"] == pytest.approx(1.0)
    assert table["mahalanobis"].notna().all() and summary["mahalanobis_fit"] == "token embeddings"
    excl = make_prior("exclusion", lm=tiny_lm)
    _, summary = sample_report(tiny_lm, excl, excl.sample(6, gen()))
    assert summary["acceptance_rate"] == excl.last_stats["acceptance_rate"]
    view = prior_view(tiny_lm, excl, excl.sample(6, gen()), max_reference=300)
    frame = view.frame
    assert (frame["group"] == "sample").sum() == 6 and (frame["group"] == "token embeddings").sum() == 300
    assert {"x", "y", "label", "norm"} <= set(frame.columns) and view.x_label.startswith("PC1")
    with pytest.raises(ValueError, match="samples must be"):
        sample_report(tiny_lm, excl, torch.zeros(3, 5))
