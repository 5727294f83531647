"""AppTest of the Prior lab page: every prior renders on the embedded model, errors are shown, the sample is sent.

The page loads the embedded model through ui_state, so every test here is `integration`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "4_Prior_lab.py")
pytestmark = pytest.mark.integration
ALL = ["gaussian", "xavier", "fitted", "exclusion", "interpolation", "vae", "vocab", "text", "knn_low_density"]


def run_page(state: dict | None = None) -> AppTest:
    """The page after its first run; `state`: widget values set before it (so the first fit already uses them)."""
    at = AppTest.from_file(PAGE, default_timeout=180)
    for key, value in (state or {}).items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def test_default_prior_renders_and_sends_its_sample():
    at = run_page()
    assert at.selectbox(key="prior_lab_name").value == "gaussian"
    labels = [m.label for m in at.metric]
    assert "Median nearest-token cosine" in labels and "Median Mahalanobis" in labels
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 20
    at.button(key="prior_lab_send").click().run()
    assert not at.exception
    sent = at.session_state["prior_sample"]
    assert isinstance(sent["tensor"], torch.Tensor) and sent["tensor"].shape == (20, 576)
    assert sent["prior"]["name"] == "gaussian" and sent["prior"]["sigma"] == 0.02
    assert "Gaussian" in sent["describe"]


def test_invalid_option_is_explained_not_raised():
    at = run_page()
    at.number_input(key="prior_lab_gaussian_sigma").set_value(0.0).run()
    assert not at.exception
    assert any("sigma must be a positive" in i.value for i in at.info)


@pytest.mark.parametrize("name", ALL)
def test_every_prior_renders(name, real_prior_options):
    options = real_prior_options(name)
    at = run_page({f"prior_lab_{name}_{key}": value for key, value in options.items()})
    at.selectbox(key="prior_lab_name").set_value(name).run()
    assert not at.exception, at.exception
    assert not at.info, [i.value for i in at.info]
    assert len(at.dataframe[0].value) == 20
    if name == "exclusion":
        rate = next(m for m in at.metric if m.label == "Acceptance rate").value
        assert rate.endswith("%")
        assert any("Widening factor c_dim = " in c.value for c in at.caption)
    for key, value in options.items():
        assert at.number_input(key=f"prior_lab_{name}_{key}").value == value


def test_tsne_view_renders():
    at = run_page()
    at.slider(key="prior_lab_n").set_value(10).run()
    at.radio(key="prior_lab_view").set_value("t-SNE").run()
    assert not at.exception, at.exception
