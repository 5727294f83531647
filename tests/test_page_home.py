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


@pytest.mark.integration
def test_home_tour_states_each_test_before_its_numbers_and_one_of_three_verdicts():
    from core.artifacts import ArtifactStore
    from core.models import load_model

    store = ArtifactStore()
    usable, note = store.status(load_model("smollm2-135m", precision="fp32", device="cpu").fingerprint)
    findings = (store.load_json("findings") or {}).get("findings", [])
    if not usable or not findings:
        pytest.skip(f"no committed findings for this model: {note}")
    at = AppTest.from_file("../pages/1_Home.py", default_timeout=180).run()
    assert not at.exception, at.exception
    markdown = [m.value for m in at.markdown]
    captions = " ".join(c.value for c in at.caption)
    tests = [i for i, m in enumerate(markdown) if m.startswith("*Test:*")]
    numbers = [i for i, m in enumerate(markdown) if m.startswith("*This model:*")]
    assert len(tests) == len(findings) and all(t < n for t, n in zip(tests, numbers, strict=True))
    assert captions.count("Effect ") == len(findings) and "n = " in captions
    verdicts = {f["verdict"] for f in findings}
    assert verdicts <= {"agrees", "does not agree", "inconclusive"}
    assert all(f"Verdict: **{v}**" in captions for v in verdicts)
