"""`python -m core precompute --quick` writes the same format as the committed artifacts, and resumes."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.numpy import load_file

from core.artifacts import ArtifactStore
from core.precompute import (
    FULL,
    GALLERY_BUILD,
    GALLERY_FORMAT,
    MAX_LENGTH,
    QUICK,
    Precompute,
    gallery_specs,
    gallery_sweep,
    prune_done_checkpoints,
)

# What the convergence format (gallery format 2) added to the artifacts of format 1. A committed gallery that
# predates it (its manifest has no gallery format, or a lower one) may lack exactly these and nothing else; the
# quick build must hold all of them.
ADDED_IN_FORMAT_2 = {
    "run_json": {"converged", "stop_reason", "stop_rule", "kept"},
    "runs.csv": {"compute", "steps_done", "converged", "stop_reason", "drift_rel_init", "drift_rel_nn_gap", "kept_step",
                 "eval_answer_loss", "eval_answer_loss_no_prompt"},
    "manifest": {"gallery"},
}


def _name(path) -> str:  # noqa: ANN001
    # Layer-specific views are named by the model's depth (l29 on the embedded model, l3 on the tiny one).
    return re.sub(r"_l\d+", "_l<layer>", path.name)


def _format(store: ArtifactStore) -> dict:
    """What a page relies on: table columns, array keys, run files and run.json keys, manifest keys."""
    root = store.root
    tables = {_name(p): p.read_text().splitlines()[0] for p in sorted((root / "tables").glob("*.csv"))}
    jsons = {_name(p): sorted(json.loads(p.read_text())) for p in sorted((root / "tables").glob("*.json"))
             if p.name != "projections.json"}  # keyed by the cloud's content hash
    arrays = {p.name: sorted(load_file(str(p))) for p in sorted((root / "arrays").glob("*.safetensors"))}
    runs = {p.name: (sorted(f.name for f in p.iterdir()), sorted(json.loads((p / "run.json").read_text())))
            for p in sorted(store.runs_root.iterdir()) if p.is_dir()}
    run_format = next(iter(runs.values())) if runs else None
    return {"tables": tables, "jsons": jsons, "arrays": arrays, "run_format": run_format,
            "sweep": sorted(json.loads((store.runs_root / "sweep.json").read_text())),  # the gallery is a sweep
            "manifest": sorted(store.manifest())}


@pytest.fixture(scope="module")
def quick_store(tiny_lm, tmp_path_factory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    Precompute(tiny_lm, store, QUICK, "test --quick", log=lambda _: None).run()
    return store


def test_quick_build_has_every_artifact_and_run(quick_store, tiny_lm):
    manifest = quick_store.manifest()
    assert manifest["model_fingerprint"] == tiny_lm.fingerprint
    assert manifest["tasks_done"] == list(Precompute.TASKS)
    names = sorted(p.name for p in quick_store.runs_root.iterdir() if p.is_dir())
    assert names == sorted(s["name"] for s in gallery_specs(QUICK))
    findings = quick_store.load_json("findings")["findings"]
    assert {f["key"] for f in findings} >= {"trajectory", "separation", "collapse", "quality", "speed", "vae"}
    assert all(f["verdict"] in ("agrees", "does not agree", "inconclusive") for f in findings)
    assert all({"test", "effect", "ci", "n"} <= set(f) for f in findings)


def _without_format_2_additions(fmt: dict) -> dict:
    """`fmt` as a format-1 gallery would hold it: the format-2 additions removed, after checking each is there."""
    files, keys = fmt["run_format"]
    assert ADDED_IN_FORMAT_2["run_json"] <= set(keys)
    columns = fmt["tables"]["runs.csv"].split(",")
    assert ADDED_IN_FORMAT_2["runs.csv"] <= set(columns)
    assert ADDED_IN_FORMAT_2["manifest"] <= set(fmt["manifest"])
    return fmt | {
        "run_format": (files, [k for k in keys if k not in ADDED_IN_FORMAT_2["run_json"]]),
        "tables": fmt["tables"] | {"runs.csv": ",".join(c for c in columns if c not in ADDED_IN_FORMAT_2["runs.csv"])},
        "manifest": [k for k in fmt["manifest"] if k not in ADDED_IN_FORMAT_2["manifest"]],
    }


def test_gallery_on_two_workers_trains_the_same_runs(quick_store, tiny_lm, tmp_path, ray_cluster):
    store = ArtifactStore(tmp_path / "two")
    two = dataclasses.replace(QUICK, soft_math_priors=("gaussian",), deep_priors=(), datasets=("math",))
    Precompute(tiny_lm, store, two, "test --workers 2", log=lambda _: None, workers=2).run(only=["gallery"])
    record = json.loads((store.runs_root / "sweep.json").read_text())
    assert record["backend"] == "ray" and record["counts"]["done"] == len(gallery_specs(two)) == 2
    for spec in gallery_specs(two):  # the same runs as the one-process build's
        mine, theirs = (json.loads((s.runs_root / spec["name"] / "run.json").read_text())["history"]
                        for s in (store, quick_store))
        assert [h["val_loss"] for h in mine] == pytest.approx([h["val_loss"] for h in theirs], rel=1e-5), spec


def test_quick_build_matches_the_committed_format(quick_store):
    committed = ArtifactStore()
    if not committed.manifest():
        pytest.skip("no committed artifacts in this checkout")
    quick = _format(quick_store)
    if committed.manifest().get("gallery", {}).get("format", 1) < GALLERY_FORMAT:
        # The committed gallery predates converged runs (its rebuild is resumable, see README "Precomputed
        # artifacts"): everything else must match, and the new build adds exactly the convergence fields.
        quick = _without_format_2_additions(quick)
    assert quick == _format(committed)


def test_gallery_plan_is_issue_11s():
    """FULL: soft MATH 8 priors x 5 seeds first (seed-major), deep MATH 3 x 3 without the soft prompt, soft QA 4 x 3;
    every run at the convergence defaults with a budget, MATH evaluated on 200 held-out items."""
    specs = gallery_specs(FULL)
    kinds = [(s["method"], s["dataset"]) for s in specs]
    assert kinds == [("soft", "math")] * 40 + [("deep", "math")] * 9 + [("soft", "squad")] * 12
    soft_math = specs[:40]
    assert [s["seed"] for s in soft_math[:8]] == [0] * 8 and [s["seed"] for s in soft_math[8:16]] == [1] * 8
    assert {s["prior"] for s in soft_math} == {"gaussian", "gaussian_tokens", "xavier", "fitted", "exclusion",
                                              "interpolation", "vae", "vocab"}
    spec, trials = gallery_sweep(FULL)
    assert [t.name for t in trials] == [s["name"] for s in specs] and not any(t.error for t in trials)
    for trial in trials:
        config = trial.config
        assert config["schedule"] == "constant" and config["plateau_patience"] > 0 and config["lr"] == 0.03
        assert config["steps"] >= 300  # a budget, not a schedule: converged runs stop at ~110-120 (soft MATH)
        assert config["max_length"] == MAX_LENGTH[config["dataset"]]  # QA passages cut around the answer
        if config["dataset"] == "math":
            assert config["eval_n"] >= 200
        if config["method"] == "deep":
            assert config["soft"] is False  # deep vectors only: the cached-activation path (recorded in the manifest)
        if config["prior"] == "exclusion":
            assert config["prior_params"]["widening"] > 1.1  # a widening that matters (c=5 gives 1.006)


def test_committed_gallery_build_resumes_under_todays_plan():
    """The gallery build in progress (committed between sittings) is of today's plan, so the next sitting's
    `precompute --out gallery-build --only gallery` resumes it rather than refusing it; each run it holds
    as done has a readable run.json that says whether it converged."""
    from core.locks import lock_holder
    from core.sweep.engine import plan

    root = GALLERY_BUILD / "runs"
    if not (root / "sweep.json").is_file():
        pytest.skip("no gallery build in progress in this checkout")
    holder = lock_holder(root)  # a lock from another host (committed by mistake) would stop every later build
    assert holder is None or holder.alive, f"{root} holds a lock of {holder.describe()}"
    spec, trials = gallery_sweep(FULL)
    record, to_run = plan(root, trials, spec, backend={"name": "local"}, retry_failed=False)
    assert [t["name"] for t in record["trials"]] == [t.name for t in trials]
    done = [t["name"] for t in record["trials"] if t["status"] == "done"]
    assert sorted(done + [t.name for t in to_run]) == sorted(t.name for t in trials), "a gallery trial failed"
    for name in done:
        run = json.loads((root / name / "run.json").read_text())
        assert run["status"] == "done" and isinstance(run["converged"], bool), name


def test_pruning_keeps_the_checkpoints_a_resumed_build_needs(tmp_path):
    from core.runs import CHECKPOINT_FILE
    from core.sweep.record import write_sweep

    for name in ("done-run", "stopped-run"):
        (tmp_path / name).mkdir()
        (tmp_path / name / CHECKPOINT_FILE).write_bytes(b"state")
    write_sweep(tmp_path, {"name": "gallery", "trials": [{"name": "done-run", "status": "done"},
                                                         {"name": "stopped-run", "status": "pending"}]})
    assert prune_done_checkpoints(tmp_path) == ["done-run"]
    assert not (tmp_path / "done-run" / CHECKPOINT_FILE).exists()
    assert (tmp_path / "stopped-run" / CHECKPOINT_FILE).exists()


def test_second_run_resumes_without_recomputing(quick_store, tiny_lm, monkeypatch):
    before = (quick_store.root / "tables" / "separation.csv").stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished gallery run must not be trained again")

    monkeypatch.setattr("core.tuning.train", must_not_train)
    Precompute(tiny_lm, quick_store, QUICK, "test --quick", log=lambda _: None).run()
    assert (quick_store.root / "tables" / "separation.csv").stat().st_mtime_ns == before


def test_artifacts_for_other_weights_are_refused(quick_store, real_lm):
    usable, message = quick_store.status(real_lm.fingerprint)
    assert not usable and "not the loaded" in message


def test_a_new_gallery_plan_lands_only_with_everything_made_from_it_rebuilt(quick_store, tiny_lm, tmp_path):
    import shutil

    from core.precompute import FROM_GALLERY

    store = ArtifactStore(tmp_path / "art")
    shutil.copytree(quick_store.root, store.root)
    other_batch = dataclasses.replace(QUICK, math_batch=QUICK.math_batch + 1)  # a larger budget alone is not new
    build = Precompute(tiny_lm, store, other_batch, "test --quick", log=lambda _: None)
    with pytest.raises(SystemExit, match="--force " + " ".join(FROM_GALLERY)):
        build.run()
    with pytest.raises(ValueError, match="other settings"):  # the old runs are of the old plan
        build.run(force=list(FROM_GALLERY))
    shutil.rmtree(store.runs_root)  # landing a new gallery: its runs replace the old ones
    build.run(force=list(FROM_GALLERY))
    manifest = store.manifest()
    assert manifest["budget"]["math_batch"] == QUICK.math_batch + 1
    assert json.loads((store.runs_root / "soft-math-gaussian-s0" / "run.json").read_text())["config"][
        "batch_size"] == QUICK.math_batch + 1
    other = dataclasses.replace(QUICK, sep_docs=QUICK.sep_docs + 1)  # not the gallery's part: refused
    with pytest.raises(SystemExit, match="another budget"):
        Precompute(tiny_lm, store, other, "test", log=lambda _: None).run(force=list(FROM_GALLERY))


def test_a_finished_build_lands_and_an_unfinished_one_is_refused(quick_store, tiny_lm, tmp_path):
    import shutil

    store = ArtifactStore(tmp_path / "art")
    shutil.copytree(quick_store.root, store.root)
    new_plan = dataclasses.replace(QUICK, math_steps=QUICK.math_steps + 1)
    build = ArtifactStore(tmp_path / "build")
    Precompute(tiny_lm, build, new_plan, "test build", log=lambda _: None).run(only=["gallery"])
    landing = Precompute(tiny_lm, store, new_plan, "test --land", log=lambda _: None)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(build.root, unfinished)
    record = json.loads((unfinished / "runs" / "sweep.json").read_text())
    record["trials"][-1]["status"] = "pending"
    (unfinished / "runs" / "sweep.json").write_text(json.dumps(record))
    before = sorted(p.name for p in store.runs_root.iterdir())
    with pytest.raises(SystemExit, match=f"1 of {len(gallery_specs(new_plan))} gallery runs are not done"):
        landing.land_gallery(unfinished)
    assert sorted(p.name for p in store.runs_root.iterdir()) == before and (unfinished / "runs").is_dir()

    # a build whose step budget is raised between sittings resumes (nothing is made from it yet)
    raised_plan = dataclasses.replace(new_plan, qa_steps=new_plan.qa_steps + 1)
    raised = ArtifactStore(tmp_path / "raised")
    shutil.copytree(build.root, raised.root)
    Precompute(tiny_lm, raised, raised_plan, "test raised", log=lambda _: None).run(only=["gallery"])
    qa = json.loads((raised.runs_root / "soft-squad-gaussian-s0" / "run.json").read_text())
    assert qa["config"]["steps"] == raised_plan.qa_steps or qa["converged"]

    table_before = (store.root / "tables" / "runs.csv").stat().st_mtime_ns
    landing.land_gallery(build.root)
    assert not build.root.exists()
    assert json.loads((store.runs_root / "soft-math-gaussian-s0" / "run.json").read_text())["config"]["steps"] == \
        new_plan.math_steps
    assert not list(store.runs_root.glob("*/checkpoint.pt"))
    from safetensors import safe_open

    from core.runs import load_run
    with safe_open(str(store.runs_root / "soft-math-gaussian-s0" / "snapshots.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("soft").dtype == torch.float16  # halved on landing: artifacts/ stays under 30 MB
    assert load_run(store.runs_root / "soft-math-gaussian-s0").snapshots["soft"].dtype == torch.float32
    assert (store.root / "tables" / "runs.csv").stat().st_mtime_ns != table_before  # made from the new runs
    manifest = store.manifest()
    assert manifest["budget"]["math_steps"] == new_plan.math_steps
    built = manifest["gallery"]["built"]
    assert built["runs_done"] == sum(built["runs_by_compute"].values()) == len(gallery_specs(new_plan))
