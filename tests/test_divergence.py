"""Divergence and collapse measures on constructed clouds, the tiny model and (integration) the embedded model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import core.paths
from core.analysis import divergence as dv


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    # Unit tests write their reference k-NN tables to a throwaway cache, never to the user's.
    monkeypatch.setattr(core.paths, "CACHE_DIR", tmp_path / "cache")


def _cloud(n: int = 400, d: int = 16, seed: int = 0) -> dv.ReferenceCloud:
    rng = np.random.default_rng(seed)
    # Anisotropic cloud with a nonzero centre, like token embeddings.
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d) + 3.0
    return dv.ReferenceCloud(x.astype(np.float32), key=f"test-cloud-{n}-{d}-{seed}",
                             texts=[f"tok{i}" for i in range(n)], ids=np.arange(n))


class _Gaussian:
    """Test-only stand-in with the FittedGaussian interface, exact empirical fit of the cloud."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(0)
        self.precision = np.linalg.inv(np.cov(x, rowvar=False))

    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        diff = x.numpy().astype(np.float64) - self.mean
        return torch.from_numpy(np.sqrt(np.einsum("ij,jk,ik->i", diff, self.precision, diff)))


def test_prompt_equal_to_tokens_is_fully_collapsed():
    ref = _cloud()
    rows = [3, 50, 121, 399]
    report = dv.divergence(ref.vectors[rows], ref)
    pv = report.per_vector
    assert report.summary["collapsed_share"] == 1.0
    assert report.summary["within_nn_radius_share"] == 1.0
    assert dv.collapsed(ref.vectors[rows], ref).all()
    np.testing.assert_allclose(pv["nearest_cos"], 1.0, atol=1e-6)
    np.testing.assert_allclose(pv["nearest_cos_centered"], 1.0, atol=1e-5)
    np.testing.assert_allclose(pv["nearest_norm_ratio"], 1.0, atol=1e-6)
    assert list(pv["nearest_id"]) == rows
    assert list(pv["nearest"]) == [f"tok{i}" for i in rows]
    assert pv["top_tokens"].str.startswith("'tok").all()
    assert report.top_ids.shape == (4, dv.TOP_K)
    assert (np.diff(report.top_cos, axis=1) <= 1e-7).all()  # best first


def test_far_out_prompts_order_every_distance():
    ref = _cloud()
    centre = ref.vectors.mean(0)
    direction = np.random.default_rng(1).normal(size=ref.dim)
    direction /= np.linalg.norm(direction)
    scales = [0.5, 5.0, 50.0, 500.0]
    prompt = np.stack([centre + s * direction for s in scales]).astype(np.float32)
    report = dv.divergence(prompt, ref, gaussian=_Gaussian(ref.vectors))
    pv = report.per_vector
    for col in ("knn_dist", "manifold_ratio", "mahalanobis"):
        assert pv[col].is_monotonic_increasing, col
    assert pv["manifold_ratio"].iloc[-1] > 20
    assert not pv["collapsed"].iloc[-2:].any()  # far beyond any token: norm out of the factor-2 band
    assert not pv["within_nn_radius"].iloc[-2:].any()
    assert pv["mahalanobis"].iloc[-1] > 10 * report.summary["reference_median_mahalanobis"]


def test_manifold_ratio_near_one_on_reference_points():
    ref = _cloud(n=600)
    report = dv.divergence(ref.vectors[:200], ref, k=5)
    # A reference point's k-NN distance (itself at 0 among them) is within the reference's own spread.
    assert 0.5 < report.summary["median_manifold_ratio"] < 1.0


def test_reference_knn_matches_sklearn_and_is_cached(tmp_path):
    ref = _cloud(n=300, d=8)
    stats = dv.reference_knn(ref, k=4)
    dist, _ = NearestNeighbors(n_neighbors=5).fit(ref.vectors).kneighbors(ref.vectors)
    np.testing.assert_allclose(stats["nn1"], dist[:, 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["knn"], dist[:, 1:].mean(1), rtol=1e-4, atol=1e-4)
    # A fresh cloud object with the same key and values is served from disk without recomputing.
    again = dv.ReferenceCloud(ref.vectors.copy(), key=ref.key)
    original = dv._compute_reference_knn
    dv._compute_reference_knn = lambda *a, **k: pytest.fail("recomputed despite the disk cache")
    try:
        cached = dv.reference_knn(again, k=4)
    finally:
        dv._compute_reference_knn = original
    np.testing.assert_array_equal(cached["knn"], stats["knn"])
    assert any((core.paths.CACHE_DIR / "divergence").iterdir())


def test_sampled_nearest_distances_are_the_tables_at_a_fixed_sample(monkeypatch):
    """The token gap reads each point's nearest distance without the whole k-NN table (its own pass, the table's
    numbers), and for a large vocabulary a sample of points, each against the whole cloud: the whole table's nn1
    at those points (the sample fixed by n and seed), and a gap from it near the whole cloud's median."""
    import core.tuning.convergence as conv

    ref = _cloud(n=3000, d=8)
    own_pass = dv.nearest_distances(ref)
    assert dv._cached_stats(ref, dv._knn_key(ref, dv.DEFAULT_K), None) is None  # no k-NN table was built for it
    full = dv.reference_knn(ref, k=1)["nn1"]
    np.testing.assert_allclose(own_pass, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dv.nearest_distances(ref), dv.reference_knn(ref)["nn1"])  # a table at hand is read
    sample = dv.sampled_nn1(ref, 600, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(3000, size=600, replace=False))
    np.testing.assert_allclose(sample, full[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dv.sampled_nn1(dv.ReferenceCloud(ref.vectors.copy(), key=ref.key), 600, seed=3),
                                  sample)
    assert abs(np.median(sample) / np.median(full) - 1) < 0.05
    with pytest.raises(ValueError, match="between 1 and 3000"):
        dv.sampled_nn1(ref, 3001)
    lm = SimpleNamespace()
    monkeypatch.setattr(dv, "token_reference", lambda _lm: ref)
    monkeypatch.setattr(conv, "NN_GAP_SAMPLE", 600)
    assert conv.token_nn_gap(lm) == pytest.approx(float(np.median(full)))  # 3000 tokens: the whole table
    monkeypatch.setattr(conv, "NN_GAP_EXACT_MAX", 2999)
    assert conv.token_nn_gap(lm) == pytest.approx(float(np.median(dv.sampled_nn1(ref, 600))))


def test_duplicate_points_do_not_count_as_self_neighbours():
    x = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    x[10] = x[11]
    ref = dv.ReferenceCloud(x, key="dups")
    stats = dv.reference_knn(ref, k=3)
    assert stats["nn1"][10] == pytest.approx(0.0, abs=1e-3) and stats["nn1"][12] > 0
    # Sitting exactly on a duplicated token still counts as collapsed, and within its (zero) radius.
    assert dv.collapsed(x[[10]], ref, k=3).all()
    assert dv.divergence(x[[10]], ref, k=3).summary["within_nn_radius_share"] == 1.0


def _centered_bias_cloud(n: int = 500, d: int = 24, seed: int = 5) -> np.ndarray:
    # Token-like: a large shared mean direction plus spread, norms varying over a factor ~2.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 2.5
    return (x * rng.uniform(0.8, 1.6, size=(n, 1))).astype(np.float32)


def test_collapsed_rule_on_a_synthetic_cloud():
    x = _centered_bias_cloud()
    ref = dv.ReferenceCloud(x, key="biased-cloud")
    rule = dv.collapse_rule(ref)
    assert rule["min_cos"] == pytest.approx(float(np.median(dv.reference_knn(ref)["nn_cos"])))
    assert rule["norm_factor"] == 2.0 and "median nearest-neighbour cosine" in rule["test"]
    rows = x[:50]
    assert dv.collapsed(rows, ref).all()  # rows of the cloud
    gauss = np.random.default_rng(0).normal(scale=0.02, size=(20, x.shape[1]))
    assert not dv.collapsed(gauss, ref).any()  # a small isotropic draw points nowhere
    mean = x.mean(0, keepdims=True)
    assert not dv.collapsed(0.1 * rows, ref).any()  # right direction, a tenth of the norm
    assert dv.collapsed(1.9 * rows, ref).all() and not dv.collapsed(2.1 * rows, ref).any()  # the factor-2 band
    # The plain cosine of the mean is high (shared mean direction); centered, the mean has no direction.
    assert dv.nearest_by_cosine(mean, ref, top_k=1)[1][0, 0] > rule["min_cos"]
    assert dv.centered_cosine(mean, ref)[0] == 0.0
    np.testing.assert_allclose(dv.centered_cosine(rows[:5], ref), 1.0, atol=1e-5)


def test_collapsed_acceptance_cases_on_the_tiny_model():
    from core.models import tiny_llama

    # The tiny model's tokens are themselves N(0, 0.02^2) draws, so a Gaussian sample is token-like here: the
    # Gaussian case is tested on the synthetic cloud above and on the real vocabulary (integration).
    lm = tiny_llama(num_layers=2, hidden_size=32, vocab_size=300)
    ref = dv.token_reference(lm)
    emb = lm.input_embeddings()
    rows = emb[torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))[:32]]
    assert dv.collapsed(rows, ref).all()
    assert not dv.collapsed(emb.mean(0, keepdim=True), ref).any()
    assert not dv.collapsed(0.1 * rows, ref).any()


def test_collapsed_agrees_with_the_report_column():
    x = _centered_bias_cloud()
    ref = dv.ReferenceCloud(x, key="biased-cloud-2")
    rng = np.random.default_rng(3)
    prompt = np.concatenate([x[:5] * rng.uniform(0.3, 3.0, size=(5, 1)), rng.normal(size=(5, x.shape[1]))])
    report = dv.divergence(prompt, ref)
    np.testing.assert_array_equal(report.per_vector["collapsed"].to_numpy(), dv.collapsed(prompt, ref))
    assert report.summary["reference_median_nn_cos"] == pytest.approx(dv.collapse_rule(ref)["min_cos"])


def test_readout_settling_finds_the_last_change():
    ref = _cloud(n=100, d=8)
    v = ref.vectors
    # vector 0: token 1 -> 2 -> 2 -> 2 (settles at step 10); vector 1: 3 throughout (settled at step 0);
    # vector 2: 4 -> 5 -> 4 -> 6 (settles at the last step).
    snaps = np.stack([v[[1, 3, 4]], v[[2, 3, 5]], v[[2, 3, 4]], v[[2, 3, 6]]])
    steps = [0, 10, 20, 30]
    table = dv.readout_settling(snaps, steps, ref, top_k=2)
    assert list(table["settled_step"]) == [10, 0, 30]
    assert list(table["changes"]) == [1, 0, 3]
    assert list(table["final"]) == ["'tok2'", "'tok3'", "'tok6'"]
    assert table.loc[1, "topk_overlap"] == 1.0
    share = dv.settled_share(table, steps)
    assert list(share["settled_share"]) == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match=r"snapshots must be \[S, n, d\]"):
        dv.readout_settling(snaps, [0, 1], ref)


def test_drift_values():
    p0 = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    p = np.array([[2.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    l2, cos = dv.drift(p, p0)
    np.testing.assert_allclose(l2, [1.0, np.sqrt(8.0)], rtol=1e-6)
    np.testing.assert_allclose(cos, [0.0, 1.0], atol=1e-7)
    ref = _cloud(d=2)
    report = dv.divergence(p, ref, init=p0)
    np.testing.assert_allclose(report.per_vector["drift_l2"], l2)
    assert report.summary["mean_drift_cos"] == pytest.approx(0.5)


def test_snapshot_path_towards_tokens_ends_collapsed():
    ref = _cloud()
    target = ref.vectors[:8]
    start = ref.vectors.mean(0) + 40.0  # far from the cloud
    snaps = np.stack([start + t * (target - start) for t in (0.0, 0.5, 0.9, 1.0)]).astype(np.float32)
    frame = dv.snapshot_divergence(snaps, [0, 10, 20, 30], ref)
    assert list(frame["step"]) == [0, 10, 20, 30]
    assert frame["mean_drift_l2"].iloc[0] == 0.0
    assert frame["mean_drift_l2"].is_monotonic_increasing
    assert frame["collapsed_share"].iloc[0] == 0.0 and frame["collapsed_share"].iloc[-1] == 1.0
    assert frame["median_manifold_ratio"].is_monotonic_decreasing


def test_token_reference_on_tiny_model():
    from core.models import tiny_llama

    lm = tiny_llama(num_layers=2, hidden_size=32, vocab_size=300)
    ref = dv.token_reference(lm)
    assert len(ref) == 300 and ref.dim == 32
    assert ref.texts[lm.tokenizer.convert_tokens_to_ids("a")] == "a"
    report = dv.divergence(lm.input_embeddings()[[5, 7]], ref)
    assert list(report.per_vector["nearest_id"]) == [5, 7]
    assert report.summary["collapsed_share"] == 1.0


def test_errors_say_what_is_wrong():
    ref = _cloud()
    with pytest.raises(ValueError, match="width 3 but the reference cloud has width 16"):
        dv.divergence(np.zeros((2, 3)), ref)
    with pytest.raises(ValueError, match=r"must be a \[n, d\] matrix"):
        dv.divergence(np.zeros(16), ref)
    with pytest.raises(ValueError, match="non-finite"):
        dv.divergence(np.full((2, 16), np.nan), ref)
    with pytest.raises(ValueError, match="k must be between 1 and 399"):
        dv.reference_knn(ref, k=400)
    with pytest.raises(ValueError, match="pass the run's step-0 snapshot"):
        dv.divergence(ref.vectors[:2], ref, init=ref.vectors[:3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        dv.ReferenceCloud(np.zeros((1, 4)), key="one")
    with pytest.raises(ValueError, match="texts has 2 entries"):
        dv.ReferenceCloud(np.zeros((3, 4)), key="t", texts=["a", "b"])
    with pytest.raises(ValueError, match=r"snapshots must be \[S, n, d\] with S = len\(steps\) = 3"):
        dv.snapshot_divergence(np.zeros((2, 4, 16)), [0, 1, 2], ref)
    with pytest.raises(ValueError, match="same shape"):
        dv.drift(np.zeros((2, 3)), np.zeros((3, 3)))


@pytest.mark.integration
def test_real_vocabulary_readout_and_gaussian_init(real_lm, monkeypatch):
    monkeypatch.setattr(core.paths, "CACHE_DIR", core.paths.REPO_ROOT / ".cache")  # reuse the real table
    ref = dv.token_reference(real_lm)
    tid = real_lm.tokenizer.convert_tokens_to_ids("Ġtemper")
    report = dv.divergence(real_lm.input_embeddings()[[tid]], ref)
    assert report.per_vector["nearest"].iloc[0] == " temper"
    assert report.summary["collapsed_share"] == 1.0
    init = torch.randn(20, real_lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    from core.priors import fitted_gaussian

    fit = fitted_gaussian(real_lm)
    far = real_lm.input_embeddings()[[tid]] * 8.0
    pair = dv.divergence(torch.cat([real_lm.input_embeddings()[[tid]], far]), ref, gaussian=fit).per_vector
    assert pair["mahalanobis"].iloc[0] < pair["mahalanobis"].iloc[1]
    assert pair["manifold_ratio"].iloc[0] < 1.5 < pair["manifold_ratio"].iloc[1]
    assert list(pair["collapsed"]) == [True, False]
    gauss = dv.divergence(init, ref)
    # A small isotropic sample points nowhere in particular: low cosine to every token.
    assert gauss.summary["median_nearest_cos"] < 0.3
    assert gauss.summary["collapsed_share"] == 0.0
    assert gauss.summary["median_norm_ratio"] < 0.3


@pytest.mark.integration
def test_collapsed_on_the_real_vocabulary(real_lm, monkeypatch):
    monkeypatch.setattr(core.paths, "CACHE_DIR", core.paths.REPO_ROOT / ".cache")  # the committed k-NN table
    ref = dv.token_reference(real_lm)
    emb = real_lm.input_embeddings()
    rows = emb[torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))[:64]]
    assert dv.collapsed(rows, ref).all()
    gauss = torch.randn(20, real_lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    assert not dv.collapsed(gauss, ref).any()
    assert not dv.collapsed(emb.mean(0, keepdim=True), ref).any()
    assert not dv.collapsed(0.1 * rows, ref).any()
    assert 0.7 < dv.collapse_rule(ref)["min_cos"] < 0.9  # SmolLM2's median nearest-neighbour cosine: 0.79


def test_committed_knn_table_spares_the_vocabulary_pass(tmp_path, monkeypatch):
    from core.artifacts import ArtifactStore
    from core.models import tiny_llama

    lm = tiny_llama(num_layers=2, hidden_size=32, vocab_size=300)
    monkeypatch.setattr(core.paths, "ARTIFACTS_DIR", tmp_path / "art")
    path = dv.save_reference_knn_artifact(lm, ArtifactStore(tmp_path / "art"), k=4)
    assert path.name == "reference_knn_tokens.safetensors"
    built = dv.reference_knn(dv.token_reference(lm), k=4)
    monkeypatch.setattr(core.paths, "CACHE_DIR", tmp_path / "fresh-clone-cache")
    monkeypatch.setattr(dv, "_compute_reference_knn", lambda *a, **k: pytest.fail("recomputed despite the artifact"))
    served = dv.reference_knn(dv.token_reference(lm), k=4)
    np.testing.assert_array_equal(served["nn1"], built["nn1"])
    # Another k is another table: the artifact does not answer for it.
    with pytest.raises(pytest.fail.Exception, match="recomputed despite the artifact"):
        dv.reference_knn(dv.token_reference(lm), k=3)
