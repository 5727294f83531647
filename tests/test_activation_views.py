"""The Activations page's default views: served from the artifacts without the model, live for other settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import ui_state
from core.analysis.activation_views import (
    CloudSettings,
    MeanSettings,
    load_activations_view,
    save_activations_view,
    text_means,
    token_clouds,
)
from core.analysis.separation import dataset_separation
from core.artifacts import ArtifactStore
from core.models import DEFAULT_MODEL, known_fingerprint

PAGE = Path(__file__).resolve().parent.parent / "pages" / "3_Activations.py"


@pytest.fixture(scope="module")
def tiny_store(tiny_lm, tmp_path_factory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_activations_view(store, tiny_lm, "test")
    store.save_table("separation", dataset_separation(tiny_lm, n=8))  # so the page's middle section is stored too
    store.save_manifest({"model_fingerprint": tiny_lm.fingerprint, "command": "test"})
    return store


def test_stored_views_equal_the_live_ones(tiny_store, tiny_lm):
    stored = load_activations_view(tiny_store, tiny_lm.fingerprint)
    cs = CloudSettings.default(tiny_lm.num_layers)
    served, live = stored.clouds(cs), token_clouds(tiny_lm, cs)
    for layer, view in live.views.items():
        got = served.views[layer]
        assert list(got.frame.columns) == list(view.frame.columns)
        assert (got.frame[["group", "token", "doc", "position", "text", "inside"]]
                == view.frame[["group", "token", "doc", "position", "text", "inside"]]).all().all()
        np.testing.assert_allclose(got.frame[["x", "y"]], view.frame[["x", "y"]], rtol=1e-5, atol=1e-5)
        assert (got.x_label, got.note, got.n_total) == (view.x_label, view.note, view.n_total)
    assert served.n_excluded == live.n_excluded and "Precomputed by `test`" in served.source
    for layer in (0, tiny_lm.num_layers):  # every layer of the means is stored
        s = MeanSettings(layer=layer)
        got, want = stored.means_at(s), text_means(tiny_lm, s)
        np.testing.assert_allclose(got.frame[["x", "y"]], want.frame[["x", "y"]], rtol=1e-5, atol=1e-5)
        assert got.frame["text"].tolist() == want.frame["text"].tolist()


def test_other_settings_or_weights_are_not_served(tiny_store, tiny_lm):
    stored = load_activations_view(tiny_store, tiny_lm.fingerprint)
    cs = CloudSettings.default(tiny_lm.num_layers)
    assert stored.clouds(CloudSettings(layers=cs.layers, n_docs=8)) is None
    assert stored.clouds(CloudSettings(layers=cs.layers, method="tsne")) is None
    assert stored.clouds(CloudSettings(layers=cs.layers, include_first=True)) is None
    assert stored.means_at(MeanSettings(layer=1, datasets=("c4", "math"))) is None
    assert load_activations_view(tiny_store, "other-weights:fp32") is None
    assert load_activations_view(tiny_store, None) is None


def test_committed_view_matches_the_page_defaults():
    stored = load_activations_view(ArtifactStore(), known_fingerprint(DEFAULT_MODEL, "fp32"))
    if not ArtifactStore().manifest():
        pytest.skip("no committed artifacts in this checkout")
    assert stored is not None, "rebuild it: python -m core precompute --only activations_view --force activations_view"
    assert stored.clouds(CloudSettings.default(stored.num_layers)) is not None
    assert stored.means_at(MeanSettings.default(stored.num_layers)) is not None


def _page(monkeypatch, store: ArtifactStore, fingerprint: str, model) -> AppTest:  # noqa: ANN001
    monkeypatch.setattr("core.artifacts.ARTIFACTS_DIR", store.root)
    monkeypatch.setattr(ui_state, "current_fingerprint", lambda: fingerprint)
    monkeypatch.setattr(ui_state, "current_model", model)
    return AppTest.from_file(str(PAGE), default_timeout=60)


def test_page_default_view_needs_no_model(monkeypatch, tiny_store, tiny_lm):
    def no_model():  # noqa: ANN202
        raise AssertionError("the default view must come from the artifacts, not the model")

    at = _page(monkeypatch, tiny_store, tiny_lm.fingerprint, no_model)
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("vega_lite_chart")) == 3  # token cloud, separation, per-text means
    assert sum("Precomputed by `test`" in c.value for c in at.caption) == 2
    at.slider(key="act_mean_layer").set_value(1).run()  # every layer of the means is stored
    assert not at.exception, at.exception


def test_page_non_default_setting_computes_live(monkeypatch, tiny_store, tiny_lm):
    at = _page(monkeypatch, tiny_store, tiny_lm.fingerprint, lambda: tiny_lm)
    at.session_state["act_docs"] = 8
    at.run()
    assert not at.exception, at.exception
    captions = [c.value for c in at.caption]
    assert any("tokens drawn" in c and "Computed live." in c for c in captions)
    assert any("Precomputed by `test`" in c for c in captions)  # the means' settings are still the default
