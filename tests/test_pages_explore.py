"""AppTest smoke tests of the two explorer pages on the embedded model (small samples)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.integration
PAGES = Path(__file__).resolve().parent.parent / "pages"


def test_embedding_space_page():
    at = AppTest.from_file(str(PAGES / "2_Embedding_space.py"), default_timeout=120)
    at.session_state["emb_points"] = 500
    at.session_state["emb_find"] = "cat"
    at.run()
    assert not at.exception
    assert any("mean step" in m.label for m in at.metric)
    at.radio(key="emb_view").set_value("t-SNE").run()  # joint t-SNE of 500 tokens, the path and the found tokens
    assert not at.exception
    assert any("t-SNE" in str(c.proto.spec) for c in at.get("vega_lite_chart"))
    at.radio(key="emb_view").set_value("PCA")
    at.slider(key="emb_layer").set_value(30).run()  # the path over last-layer activations of news texts
    assert not at.exception
    assert any("Layer 30" in str(c.proto.spec) for c in at.get("vega_lite_chart"))
    at.text_input(key="emb_sentence").input("Hi").run()  # one token: no path, a clear message
    assert not at.exception
    assert any("type a longer sentence" in i.value for i in at.info)


def test_activations_page():
    at = AppTest.from_file(str(PAGES / "3_Activations.py"), default_timeout=180)
    at.session_state["act_docs"] = 4
    at.session_state["act_len"] = 32
    at.session_state["act_sep_docs"] = 8
    at.session_state["act_sep_live"] = True
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["comparison"]) >= {"math vs c4", "squad vs c4"}
    assert table["layer"].max() == 30
    at.toggle(key="act_first").set_value(True).run()  # the sink tokens in view: still renders
    assert not at.exception
    at.multiselect(key="act_datasets").set_value([]).run()
    assert any("at least one dataset" in i.value for i in at.info)
