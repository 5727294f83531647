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


def _committed_runs():
    from core.artifacts import ArtifactStore
    from core.models import load_model

    store = ArtifactStore()
    usable, note = store.status(load_model("smollm2-135m", precision="fp32", device="cpu").fingerprint)
    runs = store.load_table("runs") if usable else None
    if runs is None:
        pytest.skip(f"no committed runs table for this model: {note}")
    return runs


@pytest.mark.integration
def test_home_tour_says_from_the_committed_runs_whether_a_prompt_collapses():
    from core import tour

    runs = _committed_runs()
    expected = tour.collapse_pair(runs)
    at = AppTest.from_file("../pages/1_Home.py", default_timeout=180).run()
    assert not at.exception, at.exception
    assert "Does the prompt collapse?" in [s.value for s in at.subheader]
    captions = " ".join(c.value for c in at.caption)
    assert tour.seeds_line(runs) in captions and "one or two seeds per prior" not in captions
    assert f"Rule: {tour.RULE}" in captions
    markdown = " ".join(m.value for m in at.markdown)
    if expected["pair"]:
        for side in expected["pair"].values():
            assert f"Prior *{side['prior']}*" in markdown
    else:
        assert expected["statement"][1:] in " ".join(i.value for i in at.info)
    assert "Divergence" in markdown


@pytest.mark.integration
def test_home_tour_shows_a_collapse_pair_side_by_side_with_each_prompt_read_as_tokens(monkeypatch):
    """Whatever the committed gallery shows, a pair (here two committed runs made to look like one) renders in two
    columns with the numbers and each representative run's nearest tokens."""
    import pandas as pd

    from core import tour

    runs = _committed_runs()
    soft = runs[(runs["method"] == "soft") & (runs["dataset"] == "math")]
    a, b = soft.iloc[0]["prior"], soft.iloc[1]["prior"]
    fake = pd.concat([soft.iloc[[0]].assign(collapsed_share=0.9, init_collapsed_share=0.1),
                      soft.iloc[[1]].assign(collapsed_share=0.0, init_collapsed_share=0.0)])
    pair = tour.collapse_pair(fake)
    assert pair["status"] == tour.PAIR
    monkeypatch.setattr(tour, "collapse_pair", lambda _runs: pair)
    at = AppTest.from_file("../pages/1_Home.py", default_timeout=180).run()
    assert not at.exception, at.exception
    column_text = [" ".join([m.value for m in col.markdown] + [c.value for c in col.code]) for col in at.columns]
    column_text = [text for text in column_text if "Prior *" in text]
    assert len(column_text) == 2
    assert f"Prior *{a}*: the prompt collapses" in column_text[0]
    assert f"Prior *{b}*: the prompt does not collapse" in column_text[1]
    assert "0.10 at step 0 -> 0.90 trained" in column_text[0] and "0.00 at step 0 -> 0.00 trained" in column_text[1]
    # the read-out: one "'token' (cosine)" per prompt vector, joined by " · "
    assert all(text.count(" · ") >= 1 and "trained on another model" not in text for text in column_text)
