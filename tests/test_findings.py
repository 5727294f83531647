"""Verdicts with statistics: the claims' tests (scipy.stats) and the findings built on them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core import findings as fd
from core.analysis import claims

FIELDS = {"key", "claim", "test", "effect", "ci", "n", "verdict", "measured", "why", "rule"}


def test_tost_equivalence_and_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.00, 0.01, 8), rng.normal(1.00, 0.01, 8)
    same = claims.tost(a, b, margin=0.05)
    assert same["p_value"] < 0.05 and same["ci90"][0] > -0.05 and same["ci90"][1] < 0.05
    far = claims.tost(a + 0.2, b, margin=0.05)
    assert far["p_value"] > 0.5 and far["ci90"][0] > 0.05


def test_spearman_ci_and_bootstrap_edge_cases():
    x = np.arange(10.0)
    res = claims.spearman_ci(x, 2 * x + 1)
    assert res["rho"] == pytest.approx(1.0) and res["ci"][0] == pytest.approx(1.0) and res["n"] == 10
    assert math.isnan(claims.spearman_ci(x[:2], x[:2])["rho"])
    assert all(math.isnan(v) for v in claims.bootstrap_ci((np.array([1.0]),), np.mean))
    low, high = claims.bootstrap_ci((np.array([2.0, 2.0, 2.0]),), np.mean)  # degenerate: one value
    assert low == high == 2.0


def test_verdict_from_ci():
    assert claims.verdict_from_ci((0.1, 0.3), agrees_above=0) == "agrees"
    assert claims.verdict_from_ci((-0.3, -0.1), agrees_above=0) == "does not agree"
    assert claims.verdict_from_ci((-0.1, 0.1), agrees_above=0) == "inconclusive"
    assert claims.verdict_from_ci((-0.3, -0.1), agrees_below=0) == "agrees"
    assert claims.verdict_from_ci((math.nan, math.nan), agrees_below=0) == "inconclusive"


def _runs(per_prior: dict[str, list[float]], **cols) -> pd.DataFrame:
    rows = []
    for prior, losses in per_prior.items():
        for seed, loss in enumerate(losses):
            rows.append({"method": "soft", "dataset": "math", "prior": prior, "seed": seed,
                         "final_val_loss": loss, "best_val_loss": loss, **{k: v(prior, seed) for k, v in cols.items()}})
    return pd.DataFrame(rows)


def test_quality_needs_five_seeds_and_then_tests_equivalence():
    rng = np.random.default_rng(1)
    few = _runs({"gaussian": [1.50, 1.52], "xavier": [1.51, 1.49]})
    f = fd.quality_finding(few)
    assert f["verdict"] == "inconclusive" and "at least 5 seeds" in f["why"]
    assert FIELDS <= set(f) and f["rule"]["margin_relative"] == 0.05
    same = _runs({"gaussian": list(1.5 + rng.normal(0, 0.005, 6)), "xavier": list(1.5 + rng.normal(0, 0.005, 6))})
    f = fd.quality_finding(same)
    assert f["verdict"] == "agrees" and f["n"] == 12 and f["ci"][0] < f["effect"] < f["ci"][1]
    apart = _runs({"gaussian": list(1.5 + rng.normal(0, 0.005, 6)), "xavier": list(2.0 + rng.normal(0, 0.005, 6))})
    assert fd.quality_finding(apart)["verdict"] == "does not agree"
    # with a held-out loss for every run, that is what is compared (the validation loss chose the kept prompt)
    held_out = apart.assign(eval_answer_loss=1.5 + rng.normal(0, 0.005, len(apart)))
    f = fd.quality_finding(held_out)
    assert f["verdict"] == "agrees" and f["numbers"]["measure"] == "eval_answer_loss"
    assert "held-out answer-token loss" in f["measured"]


def test_speed_rank_correlation_with_ci():
    far = {"gaussian": 0.8, "fitted": 1.2}
    table = _runs({"gaussian": [1.0] * 5, "fitted": [1.0] * 5},
                  init_manifold_ratio=lambda p, s: far[p] + 0.01 * s,
                  steps_to_loss=lambda p, s: (10 if p == "gaussian" else 40) + s, target_loss=lambda p, s: 1.0)
    f = fd.speed_finding(table)
    assert f["verdict"] == "agrees" and f["effect"] > 0.8 and f["ci"][0] > 0
    assert f["test"].startswith("Spearman")


def test_collapse_finding_reports_step0_and_is_inconclusive_with_few_seeds():
    table = _runs({"gaussian": [1.0, 1.0], "vocab": [1.0, 1.0]},
                  collapsed_share=lambda p, s: 0.0 if p == "gaussian" else 0.9,
                  init_collapsed_share=lambda p, s: 0.0 if p == "gaussian" else 1.0)
    f = fd.collapse_finding(table)
    assert f["verdict"] == "inconclusive" and "gaussian 0.00 -> 0.00" in f["measured"]
    assert "vocab 1.00 -> 0.90" in f["measured"]
    many = _runs({"gaussian": [1.0] * 5, "vocab": [1.0] * 5},
                 collapsed_share=lambda p, s: 0.05 * s if p == "gaussian" else 0.8 + 0.02 * s,
                 init_collapsed_share=lambda p, s: 0.0)
    assert fd.collapse_finding(many)["verdict"] == "agrees"
    stale = _runs({"gaussian": [1.0]})
    assert "predates the collapse measure" in fd.collapse_finding(stale)["why"]


def test_trajectory_finding_against_the_shuffled_baseline():
    rng = np.random.default_rng(2)
    real = rng.normal(0.3, 0.02, 50)
    f = fd.trajectory_finding({"shuffled_cv": {"token_layer": {"real": list(real), "shuffled": list(real + 0.05)}}})
    assert f["verdict"] == "agrees" and f["effect"] == pytest.approx(-0.05) and f["n"] == 50
    f = fd.trajectory_finding({"token_layer": {}})
    assert f["verdict"] == "inconclusive" and "--force trajectory" in f["why"]


def test_separation_finding_with_layer_zero_control():
    gaps = pd.DataFrame({"layer": [0, 15, 30], "gap": [1.5, 1.3, 1.4], "ci_low": [1.2, 1.0, 1.1],
                         "ci_high": [1.8, 1.6, 1.7], "n_docs": [288] * 3})
    f = fd.separation_finding(None, gaps)
    assert f["verdict"] == "agrees" and f["effect"] == 1.4 and "not distinguishable from the lexical" in f["measured"]
    gaps.loc[1, ["ci_low", "ci_high"]] = [-0.4, -0.1]
    assert fd.separation_finding(None, gaps)["verdict"] == "does not agree"


def test_separation_gaps_bootstrap_over_documents():
    from core.analysis.separation import separation_gaps

    rng = np.random.default_rng(3)
    means = {"c4": {0: rng.normal(0, 1, (20, 8))}, "squad": {0: rng.normal(0.2, 1, (20, 8))},
             "math": {0: rng.normal(3, 1, (20, 8))}}
    table = separation_gaps(means, [0])
    row = table.iloc[0]
    assert row["ci_low"] < row["gap"] < row["ci_high"] and row["ci_low"] > 0 and row["n_docs"] == 60


def test_shuffled_cv_pairs_on_the_tiny_model(tiny_lm):
    from core.analysis.trajectories import shuffled_cv_pairs

    texts = ["The cat sat on the mat and looked at the door.", "Prices rose sharply in the first quarter of 2024.",
             "She walked to the station before the rain began."]
    out = shuffled_cv_pairs(tiny_lm, texts, layer=0)
    assert out["layer"] == 0 and len(out["real"]) == len(out["shuffled"]) == 3
    assert all(v > 0 for v in out["real"] + out["shuffled"])


def test_every_finding_has_one_of_three_verdicts_on_empty_tables():
    class Empty:
        runs_root = "/nonexistent"

        def load_table(self, name):  # noqa: ANN001, ANN201
            return None

        def load_json(self, name):  # noqa: ANN001, ANN201
            return None

    out = fd.compute_findings(Empty())["findings"]
    assert {f["key"] for f in out} == {"trajectory", "separation", "collapse", "quality", "speed", "interpolation",
                                       "vae"}
    assert all(f["verdict"] == "inconclusive" and FIELDS <= set(f) for f in out)
    assert fd.numbers_line(out[0]) == "Effect n/a, no CI, n = 0."


def test_exclusion_prior_says_it_is_nearly_the_fitted_prior():
    from core.priors import make_prior
    from core.priors.exclusion import c_dim, c_for_widening

    cloud = np.random.default_rng(4).normal(size=(800, 576)).astype(np.float32)  # d as SmolLM2's
    import torch

    text = make_prior("exclusion", reference=torch.from_numpy(cloud), c=5.0).describe()
    assert "nearly the fitted prior" in text and "A c that matters" in text
    assert c_dim(c_for_widening(1.21, 576), 576) == pytest.approx(1.21)
    assert c_dim(5.0, 576) == pytest.approx(1.0056, abs=1e-4)


def _vae_table(spreads, layer=30, means=0.1):
    rows = [{"seed": i, "spread_ratio": s, "spread_ratio_mean": means, "noise_share": 0.5, "active_units": 3,
             "recon_rel_error": 0.5} for i, s in enumerate(spreads)]
    return {"source": "squad", "layer": layer, "num_layers": 30, "describe": f"VAE prior on squad at layer {layer}",
            "diagnostics": {"latent_dim": 16, "spread_ratio": spreads[0]}, "seeds": rows}


def test_vae_finding_needs_last_layer_and_seeds_then_tests_the_spread_against_half():
    old = fd.vae_finding({"describe": "VAE prior on squad activations at layer 0: ...",
                          "diagnostics": {"active_units": 1, "latent_dim": 16, "spread_ratio": 0.1}})
    assert old["verdict"] == "inconclusive" and "not on last-layer activations" in old["why"]
    layer0 = fd.vae_finding(_vae_table([0.1] * 5, layer=0))
    assert layer0["verdict"] == "inconclusive" and "on layer 0" in layer0["why"]
    collapsed = fd.vae_finding(_vae_table([0.20, 0.22, 0.18, 0.21, 0.19]))
    assert collapsed["verdict"] == "agrees" and collapsed["ci"][1] < 0.5 and collapsed["n"] == 5
    assert collapsed["effect"] == pytest.approx(0.2) and "decoder's Gaussian noise" in collapsed["test"]
    spread = fd.vae_finding(_vae_table([0.9, 1.0, 0.95, 1.05, 0.98]))
    assert spread["verdict"] == "does not agree"
    mixed = fd.vae_finding(_vae_table([0.2, 0.9, 0.3, 0.8, 0.5]))
    assert mixed["verdict"] == "inconclusive" and "includes 0.5" in mixed["why"]
    few = fd.vae_finding(_vae_table([0.2, 0.21]))
    assert few["verdict"] == "inconclusive" and "2 seed(s)" in few["why"]
    assert FIELDS <= set(collapsed)
