"""The home tour's collapse pair, read from synthetic run tables."""

from __future__ import annotations

import pandas as pd
import pytest

from core import tour


def _runs(per_prior: dict[str, tuple[float, list[float]]], converged: list[bool] | None = None) -> pd.DataFrame:
    """Soft MATH runs: per prior (step-0 share, final share per seed), plus a QA run that must be ignored."""
    rows = []
    for prior, (step0, finals) in per_prior.items():
        for seed, final in enumerate(finals):
            rows.append({"run": f"soft-math-{prior}-s{seed}", "method": "soft", "dataset": "math", "prior": prior,
                         "seed": seed, "collapsed_share": final, "init_collapsed_share": step0,
                         "mean_drift_l2": 1.0 + seed, "final_val_loss": 1.5})
    rows.append({"run": "soft-squad-qa-s0", "method": "soft", "dataset": "squad", "prior": "qa", "seed": 0,
                 "collapsed_share": 1.0, "init_collapsed_share": 0.0, "mean_drift_l2": 1.0, "final_val_loss": 0.5})
    table = pd.DataFrame(rows)
    if converged is not None:
        table["converged"] = converged + [True]
    return table


def test_pair_is_the_most_collapsing_prior_and_the_least():
    runs = _runs({"vocab": (0.3, [0.8, 0.9, 0.95]),  # collapses, mean 0.883: seed 1 (0.9) is closest
                  "fitted": (0.0, [0.6, 0.6]),  # collapses too, but less
                  "gaussian": (0.0, [0.05, 0.0, 0.1]),  # stays clear, mean 0.05: seed 0 is closest
                  "xavier": (0.0, [0.1, 0.1]),  # stays clear, but less clearly
                  "primed": (0.9, [0.9])})  # already collapsed at step 0: training did not move it there
    out = tour.collapse_pair(runs)
    assert out["status"] == tour.PAIR and out["rule"] == tour.RULE and "step-0" in out["rule"]
    most, least = out["pair"]["collapses"], out["pair"]["does_not"]
    assert most["prior"] == "vocab" and most["n"] == 3 and isinstance(most["n"], int)
    assert most["final"] == pytest.approx(0.8833, abs=1e-3) and most["step0"] == pytest.approx(0.3)
    assert most["run"]["seed"] == 1 and most["run"]["run"] == "soft-math-vocab-s1"
    assert least["prior"] == "gaussian" and least["run"]["seed"] == 0 and least["drift_l2"] == pytest.approx(2.0)
    assert "qa" not in {r["prior"] for r in out["per_prior"]}
    assert out["showcase"] == ["soft-math-vocab-s1", "soft-math-gaussian-s0"]  # what the Divergence page opens on
    lines = tour.side_lines(most)
    assert "0.30 at step 0 -> 0.88 trained" in lines[0] and "3 seed(s)" in lines[0]


def test_a_prior_collapsed_from_step_0_does_not_count_as_collapsing():
    out = tour.collapse_pair(_runs({"primed": (0.9, [0.9, 0.9]), "gaussian": (0.0, [0.0])}))
    assert out["status"] == tour.NONE_COLLAPSES and out["pair"] is None
    assert out["statement"] == ("no prior's prompt collapsed in these runs (largest final share 0.90 for prior "
                                "primed, 0.90 at step 0).")


def test_none_collapses_says_so_with_the_largest_share():
    out = tour.collapse_pair(_runs({"gaussian": (0.0, [0.0, 0.05]), "vae": (0.2, [0.1, 0.1])}))
    assert out["status"] == tour.NONE_COLLAPSES and out["pair"] is None
    assert "no prior's prompt collapsed in these runs (largest final share 0.10 for prior vae" in out["statement"]
    assert out["note"] == tour.UNRECORDED  # this table has no converged column
    assert "started collapsed" not in out["statement"]


def test_none_collapses_says_when_training_moved_a_collapsed_start_away_from_the_tokens():
    out = tour.collapse_pair(_runs({"gaussian": (0.0, [0.0, 0.0]), "vocab": (1.0, [0.0, 0.05])}))
    assert out["status"] == tour.NONE_COLLAPSES
    assert out["statement"] == ("no prior's prompt collapsed in these runs (largest final share 0.03 for prior "
                                "vocab). Prompts that started collapsed left the tokens: vocab (1.00 at step 0, "
                                "0.03 trained).")
    assert out["showcase"] == ["soft-math-vocab-s0", "soft-math-gaussian-s0"]  # the one that left, one from far off
    plain = tour.collapse_pair(_runs({"gaussian": (0.0, [0.0, 0.05]), "vae": (0.2, [0.1, 0.1])}))
    assert plain["showcase"] == []  # nothing to show side by side: the page keeps its own default


def test_every_prior_collapsing_and_none_clear():
    out = tour.collapse_pair(_runs({"vocab": (0.0, [0.9]), "fitted": (0.0, [0.7])}))
    assert out["status"] == tour.ALL_COLLAPSE and out["statement"].startswith("every prior collapsed")
    out = tour.collapse_pair(_runs({"vocab": (0.0, [0.9]), "fitted": (0.0, [0.3])}))
    assert out["status"] == tour.NONE_CLEAR and "fitted" in out["statement"]


def test_only_converged_runs_count_and_none_converged_says_the_tour_cannot_say():
    table = _runs({"vocab": (0.0, [0.9, 0.0]), "gaussian": (0.0, [0.0])}, converged=[True, False, True])
    out = tour.collapse_pair(table)
    assert out["status"] == tour.PAIR and out["note"] == ""
    assert out["pair"]["collapses"]["n"] == 1 and out["pair"]["collapses"]["final"] == pytest.approx(0.9)
    out = tour.collapse_pair(table.assign(converged=False))
    assert out["status"] == tour.NO_CONVERGED and out["statement"] == "no converged runs yet: the tour cannot say."
    assert tour.collapse_pair(None)["status"] == tour.NO_RUNS
    assert tour.collapse_pair(table.drop(columns="collapsed_share"))["status"] == tour.NO_RUNS


def test_seeds_line_reports_the_seeds_per_prior():
    line = tour.seeds_line(_runs({"gaussian": (0.0, [0.0] * 5), "vae": (0.0, [0.0, 0.0])}))
    assert "gaussian 5, vae 2" in line and "1 of 2 priors have fewer than the 5" in line
    line = tour.seeds_line(_runs({"gaussian": (0.0, [0.0] * 5)}, converged=[True] * 4 + [False]))
    assert "4 of 5 runs converged" in line and "every prior has the 5 or more" in line
    assert "no soft-prompt MATH runs" in tour.seeds_line(None)


def test_prompt_readout_of_a_missing_run_says_so(tiny_lm, tmp_path):
    assert "is not on disk" in tour.prompt_readout(tiny_lm, tmp_path / "soft-math-gone-s0")
