"""Training that converges (issue 11, part 1): schedules, the plateau stop, per-tensor deep rates, drift."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from core import runs
from core.analysis.runs_compare import RunEntry, runs_table
from core.cli_train import add_arguments, config_from_args
from core.sweep import expand, train_parser
from core.tuning import TrainConfig, train
from core.tuning.convergence import (
    deep_lr_scales,
    lr_factor,
    plateau_reached,
    plateau_state,
    token_nn_gap,
)
from tests.test_tuning import DATA, _init


def _config(**kw) -> TrainConfig:
    base = dict(dataset="math", steps=4, batch_size=4, val_every=1, snapshot_every=2, eval_n=0, n_val=8,
                compute="fp32", n_tokens=4, lr=0.05)
    return TrainConfig(**{**base, **kw})


def _soft_init(lm) -> dict:
    return {"soft": _init("soft", lm)["soft"][:4]}


def _run_json(path) -> dict:
    return json.loads((path / runs.RUN_JSON).read_text())


# --------------------------------------------------------------------------- the rules as functions


def test_plateau_rule_counts_evaluations_without_a_relative_gain():
    assert plateau_state([2.0, 1.5], 0.01) == (1.5, 0)
    # creeping down by 0.5% per evaluation never beats the reference by 1%, then does: the count restarts
    creeping = [1.0, 0.995, 0.991, 0.985]
    assert plateau_state(creeping, 0.01) == (0.985, 0)
    flat = [1.0, 0.999, 0.998, 1.001, 0.9995, 0.998]
    assert not plateau_reached(flat[:5], 0.01, 5) and plateau_reached(flat, 0.01, 5)
    assert not plateau_reached(flat, 0.01, 0)  # patience 0: the plateau stop is off
    assert not plateau_reached([1.0, 0.5, 0.25, 0.12, 0.06, 0.03], 0.01, 2)  # still learning


def test_constant_schedule_keeps_its_rate_after_the_warmup():
    assert [lr_factor(s, 3, 100, "constant") for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert lr_factor(99, 3, 100, "constant") == 1.0 and lr_factor(99, 3, 100, "linear") < 0.02
    assert TrainConfig(steps=400).warmup_steps == 10 and TrainConfig(steps=400, schedule="linear").warmup_steps == 40
    with pytest.raises(ValueError, match="schedule must be one of constant, linear"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="plateau_patience must be 0"):
        TrainConfig(plateau_patience=-1)
    with pytest.raises(ValueError, match="plateau_margin must be a relative gain"):
        TrainConfig(plateau_margin=1.5)


# --------------------------------------------------------------------------- the plateau stop in training


def test_plateau_stop_ends_the_run_as_converged(tiny_lm, tmp_path):
    # a 90% margin no evaluation can beat: the rule stops the run after `patience` evaluations, far inside the budget
    result = train(tiny_lm, _config(steps=50, plateau_patience=3, plateau_margin=0.9), tmp_path / "p",
                   init=_soft_init(tiny_lm), examples=DATA)
    assert result.status == "done" and result.converged and result.stop_reason == "plateau"
    assert result.history[-1]["step"] == 3 and "converged at step 3" in result.message
    data = _run_json(tmp_path / "p")
    assert data["converged"] is True and data["stop_reason"] == "plateau" and data["steps_done"] == 3
    assert "3 consecutive evaluations" in data["stop_rule"] and "90%" in data["stop_rule"]
    assert runs.run_info(tmp_path / "p").converged is True


def test_budget_hit_is_not_converged(tiny_lm, tmp_path):
    for name, patience in (("off", 0), ("long", 40)):
        result = train(tiny_lm, _config(steps=3, plateau_patience=patience, plateau_margin=0.9), tmp_path / name,
                       init=_soft_init(tiny_lm), examples=DATA)
        data = _run_json(tmp_path / name)
        assert result.status == "done" and not result.converged and result.history[-1]["step"] == 3, name
        assert data["converged"] is False and data["stop_reason"] == "budget", name
        assert "not converged" in result.message


def test_resume_across_the_plateau_stop_equals_an_uninterrupted_run(tiny_lm, tmp_path):
    cfg = dict(steps=40, plateau_patience=2, plateau_margin=0.002, lr=0.2)  # stops at step 8
    straight = train(tiny_lm, _config(**cfg), tmp_path / "a", init=_soft_init(tiny_lm), examples=DATA)
    stop = straight.history[-1]["step"]
    assert straight.converged and 5 <= stop < 40, stop  # the rule, not the budget, ended it, after some learning
    cancel = threading.Event()

    def stop_before(progress) -> None:
        if progress.step == stop - 1:  # one evaluation short: the count of evaluations spans the interruption
            cancel.set()

    part = train(tiny_lm, _config(**cfg), tmp_path / "b", init=_soft_init(tiny_lm), examples=DATA,
                 on_progress=stop_before, cancel=cancel)
    assert part.status == "cancelled" and not part.converged and part.stop_reason == "cancelled"
    assert _run_json(tmp_path / "b")["converged"] is False
    resumed = train(tiny_lm, _config(**cfg), tmp_path / "b", examples=DATA, resume=True)
    assert resumed.converged and resumed.history == straight.history
    for name in straight.prompt:
        assert torch.equal(straight.prompt[name], resumed.prompt[name]), name
    again = train(tiny_lm, _config(**cfg), tmp_path / "b", examples=DATA, resume=True)  # converged: no more steps
    assert again.converged and again.history == straight.history


# --------------------------------------------------------------------------- per-tensor deep rates


def test_deep_tensors_get_their_layers_activation_scale(tiny_lm, tmp_path):
    cfg = dict(method="deep", layers=[2, 3], steps=1, prior="gaussian")
    init = {k: v[:4] for k, v in _init("deep", tiny_lm).items() if k in ("soft", "deep.2", "deep.3")}
    scaled = train(tiny_lm, _config(**cfg), tmp_path / "s", init=init, examples=DATA)
    flat = train(tiny_lm, _config(**cfg, scale_deep_lr=False), tmp_path / "f", init=init, examples=DATA)
    config = _run_json(tmp_path / "s")["config"]
    texts = [ex.prompt + ex.target for ex in DATA[0][:8]]
    expected = deep_lr_scales(tiny_lm, texts, [2, 3])
    assert config["lr_scales"] == pytest.approx({f"deep.{k}": v for k, v in expected.items()})
    assert config["lr_per_tensor"]["soft"] == 0.05
    assert config["lr_per_tensor"]["deep.3"] == pytest.approx(0.05 * expected[3]) and expected[3] > 1.2
    groups = torch.load(tmp_path / "s" / runs.CHECKPOINT_FILE, weights_only=False)["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["soft", "deep.2", "deep.3"]
    assert _run_json(tmp_path / "f")["config"]["lr_scales"] == {}
    # Adam's first update is the rate per coordinate: the scaled deep tensor moves `scale` times as far
    moved = {k: float((r.prompt["deep.3"] - init["deep.3"]).norm()) for k, r in (("s", scaled), ("f", flat))}
    assert moved["s"] / moved["f"] == pytest.approx(expected[3], rel=0.02)
    soft = [float((r.prompt["soft"] - init["soft"]).norm()) for r in (scaled, flat)]
    assert soft[0] == pytest.approx(soft[1], rel=1e-5)  # the soft prompt keeps lr


# --------------------------------------------------------------------------- drift, tables, older runs, options


def test_drift_is_measured_against_the_initial_norm_and_the_token_gap(tiny_lm, tmp_path):
    init = _soft_init(tiny_lm)
    result = train(tiny_lm, _config(steps=2, plateau_patience=0), tmp_path / "d", init=init, examples=DATA)
    drift = result.metrics["drift"]["soft"]
    l2 = float((result.prompt["soft"] - init["soft"]).norm(dim=1).mean())
    assert drift["l2"] == pytest.approx(l2, rel=1e-5) and l2 > 0
    assert drift["relative_to_init_norm"] == pytest.approx(l2 / float(init["soft"].norm(dim=1).mean()), rel=1e-5)
    assert drift["relative_to_token_nn_gap"] == pytest.approx(l2 / token_nn_gap(tiny_lm), rel=1e-5)
    assert runs.drift_rows(_run_json(tmp_path / "d")["metrics"])[0]["tensor"] == "soft"


def test_runs_table_has_converged_and_old_runs_read_as_not_converged(tiny_lm, tmp_path):
    train(tiny_lm, _config(steps=20, plateau_patience=2, plateau_margin=0.9), tmp_path / "new",
          init=_soft_init(tiny_lm), examples=DATA)
    train(tiny_lm, _config(steps=1), tmp_path / "old", init=_soft_init(tiny_lm), examples=DATA)
    old = _run_json(tmp_path / "old")
    for key in ("converged", "stop_reason", "stop_rule"):
        old.pop(key)
    old["metrics"].pop("drift")
    runs.write_json(tmp_path / "old" / runs.RUN_JSON, old)
    assert runs.run_info(tmp_path / "old").converged is False and runs.run_info(tmp_path / "new").converged
    entries = [RunEntry(info, "yours") for info in runs.list_runs(tmp_path)]
    table = runs_table(tiny_lm, entries).set_index("run")
    assert table["converged"].dtype == bool
    assert table.loc["new", "converged"] and not table.loc["old", "converged"]
    assert table.loc["new", "steps_done"] == 2 and table.loc["new", "drift_rel_init"] > 0
    assert table["drift_rel_init"].isna().sum() == 1  # the old run recorded no drift
    # the dtype each run trained in: a gallery built over sittings on several machines may mix them
    assert set(table["compute"]) == {runs.read_run_json(tmp_path / "new")["config"]["compute_resolved"]} == {"fp32"}


def test_old_checkpoint_resumes_only_with_the_old_training_rules(tiny_lm, tmp_path):
    legacy = dict(schedule="linear", plateau_patience=0)
    train(tiny_lm, _config(steps=1, **legacy), tmp_path / "o", init=_soft_init(tiny_lm), examples=DATA)
    path = tmp_path / "o" / runs.CHECKPOINT_FILE
    state = torch.load(path, weights_only=False)
    for key in ("schedule", "plateau_patience", "plateau_margin", "scale_deep_lr"):
        state["train_config"].pop(key)
    state.pop("lr_scales")
    torch.save(state, path)
    with pytest.raises(ValueError, match="its config differs in .*schedule"):
        train(tiny_lm, _config(steps=2), tmp_path / "o", examples=DATA, resume=True)
    resumed = train(tiny_lm, _config(steps=2, **legacy), tmp_path / "o", examples=DATA, resume=True)
    assert resumed.status == "done" and resumed.history[-1]["step"] == 2 and not resumed.converged


def test_max_steps_option_and_sweeps_pass_the_new_fields():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag in ("--max-steps", "--steps"):
        assert config_from_args(parser.parse_args([flag, "7"])).steps == 7
    config = config_from_args(parser.parse_args(["--schedule", "linear", "--plateau-patience", "0",
                                                 "--no-deep-lr-scale"]))
    assert (config.schedule, config.plateau_patience, config.scale_deep_lr) == ("linear", 0, False)
    default = config_from_args(parser.parse_args([]))
    assert (default.schedule, default.plateau_patience, default.steps) == ("constant", 5, 400)
    sweep = train_parser()
    trials = expand(sweep, sweep.parse_args(["--method", "deep"]),
                    {"max-steps": ["30"], "plateau_margin": ["0.02"], "scale_deep_lr": ["false", "true"]})
    assert [t.config["scale_deep_lr"] for t in trials] == [False, True]
    assert trials[0].config["steps"] == 30 and trials[0].config["plateau_margin"] == 0.02
