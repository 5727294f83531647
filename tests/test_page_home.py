"""The home page renders on the embedded model with the model facts and labelled datasets."""

import pytest
from streamlit.testing.v1 import AppTest


@pytest.mark.integration
def test_home_page_shows_model_and_labelled_datasets():
    at = AppTest.from_file("../pages/1_Home.py", default_timeout=180).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers x width"] == "30 x 576"
    labels = " ".join(e.label for e in at.expander)
    assert "offline stand-in for SQuAD" in labels
    assert "offline stand-in for C4" in labels
