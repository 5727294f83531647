"""core.analysis.trajectories on the tiny model, and the measured statistic on the embedded one."""

from __future__ import annotations

import numpy as np
import pytest

from core.analysis.trajectories import (
    compare_steps,
    random_walks,
    sentence_trajectory,
    sentence_vs_random,
    shuffled_walks,
    step_lengths,
    trajectory_test,
)

SENTENCES = [
    "The cat sat on the mat and looked at the door.",
    "Prices rose sharply in the third quarter of the year.",
    "She walked to the station before the rain started.",
    "Scientists found water on a distant moon last week.",
]


def test_step_lengths():
    np.testing.assert_allclose(step_lengths(np.array([[0, 0], [3, 4], [3, 4]])), [5, 0])


def test_layer0_trajectory_is_the_embedding_rows(tiny_lm):
    traj = sentence_trajectory(tiny_lm, SENTENCES[0])
    ids = tiny_lm.tokenizer(SENTENCES[0])["input_ids"]
    np.testing.assert_array_equal(traj.token_ids, ids)
    np.testing.assert_allclose(traj.points, tiny_lm.input_embeddings()[ids].numpy())
    assert traj.steps.shape == (len(ids) - 1,)


def test_deep_trajectory_drops_the_sink(tiny_lm):
    traj = sentence_trajectory(tiny_lm, SENTENCES[1], layer=3)
    ids = tiny_lm.tokenizer(SENTENCES[1])["input_ids"]
    assert traj.first_position == 1 and traj.points.shape == (len(ids) - 1, tiny_lm.hidden_size)


def test_walks(tiny_lm):
    walks = random_walks(tiny_lm, [5, 9], seed=0)
    assert [len(w) for w in walks] == [5, 9]
    assert not set(sum(walks, [])) & set(tiny_lm.tokenizer.all_special_ids)
    assert walks == random_walks(tiny_lm, [5, 9], seed=0)
    shuf = shuffled_walks([[1, 2, 3, 4]], copies=3, seed=0)
    assert all(w[0] == 1 and sorted(w) == [1, 2, 3, 4] for w in shuf)


def test_compare_steps_detects_shorter_steps():
    rng = np.random.default_rng(0)
    short = [rng.uniform(0, 1, 10) for _ in range(30)]
    long = [rng.uniform(0.5, 1.5, 10) for _ in range(30)]
    res = compare_steps(0, short, long)
    assert res.p_value < 1e-6 and res.common_language > 0.9
    assert compare_steps(0, long, short).p_value > 0.99  # one-sided
    assert "Mann-Whitney" in res.summary()


def test_trajectory_test_runs_at_two_layers(tiny_lm):
    for layer in (0, 2):
        res = trajectory_test(tiny_lm, SENTENCES, layer=layer, walks_per_text=3)
        assert res.n_real == 4 and res.n_random == 12 and 0 <= res.p_value <= 1
    res = trajectory_test(tiny_lm, SENTENCES, baseline="shuffled")
    assert res.baseline == "shuffled"


def test_sentence_vs_random(tiny_lm):
    traj, res, walks = sentence_vs_random(tiny_lm, SENTENCES[2], n_walks=20)
    assert walks.shape == (20, len(traj.steps)) and res.unit == "step"


def test_errors(tiny_lm):
    with pytest.raises(ValueError, match="needs at least 2: type a longer sentence"):
        sentence_trajectory(tiny_lm, "Hi")
    with pytest.raises(ValueError, match="outside 0..4"):
        sentence_trajectory(tiny_lm, SENTENCES[0], layer=9)
    with pytest.raises(ValueError, match="baseline must be one of"):
        trajectory_test(tiny_lm, SENTENCES, baseline="brownian")
    with pytest.raises(ValueError, match="at least 2 texts"):
        trajectory_test(tiny_lm, SENTENCES[:1])
    with pytest.raises(ValueError, match="use unit='step' for one"):
        compare_steps(0, [np.ones(3)], [np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match="n_walks must be at least 1"):
        sentence_vs_random(tiny_lm, SENTENCES[0], n_walks=0)


@pytest.mark.integration
def test_news_sentences_on_the_embedded_model(real_lm):
    from core.data import example_texts

    texts = [t.split(". ")[0] for t in example_texts("c4", 60, seed=0)]
    res = trajectory_test(real_lm, texts, layer=0)
    assert res.n_real >= 50 and 0.0 <= res.p_value <= 1.0
    assert 0.5 < res.real_mean_step < 50 and 0.5 < res.random_mean_step < 50


def test_reference_cloud(tiny_lm, tmp_path, monkeypatch):
    import core.activations as act
    from core.analysis.trajectories import reference_cloud

    monkeypatch.setattr(act, "cache_subdir", lambda name: (tmp_path / name).mkdir(exist_ok=True) or tmp_path / name)
    name, cloud, meta = reference_cloud(tiny_lm, 0)
    assert name == "vocabulary" and cloud.shape == (tiny_lm.model.config.vocab_size, tiny_lm.hidden_size)
    assert len(meta) == len(cloud) and {"token", "token_id"} <= set(meta.columns)
    name, cloud, meta = reference_cloud(tiny_lm, 2, n_texts=4, max_length=16)
    assert name == "news tokens, layer 2" and len(cloud) == len(meta) and (meta["position"] > 0).all()
