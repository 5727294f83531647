"""core.analysis.projections: PCA on a reference, joint t-SNE, robust range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import core.activations as act
from core.analysis.projections import Projection, fit_pca, outlier_note, robust_mask, subsample_indices, tsne


def _use_cache(root: Path, monkeypatch) -> None:
    def sub(name: str) -> Path:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr(act, "cache_subdir", sub)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    _use_cache(tmp_path / "first", monkeypatch)


def _cloud(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(5, 0.1, d)  # a clear first axis
    return (rng.normal(size=(n, d)) * scales).astype(np.float32)


def test_pca_axes_from_reference_apply_to_anything():
    ref = _cloud()
    proj = fit_pca(ref)
    xy = proj.transform(ref)
    assert xy.shape == (300, 2)
    assert abs(xy.mean(0)).max() < 1e-4  # centred on the reference
    assert proj.explained_variance_ratio[0] > proj.explained_variance_ratio[1]
    other = proj.transform(ref[:5] + 100.0)  # a shifted group lands away from the reference, on the same axes
    np.testing.assert_allclose(other - xy[:5], np.full((5, 16), 100.0) @ proj.components.T, rtol=1e-4, atol=1e-3)
    assert proj.axis_labels()[0].startswith("PC1 (")


def test_pca_deterministic_and_round_trips():
    ref = _cloud(n=3000)  # randomized solver
    a, b = fit_pca(ref, seed=3), fit_pca(ref, seed=3)
    np.testing.assert_array_equal(a.components, b.components)
    back = Projection.from_dict(a.to_dict())
    np.testing.assert_allclose(back.transform(ref[:10]), a.transform(ref[:10]), rtol=1e-6)


def test_pca_errors():
    with pytest.raises(ValueError, match=r"must be a 2-D array"):
        fit_pca(np.zeros(10))
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_pca(np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="exceeds min"):
        fit_pca(_cloud(n=10, d=3), n_components=4)
    with pytest.raises(ValueError, match=r"must be \[m, 16\]"):
        fit_pca(_cloud()).transform(np.zeros((2, 5)))


def test_tsne_keeps_required_points_and_is_deterministic(tmp_path, monkeypatch):
    x = _cloud(n=400)
    keep = np.array([0, 399, 7])
    a = tsne(x, max_points=60, seed=1, keep=keep)
    assert a.coords.shape == (60, 2) and len(a.index) == 60
    assert set(keep) <= set(a.index.tolist())
    cached = tsne(x, max_points=60, seed=1, keep=keep)
    np.testing.assert_array_equal(a.coords, cached.coords)
    _use_cache(tmp_path / "second", monkeypatch)  # an empty cache: computed afresh, same seed, same answer
    fresh = tsne(x, max_points=60, seed=1, keep=keep)
    np.testing.assert_allclose(a.coords, fresh.coords, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_points must be in"):
        tsne(x, max_points=10**6)
    with pytest.raises(ValueError, match="raise max_points"):
        subsample_indices(100, 2, keep=np.arange(5))


def test_robust_mask_counts_outliers():
    xy = np.random.default_rng(0).normal(size=(200, 2))
    xy[:3] = 1e4
    mask = robust_mask(xy)
    assert mask.dtype == bool and (~mask).sum() == 3 and not mask[:3].any()
    assert outlier_note(mask).startswith("3 of 200 points (1.5%) fall outside")
    assert "All 5" in outlier_note(np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match=r"must be \[m, k\]"):
        robust_mask(np.zeros(3))


def test_project_groups_pca_view():
    import pandas as pd

    from core.analysis.projections import project_groups

    ref = _cloud(n=200)
    ref[:2] *= 1000  # two massive rows: left out of the fit, reported, outside the robust range
    other = _cloud(n=50, seed=1) + 3
    meta = {"ref": pd.DataFrame({"token": [f"t{i}" for i in range(200)]})}
    view = project_groups({"ref": ref, "other": other}, meta, reference="ref", max_points=120, keep_groups=("other",))
    f = view.frame
    assert len(f) == 120 and (f["group"] == "other").sum() == 50  # kept group never subsampled
    assert f.loc[f["group"] == "ref", "token"].notna().all() and f.loc[f["group"] == "other", "token"].isna().all()
    assert "without 2 massive-activation rows" in view.note
    assert view.x_label.startswith("PC1") and view.n_total == 250
    with pytest.raises(ValueError, match="neither a group"):
        project_groups({"ref": ref}, reference="nope")
    with pytest.raises(ValueError, match="same width"):
        project_groups({"a": ref, "b": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="has 3 rows but the group has 200"):
        project_groups({"ref": ref}, {"ref": pd.DataFrame({"x": [1, 2, 3]})})
    with pytest.raises(ValueError, match="method must be"):
        project_groups({"ref": ref}, method="umap")


def test_project_groups_tsne_view():
    from core.analysis.projections import project_groups

    groups = {"a": _cloud(n=80), "b": _cloud(n=5, seed=2)}
    view = project_groups(groups, method="tsne", max_points=40, keep_groups=("b",))
    assert len(view.frame) == 40 and (view.frame["group"] == "b").sum() == 5 and view.x_label == "t-SNE 1"


def test_find_tokens(tiny_lm):
    from core.analysis.projections import find_tokens, token_table

    ids = find_tokens(tiny_lm, "cat")
    texts = token_table(tiny_lm, ids)["token"].tolist()
    assert len(ids) >= 2 and "'cat'" in texts and "' cat'" in texts
    with pytest.raises(ValueError, match="type a word"):
        find_tokens(tiny_lm, "  ")
