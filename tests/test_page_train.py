"""AppTest smoke tests of the Train page."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "5_Train.py")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    import core.paths

    monkeypatch.setattr(core.paths, "RUNS_DIR", tmp_path / "runs")


def test_page_renders_with_no_job():
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    assert any(b.label == "Start training" for b in at.button)
    assert any("Start training" in i.value for i in at.info)


def test_page_guards_web_text():
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state["dataset"] = "c4"
    at.run()
    assert not at.exception
    assert any("no answers to score" in i.value for i in at.info)


def test_page_offers_the_prior_lab_sample():
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state["prior_sample"] = {"tensor": torch.zeros(20, 576), "prior": {"name": "gaussian", "dim": 576,
                                        "sigma": 0.02, "seed": 0}, "describe": "N(0, 0.02²)"}
    at.run()
    assert not at.exception
    assert any("Prior-lab sample" in t.label for t in at.toggle)


def _train_two_steps(at: AppTest):  # noqa: ANN202 - a core.jobs job
    """Start a two-step run from the page's settings and wait for it: the finished job."""
    from core import jobs

    at.number_input(key="train_steps").set_value(2)
    at.number_input(key="train_batch").set_value(2)
    at.number_input(key="train_eval_n").set_value(0)
    at.button(key="train_start").click().run()
    assert not at.exception
    job = jobs.get_job(at.session_state["train_job"])
    deadline = time.time() + 240
    while not job.finished and time.time() < deadline:
        time.sleep(1)
    assert job.snapshot()["state"] == "done", job.snapshot()
    return job


@pytest.mark.integration
def test_page_trains_in_background_and_shows_results(tmp_path):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    _train_two_steps(at)
    at.run()
    assert not at.exception
    assert any("Validation loss" in s.value for s in at.success)
    assert len(at.dataframe) >= 1  # the run list now holds the run


@pytest.mark.integration
def test_page_trains_deep_vectors_alone_from_cached_activations():
    """Deep with the soft-prompt toggle off: the run trains the deep vectors only, from the cached input of the
    first prompted layer, and the Prior-lab sample (token-level vectors for a soft prompt) is not offered."""
    import json

    from safetensors.torch import load_file

    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state["prior_sample"] = {"tensor": torch.zeros(20, 576), "prior": {"name": "gaussian", "dim": 576,
                                        "sigma": 0.02, "seed": 0}, "describe": "N(0, 0.02²)"}
    at.run()
    at.radio(key="train_method").set_value("deep").run()
    at.toggle(key="train_deep_soft").set_value(False).run()
    assert not any("Prior-lab sample" in t.label for t in at.toggle)
    job = _train_two_steps(at)
    config = json.loads((job.out_dir / "run.json").read_text())["config"]
    assert config["soft"] is False and config["cached_from_layer"] == 27
    assert set(load_file(job.out_dir / "prompt.safetensors")) == {"deep.27", "deep.28", "deep.29"}


def test_page_offers_a_sweep_of_priors_and_seeds():
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    assert any(b.label == "Start sweep" for b in at.button)
    assert at.multiselect(key="sweep_priors").value == ["gaussian", "fitted"]
