"""Sweeps on the tiny random LLaMA: grid expansion, resume, contained failures, the lock, the Ray backend, summary."""

from __future__ import annotations

import json
import math
import os
import signal
import threading

import numpy as np
import pandas as pd
import pytest

from core.locks import FolderLock, LockHeld
from core.sweep import TINY_MODEL, expand, parse_grid, read_sweep, run_sweep, train_parser

SMALL = ["--model", TINY_MODEL, "--dataset", "math", "--steps", "2", "--batch-size", "2", "--n-train", "4",
         "--n-val", "2", "--eval-n", "0", "--val-every", "1", "--compute", "fp32", "--threads", "1"]


def _trials(grid: dict, *extra: str):
    parser = train_parser()
    return expand(parser, parser.parse_args([*SMALL, *extra]), grid)


def _histories(path) -> dict:
    return {t["name"]: json.loads((path / t["name"] / "run.json").read_text())["history"]
            for t in read_sweep(path)["trials"] if t["status"] == "done"}


def test_grid_expands_to_named_trials_and_refuses_bad_options():
    trials = _trials(parse_grid(["prior=gaussian,xavier", "seed=0,1", "prior-param.sigma=0.05"]))
    assert [t.name for t in trials] == ["soft-math-gaussian-s0-sigma0.05", "soft-math-gaussian-s1-sigma0.05",
                                        "soft-math-xavier-s0-sigma0.05", "soft-math-xavier-s1-sigma0.05"]
    assert trials[1].config["seed"] == 1 and trials[0].config["prior_params"] == {"sigma": 0.05}
    assert trials[0].model == {"name": TINY_MODEL, "precision": "fp32", "device": "auto"}
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_grid(["prior"])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["seed=0", "seed=1"])
    with pytest.raises(ValueError, match="unknown sweep key 'sede'"):
        _trials({"sede": ["0"]})
    with pytest.raises(ValueError, match="--dataset value 'c5' is not one of"):
        _trials({"dataset": ["c5"]})
    with pytest.raises(ValueError, match="--seed value 'x' is not valid"):
        _trials({"seed": ["x"]})
    deep = _trials({"layers": ["2 3", "3"]}, "--method", "deep", "--no-soft")  # a list option, gridded
    assert [t.name for t in deep] == ["deep-math-gaussian-s0-layers2.3", "deep-math-gaussian-s0-layers3"]
    assert [t.config["layers"] for t in deep] == [[2, 3], [3]] and not deep[0].config["soft"]
    with pytest.raises(ValueError, match="--layers value .* is not valid"):
        _trials({"layers": ["2 x"]}, "--method", "deep")
    bad = _trials({"lr": ["1e-3", "nan"]})
    assert bad[0].config is not None and bad[1].config is None and "lr must be a positive number" in bad[1].error


def test_a_page_sweep_of_deep_prompts_keeps_its_layers_and_soft_choice():
    """The Train page passes its settings as options: a list of layers and the soft-prompt switch by field name."""
    from core.sweep import plan_trials

    options = {"model": TINY_MODEL, "method": "deep", "dataset": "math", "layers": [1, 3], "soft": False}
    spec, trials = plan_trials(options, {"prior": ["gaussian", "xavier"], "seed": [0]})
    assert [t.config["layers"] for t in trials] == [[1, 3], [1, 3]]
    assert [t.config["soft"] for t in trials] == [False, False]
    assert spec.options["layers"] == [1, 3]


def test_summary_keeps_trials_of_different_grid_settings_apart(tmp_path):
    """A sweep that grids a setting other than prior and seed (layers, a prior parameter) summarises each setting
    on its own, in the CLI's trial table and on the Runs page (its grid values read from the sweep's record)."""
    from types import SimpleNamespace

    from core.analysis.sweeps import format_summary, group_label, sweep_summary, with_status

    table = pd.DataFrame({"method": "deep", "dataset": "math", "prior": "gaussian", "seed": [0, 1, 0, 1],
                          "grid.layers": ["2 3", "2 3", "3", "3"], "grid.seed": [0, 1, 0, 1],
                          "status": "done", "final_val_loss": [1.0, 1.2, 2.0, 2.2]})
    summary = sweep_summary(table, measures=("final_val_loss",)).set_index("grid.layers")
    assert summary.loc["2 3", "n"] == 2 and summary.loc["2 3", "mean"] == pytest.approx(1.1)
    assert summary.loc["3", "mean"] == pytest.approx(2.1)
    assert sorted(group_label(summary.reset_index())) == ["deep / math / layers 2 3", "deep / math / layers 3"]
    mixed = pd.concat([table, table.head(1).assign(method="soft", **{"grid.layers": np.nan})], ignore_index=True)
    assert len(format_summary(sweep_summary(mixed, measures=("final_val_loss",)))) == 3
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"trials": [
        {"name": "a", "overrides": {"layers": [2, 3], "seed": 0}}, {"name": "b", "overrides": {"layers": "3"}}]}))
    entries = [SimpleNamespace(info=SimpleNamespace(name=n, status="done"), path=folder / n) for n in ("a", "b")]
    runs = with_status(pd.DataFrame({"run": ["a", "b"], "method": "deep", "dataset": "math", "prior": "x"}), entries)
    assert list(runs["grid.layers"]) == ["2 3", "3"] and list(runs["status"]) == ["done", "done"]


def test_local_sweep_contains_failures_and_resumes(tiny_lm, tmp_path):
    out = tmp_path / "sweep"
    # lr=nan: an invalid config; sigma=1e39: the prior raises (its samples overflow); a NaN clip: the loss diverges
    trials = _trials({"prior": ["gaussian"], "seed": ["0", "1"], "lr": ["1e-3", "nan"]})
    trials += _trials({"prior-param.sigma": ["1e39"]}) + _trials({"max-grad-norm": ["nan"]})
    result = run_sweep(out, trials, lm=tiny_lm, progress=False)
    record = read_sweep(out)
    status = {t["name"]: t for t in record["trials"]}
    assert result.counts == {"pending": 0, "running": 0, "done": 2, "failed": 4}
    assert "lr must be a positive number" in status["soft-math-gaussian-s0-lrnan"]["error"]
    assert "non-finite values" in status["soft-math-gaussian-s0-sigma1e39"]["error"]
    diverged = status["soft-math-gaussian-s0-max-grad-normnan"]
    assert diverged["status"] == "failed" and "loss" in diverged["error"], diverged  # diverged, with its reason
    for name in ("soft-math-gaussian-s0-lr1e-3", "soft-math-gaussian-s1-lr1e-3"):
        assert status[name]["status"] == "done" and status[name]["seconds"] > 0
        assert (out / name / "run.json").is_file() and status[name]["config"]["lr"] == 1e-3
    before = _histories(out)
    again = run_sweep(out, trials, lm=tiny_lm, progress=False)
    assert again.ran == [] and _histories(out) == before  # done skipped, failed not retried
    retried = run_sweep(out, trials, lm=tiny_lm, progress=False, retry_failed=True)
    assert retried.ran == ["soft-math-gaussian-s0-sigma1e39", "soft-math-gaussian-s0-max-grad-normnan"]  # not lr=nan
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(out, _trials({"prior": ["gaussian"], "seed": ["0", "1"], "lr": ["1e-3"]}, "--batch-size", "1"),
                  lm=tiny_lm, progress=False)


def test_second_sweep_on_a_folder_is_refused(tiny_lm, tmp_path):
    out = tmp_path / "sweep"
    with FolderLock(out, purpose="another sweep"), pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        run_sweep(out, _trials({"seed": ["0"]}), lm=tiny_lm, progress=False)


def test_cancel_keeps_a_resumable_trial(tiny_lm, tmp_path):
    out = tmp_path / "sweep"
    trials = _trials({"seed": ["0", "1"]}, "--steps", "4")
    cancel = threading.Event()

    def on_event(kind, name, info):
        if kind == "progress" and info["step"] >= 2:
            cancel.set()

    first = run_sweep(out, trials, lm=tiny_lm, progress=False, cancel=cancel, on_event=on_event)
    assert first.interrupted and first.counts["done"] == 0
    stopped = read_sweep(out)["trials"][0]
    assert stopped["status"] == "pending" and "resumes" in stopped["note"]
    resumed = run_sweep(out, trials, lm=tiny_lm, progress=False)
    assert resumed.counts["done"] == 2
    fresh = tmp_path / "fresh"
    run_sweep(fresh, trials, lm=tiny_lm, progress=False)
    assert _histories(out) == _histories(fresh)  # resuming from the checkpoint equals an uninterrupted trial


def test_summary_has_t_intervals_and_no_interval_for_one_seed():
    from scipy import stats

    from core.analysis.sweeps import format_summary, sweep_summary

    table = pd.DataFrame({"method": "soft", "dataset": "math", "prior": ["a", "a", "a", "b", "b"],
                          "seed": [0, 1, 2, 0, 1], "status": ["done"] * 4 + ["failed"],
                          "final_val_loss": [1.0, 1.2, 1.4, 2.0, np.nan]})
    summary = sweep_summary(table, measures=("final_val_loss",)).set_index("prior")
    low, high = stats.t.interval(0.95, 2, loc=1.2, scale=stats.sem([1.0, 1.2, 1.4]))
    assert summary.loc["a", "n"] == 3 and summary.loc["a", "ci_low"] == pytest.approx(low)
    assert summary.loc["a", "ci_high"] == pytest.approx(high)
    assert summary.loc["b", "n"] == 1 and summary.loc["b", "failed"] == 1
    assert math.isnan(summary.loc["b", "ci_low"]) and math.isnan(summary.loc["b", "ci_high"])
    assert format_summary(sweep_summary(table, measures=("final_val_loss",)))["final_val_loss"].iloc[1] == "2 [-]"


def test_cli_sweep_then_sweeps_summary(tmp_path, capsys):
    from core.__main__ import main

    out = tmp_path / "cli"
    argv = ["sweep", *SMALL, "--grid", "prior=gaussian,xavier", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["soft-math-gaussian-s0", "soft-math-xavier-s0"]
    assert main(["sweep", "--out", str(out), "--no-progress"]) == 0  # resumes from sweep.json: nothing to train
    assert "0 trial(s) run" in capsys.readouterr().out
    assert main(["sweeps", str(tmp_path)]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["sweeps", "--summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final_val_loss" in printed and "xavier" in printed


def test_committed_gallery_is_a_done_sweep_with_intervals():
    from core.analysis.sweeps import DIVERGENCE, sweep_summary, sweep_table
    from core.paths import ARTIFACTS_DIR
    from core.precompute import FULL, gallery_specs

    gallery = ARTIFACTS_DIR / "runs"
    record = read_sweep(gallery)
    assert record["counts"]["done"] == len(record["trials"]) == len(gallery_specs(FULL)) and record["name"] == "gallery"
    assert all(t["converged"] for t in record["trials"])
    summary = sweep_summary(sweep_table(gallery))
    loss = summary[summary["measure"] == "final_val_loss"].set_index(["method", "dataset", "prior"])
    for key, seeds in ((("soft", "math", "gaussian"), FULL.soft_math_seeds), (("soft", "squad", "vae"), FULL.qa_seeds),
                       (("deep", "math", "fitted"), FULL.deep_seeds)):
        assert loss.loc[key, "n"] == seeds
        assert loss.loc[key, "ci_low"] < loss.loc[key, "mean"] < loss.loc[key, "ci_high"]
    divergence = summary[summary["measure"].isin(DIVERGENCE)]
    soft = divergence[divergence["method"] == "soft"]  # the gallery's deep runs have no token-level soft prompt
    assert len(soft) and soft["mean"].notna().all()  # read from the committed runs.csv, no model
    assert {"collapsed_share", "init_collapsed_share"} <= set(divergence["measure"])  # trained beside step 0


# --------------------------------------------------------------------------- Ray: a local 2-CPU cluster


def test_ray_and_local_backends_give_equal_histories(ray_cluster, tmp_path):
    node = ray_cluster.nodes()[0]["NodeManagerAddress"]
    assert node == "127.0.0.1"  # the test cluster listens on localhost only
    trials = _trials({"prior": ["gaussian", "xavier"], "seed": ["0", "1"]})
    running: set[str] = set()
    most = [0]

    def on_event(kind, name, info):  # trials running at once: never more than the 2-CPU cluster holds
        if kind == "started":
            running.add(name)
        elif kind == "finished":
            running.discard(name)
        most[0] = max(most[0], len(running))

    on_ray = run_sweep(tmp_path / "ray", trials, backend="ray", backend_options={"cpus_per_trial": 1},
                       on_event=on_event, progress=False)
    # Ray lends a task's CPUs to queued tasks while it waits in ray.get; the backend submits 2 at a time
    assert 1 <= most[0] <= 2
    on_local = run_sweep(tmp_path / "local", trials, backend="local", progress=False)
    assert on_ray.counts["done"] == on_local.counts["done"] == 4
    ray_h, local_h = _histories(tmp_path / "ray"), _histories(tmp_path / "local")
    assert ray_h.keys() == local_h.keys() and len(ray_h) == 4
    for name in ray_h:
        for a, b in zip(ray_h[name], local_h[name], strict=True):
            for key in ("train_loss", "val_loss"):
                assert (a[key] is None) == (b[key] is None)
                if a[key] is not None:
                    assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (name, a, b)
    assert read_sweep(tmp_path / "ray")["backend_options"]["cpus_per_trial"] == 1
    assert run_sweep(tmp_path / "ray", trials, backend="ray", progress=False).ran == []


def test_ray_killed_worker_fails_only_its_trial(ray_cluster, tmp_path):
    trials = _trials({"steps": ["500", "3"]})  # the victim trains long enough to be killed while it runs
    victim = trials[0].name

    def on_event(kind, name, info):
        if kind == "started" and name == victim:
            os.kill(info["pid"], signal.SIGKILL)

    result = run_sweep(tmp_path / "killed", trials, backend="ray", on_event=on_event, progress=False)
    status = {t["name"]: t for t in read_sweep(tmp_path / "killed")["trials"]}
    assert status[victim]["status"] == "failed" and "worker process died" in status[victim]["error"]
    assert status[trials[1].name]["status"] == "done" and result.counts["done"] == 1


@pytest.mark.integration
def test_runs_page_shows_the_gallery_sweep_with_intervals(real_lm):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../pages/8_Runs.py", default_timeout=600).run()
    assert not at.exception, at.exception
    assert "gallery [precomputed]" in at.selectbox(key="runs_sweep").options
    shown = next(d.value for d in at.dataframe if "ci" in d.value.columns)
    cis = dict(zip(shown["method"] + "/" + shown["dataset"] + "/" + shown["prior"], shown["ci"], strict=True))
    assert len(cis) == 15 and all(ci.startswith("[") for ci in cis.values())  # every prior has 3 or 5 seeds


def test_background_sweep_job_runs_and_cancels(tiny_lm, tmp_path):
    import time

    from core import jobs
    from core.sweep import plan_trials

    options = {"model": TINY_MODEL, "steps": 2, "batch-size": 2, "n-train": 4, "n-val": 2, "eval-n": 0,
               "compute": "fp32"}
    spec, trials = plan_trials(options, {"prior": ["gaussian"], "seed": [0, 1]})
    job = jobs.get_job(jobs.start_sweep_job(tiny_lm, tmp_path / "bg", trials, spec))
    job.thread.join(timeout=120)
    snap = job.snapshot()
    assert snap["state"] == "done" and snap["counts"]["done"] == 2 and len(snap["finished"]) == 2
    assert read_sweep(tmp_path / "bg")["spec"]["grid"] == {"prior": ["gaussian"], "seed": ["0", "1"]}
    stopped = jobs.get_job(jobs.start_sweep_job(tiny_lm, tmp_path / "stop", trials, spec))
    stopped.cancel()
    stopped.thread.join(timeout=120)
    assert stopped.snapshot()["state"] == "cancelled" and time.time() - stopped.started < 120


def test_spec_file_fills_options_the_command_line_leaves_at_default(tmp_path):
    import argparse

    from core.cli_sweep import _base_options, add_arguments
    from core.sweep import load_spec

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"options": {"steps": 7, "lr": 0.01, "prior-param": {"sigma": 0.1}},
                                     "grid": {"seed": [0, 1]}}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--spec", str(spec_file), "--lr", "0.02", "--out", str(tmp_path / "x")])
    spec = load_spec(args.spec)
    ns, changed = _base_options(args, spec.options)
    assert (ns.steps, ns.lr, dict(ns.prior_param)) == (7, 0.02, {"sigma": 0.1})  # --lr on the command line wins
    assert changed == {"steps": 7, "lr": 0.02, "prior-param": {"sigma": 0.1}} and spec.grid == {"seed": ["0", "1"]}
    with pytest.raises(ValueError, match="no such file"):
        load_spec(tmp_path / "missing.json")


def test_a_raised_step_budget_keeps_converged_trials_and_trains_the_others_on(tiny_lm, tmp_path):
    """Under a constant schedule the step budget is a ceiling: raising it keeps a trial the plateau stop ended,
    and trains a trial that hit the old budget on to the new one (from step 0 when its checkpoint was pruned,
    as the gallery prunes finished runs), equal to a fresh trial at the larger budget."""
    from core.runs import CHECKPOINT_FILE

    out, grid = tmp_path / "sweep", {"plateau-patience": ["0", "1"]}
    short = _trials(grid, "--plateau-margin", "0.99", "--steps", "2")
    run_sweep(out, short, lm=tiny_lm, progress=False)
    by_patience = {t["config"]["plateau_patience"]: t for t in read_sweep(out)["trials"]}
    budget_hit, converged = by_patience[0]["name"], by_patience[1]["name"]
    assert not by_patience[0]["converged"] and by_patience[1]["converged"]
    kept = (out / converged / "run.json").read_bytes()
    (out / budget_hit / CHECKPOINT_FILE).unlink()

    longer = _trials(grid, "--plateau-margin", "0.99", "--steps", "4")
    assert run_sweep(out, longer, lm=tiny_lm, progress=False).counts["done"] == 2
    assert (out / converged / "run.json").read_bytes() == kept
    trained_on = {t["name"]: t for t in read_sweep(out)["trials"]}[budget_hit]
    assert "from 2 to 4 steps" in trained_on["budget_raised"] and "from step 0" in trained_on["budget_raised"]
    run = json.loads((out / budget_hit / "run.json").read_text())
    assert run["steps_done"] == 4 and run["config"]["steps"] == 4
    fresh = tmp_path / "fresh"
    run_sweep(fresh, [t for t in longer if t.name == budget_hit], lm=tiny_lm, progress=False)
    assert _histories(out)[budget_hit] == _histories(fresh)[budget_hit]
    with pytest.raises(ValueError, match="other settings"):  # a smaller budget would change the trials
        run_sweep(out, _trials(grid, "--plateau-margin", "0.99", "--steps", "1"), lm=tiny_lm, progress=False)


def test_sweep_groups_gathers_a_sweeps_runs_reading_its_record_once(tmp_path, monkeypatch):
    """The Runs page groups runs by sweep: members listed in the sweep's record, not a stray folder beside them or a
    run outside any sweep, and each sweep.json read once however many runs it lists."""
    from types import SimpleNamespace

    from core.analysis import runs_compare as rc
    from core.analysis import sweeps as sw
    from core.sweep import record

    folder = tmp_path / "priors"
    folder.mkdir()
    record.write_sweep(folder, {"name": "priors", "trials": [{"name": f"t{i}", "status": "done"} for i in range(3)]})
    names = [(folder, "t0"), (folder, "t1"), (folder, "stray"), (folder, "t2"), (tmp_path, "alone")]
    entries = [rc.RunEntry(SimpleNamespace(path=parent / name, name=name), "yours") for parent, name in names]
    reads = []
    real = record.read_sweep
    monkeypatch.setattr(record, "read_sweep", lambda path: reads.append(path) or real(path))
    groups = sw.sweep_groups(entries)
    assert {label: [e.info.name for e in members] for label, members in groups.items()} == {
        "priors [yours]": ["t0", "t1", "t2"]}
    assert reads == [folder]
