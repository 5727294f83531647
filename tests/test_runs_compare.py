"""Run comparison on real run folders trained here with the tuning engine on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from core.analysis import runs_compare as rc
from core.runs import load_run

GALLERY = [  # (dataset, method, prior, seed)
    ("math", "soft", "gaussian", 0), ("math", "soft", "gaussian", 1),
    ("math", "soft", "xavier", 0), ("math", "soft", "xavier", 1),
    ("squad", "deep", "gaussian", 0),
]


@pytest.fixture(scope="module")
def gallery(tiny_lm, tmp_path_factory):
    """Five short real runs on the tiny model: two priors x two seeds on MATH, one deep run on QA."""
    from core.data import load_examples
    from core.tuning import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    data = {d: (load_examples(d, split="train", n=8, seed=0), load_examples(d, split="validation", n=4, seed=0), [])
            for d in ("math", "squad")}
    for dataset, method, prior, seed in GALLERY:
        config = TrainConfig(method=method, dataset=dataset, prior=prior, seed=seed, steps=3, batch_size=2,
                             val_every=1, snapshot_every=1, n_train=8, n_val=4, eval_n=0, compute="fp32",
                             max_length=96, lr=0.05, layers=[3] if method == "deep" else [])
        train(tiny_lm, config, root / f"{dataset}-{method}-{prior}-{seed}", examples=data[dataset], evaluate=False)
    return root


def test_steps_to_loss():
    history = [{"step": 0, "val_loss": 3.0}, {"step": 5, "val_loss": None}, {"step": 10, "val_loss": 2.0},
               {"step": 20, "val_loss": 1.0}]
    assert rc.steps_to_loss(history, 2.5) == 10
    assert rc.steps_to_loss(history, 1.0) == 20
    assert rc.steps_to_loss(history, 0.5) is None


def test_headline_metric_reads_prompt_and_baseline():
    metrics = {"eval": {"prompt": {"accuracy": 0.25}, "no_prompt": {"accuracy": 0.1}}}
    assert rc.headline_metric(metrics) == ("accuracy", 0.25, 0.1)
    assert rc.headline_metric({}) == ("", None, None)


def test_all_runs_labels_both_roots(gallery, tmp_path):
    entries = rc.all_runs({"yours": gallery, "precomputed": tmp_path / "none"})
    assert len(entries) == len(GALLERY)
    assert {e.origin for e in entries} == {"yours"}
    assert all(e.label.endswith("[yours]") for e in entries)
    split = rc.all_runs({"yours": tmp_path / "none", "precomputed": gallery})
    assert {e.origin for e in split} == {"precomputed"}


def test_runs_table_and_claims(gallery, tiny_lm, monkeypatch):
    entries = rc.all_runs({"yours": gallery})
    # Divergence against the tiny model's 49k-token vocabulary is covered by the integration test;
    # here the table is built from the run folders alone.
    monkeypatch.setattr(rc, "_divergence_columns", lambda lm, run, tensor: {})
    table = rc.runs_table(tiny_lm, entries, target_loss=None)
    assert table["steps_to_loss"].isna().all()
    assert len(table) == len(GALLERY)
    assert set(table["prior"]) == {"gaussian", "xavier"}
    for _, row in table.iterrows():
        run = load_run(row["path"])
        vals = [h["val_loss"] for h in run.history if h["val_loss"] is not None]
        assert row["final_val_loss"] == pytest.approx(vals[-1])
        assert row["best_val_loss"] == pytest.approx(min(vals))
    target = rc.common_target(table)
    table = rc.runs_table(tiny_lm, entries, target_loss=target)
    assert table["steps_to_loss"].notna().all()  # every run reaches the largest best loss
    auto = rc.runs_table(tiny_lm, entries)  # per (method, dataset) group: a loss each of its runs reaches
    assert auto["steps_to_loss"].notna().all()
    assert auto.groupby(["method", "dataset"])["target_loss"].nunique().eq(1).all()
    with pytest.raises(ValueError, match="target_loss must be a number, 'auto' or None"):
        rc.runs_table(tiny_lm, entries, target_loss="soon")
    spread = rc.prior_spread(table)
    math_soft = spread[(spread["dataset"] == "math") & (spread["method"] == "soft")]
    assert set(math_soft["runs"]) == {2}
    verdict = rc.prior_significance(table)
    tested = [t for t in verdict["tests"] if t["dataset"] == "math"][0]
    assert 0.0 <= tested["p_value"] <= 1.0 and "Kruskal-Wallis" in tested["statement"]
    untested = [t for t in verdict["tests"] if t["dataset"] == "squad"][0]
    assert math.isnan(untested["p_value"]) and "no test" in untested["statement"]
    curves = rc.loss_curves(entries)
    assert set(curves["kind"]) == {"train", "validation"}
    assert curves.groupby("run")["step"].max().eq(3).all()


def test_divergence_vs_speed_sign():
    table = pd.DataFrame({"init_manifold_ratio": [1.0, 2.0, 3.0, 4.0, 5.0],
                          "steps_to_loss": [10, 20, 30, 40, 50]})
    out = rc.divergence_vs_speed(table)
    assert out["rho"] == pytest.approx(1.0) and "longer" in out["statement"]
    few = rc.divergence_vs_speed(table.head(2))
    assert math.isnan(few["rho"]) and "Not enough" in few["statement"]
    with pytest.raises(ValueError, match="column 'nope' is not in the run table"):
        rc.divergence_vs_speed(table, divergence_col="nope")


def test_transfer_matrix_scores_every_prompt_on_every_task(gallery, tiny_lm):
    paths = [e.path for e in rc.all_runs({"yours": gallery})]
    transfer = rc.transfer_matrix(tiny_lm, paths, n=4, compute="fp32", max_length=96)
    assert len(transfer) == len(paths) * 2
    assert set(transfer["evaluated_on"]) == {"math", "squad"}
    row = transfer.iloc[0]
    assert row["gain"] == pytest.approx(row["no_prompt_loss"] - row["loss"])
    # The scorer is the training loss: a run's own final validation loss is reproduced on its validation set.
    # (A MATH run: the fixture hands QA examples to the trainer unfitted, where the scorer fits them as the
    # trainer does when it loads them itself.)
    run = next(r for r in map(load_run, paths) if r.config["dataset"] == "math")
    from core.data import load_examples

    val = load_examples(run.config["dataset"], split="validation", n=4, seed=0)
    own = rc.prompt_loss(tiny_lm, rc.prompt_from_run(run, tiny_lm), val, compute="fp32", max_length=96)
    assert own == pytest.approx(run.history[-1]["val_loss"], rel=1e-4)


def test_distance_vs_transfer_on_constructed_losses(gallery):
    paths = {e.info.name: str(e.path) for e in rc.all_runs({"yours": gallery})}
    squad = paths["squad-deep-gaussian-0"]
    maths = [paths[f"math-soft-{p}-{s}"] for p in ("gaussian", "xavier") for s in (0, 1)]
    dist = {p: float(torch.linalg.matrix_norm(load_run(p).prompt["soft"] - load_run(squad).prompt["soft"]))
            for p in maths}
    ranked = sorted(maths, key=dist.get)
    rows = [{"path": squad, "trained_on": "squad", "evaluated_on": "squad", "loss": 2.0, "no_prompt_loss": 4.0}]
    for rank, p in enumerate(ranked):  # closer prompts recover more of the QA prompt's gain
        rows.append({"path": p, "trained_on": "math", "evaluated_on": "squad", "loss": 2.0 + 0.5 * rank,
                     "no_prompt_loss": 4.0})
        rows.append({"path": p, "trained_on": "math", "evaluated_on": "math", "loss": 1.0, "no_prompt_loss": 3.0})
    rows.append({"path": squad, "trained_on": "squad", "evaluated_on": "math", "loss": 2.0, "no_prompt_loss": 3.0})
    pairs, stats = rc.distance_vs_transfer(pd.DataFrame(rows))
    on_squad = pairs[pairs["task"] == "squad"].set_index("prompt_of")["transfer"]
    assert on_squad[load_run(ranked[0]).path.name] == pytest.approx(1.0)
    assert on_squad[load_run(ranked[-1]).path.name] == pytest.approx(0.25)
    closest = pairs[(pairs["prompt_of"] == load_run(ranked[0]).path.name) & (pairs["task"] == "squad")]
    assert float(closest["distance"].iloc[0]) == pytest.approx(dist[ranked[0]], rel=1e-5)
    assert stats["n"] == len(pairs) == 8
    assert not math.isnan(stats["spearman"])
    with pytest.raises(ValueError, match="build it with transfer_matrix"):
        rc.distance_vs_transfer(pd.DataFrame({"path": []}))


def test_errors(gallery, tiny_lm):
    run = load_run(next(iter(rc.all_runs({"yours": gallery}))).path)
    with pytest.raises(ValueError, match="has no tensor 'deep.9'"):
        rc.run_divergence(tiny_lm, run, "deep.9")
    with pytest.raises(ValueError, match="unknown prompt tensor 'other'"):
        rc.prompt_reference(tiny_lm, "other", run)
    with pytest.raises(ValueError, match="no runs given"):
        rc.transfer_matrix(tiny_lm, [])
    with pytest.raises(ValueError, match="no run in the table has a validation loss"):
        rc.common_target(pd.DataFrame({"best_val_loss": [math.nan]}))
    with pytest.raises(ValueError, match="column 'x' is not in the run table"):
        rc.prior_spread(pd.DataFrame({"a": [1]}), "x")


def test_foreign_runs_are_refused(gallery, tiny_lm):
    from core.models import tiny_llama

    other = tiny_llama(num_layers=2, hidden_size=32, vocab_size=300, seed=3)
    run = load_run(next(iter(rc.all_runs({"yours": gallery}))).path)
    with pytest.raises(ValueError, match="do not live in this model's space"):
        rc.run_divergence(other, run)
    with pytest.raises(ValueError, match="transfer needs runs of the loaded model"):
        rc.transfer_matrix(other, [run.path])


def test_interpolation_positions_on_the_math_c4_axis(gallery, tiny_lm):
    axis = rc.math_c4_axis(tiny_lm, 3, n_docs=8)
    ends = rc.axis_position(torch.from_numpy(np.stack(axis)), axis)
    assert ends == pytest.approx([0.0, 1.0])
    deep = [e.path for e in rc.all_runs({"yours": gallery}) if e.info.method == "deep"]
    table = rc.interpolation_positions(tiny_lm, deep)
    assert set(table["kind"]) == {"prior", "posterior"}
    assert set(table["tensor"]) == {"soft", "deep.3"}
    assert set(table[table["tensor"] == "deep.3"]["layer"]) == {3}
    assert len(table) == 2 * 2 * 20
    with pytest.raises(ValueError, match="the two cluster means coincide"):
        rc.axis_position(torch.zeros(2, 4), (np.zeros(4), np.zeros(4)))


def test_interpolation_view_round_trips_through_the_artifact_store(gallery, tiny_lm, tmp_path):
    from core.artifacts import ArtifactStore

    deep = [e.path for e in rc.all_runs({"yours": gallery}) if e.info.method == "deep"]
    store = ArtifactStore(tmp_path / "art")
    built = rc.save_interpolation_view(store, tiny_lm, 3, deep)
    assert set(built.points["kind"]) == {"data", "prior sample", "prior", "trained"}
    assert set(built.points[built.points["kind"] == "data"]["group"]) == {"c4", "squad", "math"}
    loaded = rc.load_interpolation_view(store, tiny_lm.fingerprint, 3, [deep[0].name])
    assert len(loaded.points) == len(built.points) and loaded.note.endswith("(precomputed)")
    without_runs = rc.load_interpolation_view(store, tiny_lm.fingerprint, 3, [])
    assert set(without_runs.points["kind"]) == {"data", "prior sample"}
    assert rc.load_interpolation_view(store, tiny_lm.fingerprint, 3, ["some-other-run"]) is None
    assert rc.load_interpolation_view(store, "another-model", 3, []) is None
    assert rc.load_interpolation_view(store, tiny_lm.fingerprint, 2, []) is None


def test_prior_baseline_redraws_the_runs_prior(gallery, tiny_lm):
    from core.analysis import divergence as dv
    from core.analysis.run_views import prior_baseline, prior_draws

    run = load_run(gallery / "math-soft-gaussian-0")
    draws = prior_draws(tiny_lm, run, "soft", n=20, draws=3)
    assert draws.shape == (3, 20, tiny_lm.hidden_size)
    assert not np.allclose(draws[0], draws[1])
    # sigma 0.02 as recorded: the draws' spread matches the run's step-0 sample
    assert draws.std() == pytest.approx(float(run.snapshots["soft"][0].std()), rel=0.1)
    ref = dv.ReferenceCloud(tiny_lm.input_embeddings()[:400].numpy(), key="tiny-400")
    band, why = prior_baseline(tiny_lm, run, "soft", ref, n=20, draws=3)
    assert why == "" and set(band["measure"]) >= {"collapsed_share", "median_nearest_cos"}
    assert (band["low"] <= band["mean"]).all() and (band["mean"] <= band["high"]).all()
    assert (band["draws"] == 3).all()


def test_moved_names_stay_importable_from_runs_compare():
    from core.analysis import claims, loss_curves, run_views, transfer

    assert rc.transfer_matrix is transfer.transfer_matrix and rc.prior_significance is claims.prior_significance
    assert rc.loss_curves is loss_curves.loss_curves and rc.divergence_view is run_views.divergence_view
    from core.analysis.runs_compare import DivergenceView, interpolation_positions  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        rc.nope  # noqa: B018
