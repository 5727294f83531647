"""AppTests of the Divergence, Interpolation and Runs pages: no runs, real short runs, the committed artifacts."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core import tour
from core.analysis import runs_compare as rc
from core.artifacts import ArtifactStore

PAGES = ("6_Divergence.py", "7_Interpolation.py", "8_Runs.py")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_runs(real_lm, tmp_path_factory):
    """Two very short real runs of the embedded model on MATH: a soft prompt and a deep prompt (which has a soft
    part too, so the Divergence page compares two soft prompts)."""
    from core.data import load_examples
    from core.tuning import TrainConfig, train

    root = tmp_path_factory.mktemp("page-runs")
    data = (load_examples("math", split="train", n=4, seed=0), load_examples("math", split="validation", n=2, seed=0),
            [])
    last = real_lm.num_layers - 1
    for method, seed in (("soft", 0), ("deep", 0)):
        config = TrainConfig(method=method, dataset="math", prior="gaussian", seed=seed, steps=2, batch_size=2,
                             val_every=1, snapshot_every=1, n_train=4, n_val=2, eval_n=0, max_length=64,
                             layers=[last] if method == "deep" else [])
        train(real_lm, config, root / f"{method}-math-gaussian-s{seed}", examples=data, evaluate=False)
    return root


def _run(page: str) -> AppTest:
    at = AppTest.from_file(f"../pages/{page}", default_timeout=300).run()
    assert not at.exception, at.exception
    return at


def test_pages_without_runs_say_how_to_make_some(tmp_path, monkeypatch):
    monkeypatch.setattr(rc, "ORIGINS", {"yours": tmp_path / "none", "precomputed": tmp_path / "nothing"})
    for page in PAGES:
        at = _run(page)
        infos = " ".join(i.value for i in at.info)
        assert "python -m core" in infos, (page, infos)


def test_pages_render_real_runs(real_runs, monkeypatch, real_lm):
    monkeypatch.setattr(rc, "ORIGINS", {"yours": real_runs})
    at = _run("6_Divergence.py")
    assert len(at.multiselect[0].value) == 2  # two runs preselected
    assert at.selectbox(key="div_tensor").options == ["soft"]  # soft and deep runs share only the soft prompt
    per_vector = at.dataframe[-1].value
    assert len(per_vector) == 2 * 20 and per_vector["nearest_cos"].between(-1, 1).all()
    at.select_slider(key="div_step").set_value(0).run()
    assert not at.exception

    at = _run("7_Interpolation.py")
    assert at.slider(key="interp_layer").value == real_lm.num_layers - 1
    assert at.multiselect(key="interp_runs").value == ["deep-math-gaussian-s0 [yours]"]
    assert any("trained vectors project between" in m.value for m in at.markdown)

    at = _run("8_Runs.py")
    table = at.dataframe[0].value
    assert sorted(table["run"]) == sorted(p.name for p in real_runs.iterdir())
    assert table["steps_to_loss"].notna().all()
    markdown = " ".join(m.value for m in at.markdown)
    assert "Does the final quality differ across priors?" in markdown
    assert any("No transfer table yet" in i.value for i in at.info) or "closer prompts" in markdown


def test_runs_page_says_why_a_deep_only_run_has_no_collapse(real_lm, tmp_path, monkeypatch):
    """A run of deep vectors alone (`--no-soft`) has no soft prompt to measure collapse and drift on: the Runs page
    says so rather than leaving its empty cells unexplained."""
    from core.data import load_examples
    from core.tuning import TrainConfig, train

    data = (load_examples("math", split="train", n=4, seed=0), load_examples("math", split="validation", n=2, seed=0),
            [])
    config = TrainConfig(method="deep", soft=False, dataset="math", prior="gaussian", seed=0, steps=2, batch_size=2,
                         val_every=1, snapshot_every=1, n_train=4, n_val=2, eval_n=0, max_length=64,
                         layers=[real_lm.num_layers - 1])
    train(real_lm, config, tmp_path / "deep-nosoft", examples=data, evaluate=False)
    monkeypatch.setattr(rc, "ORIGINS", {"yours": tmp_path})
    at = _run("8_Runs.py")
    table = at.dataframe[0].value
    assert list(table["run"]) == ["deep-nosoft"] and table["collapsed_share"].isna().all()
    assert any("1 deep run(s) trained deep vectors alone" in c.value for c in at.caption)


def test_pages_render_committed_artifacts(real_lm):
    store = ArtifactStore()
    usable, note = store.status(real_lm.fingerprint)
    if not usable or not any(store.runs_root.glob("*/run.json")):
        pytest.skip(f"no committed gallery for this model: {note}")
    for page in PAGES:
        at = _run(page)
        assert not any("No runs of this model yet" in i.value for i in at.info), page
        if page.endswith("Divergence.py"):  # opens on the home tour's story, from the committed runs table
            story = tour.collapse_pair(store.load_table("runs"))["showcase"]
            assert at.multiselect(key="div_runs").value == [f"{name} [precomputed]" for name in story] or not story
