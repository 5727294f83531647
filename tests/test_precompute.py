"""`python -m core precompute --quick` writes the same format as the committed artifacts, and resumes."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.numpy import load_file

from core.artifacts import ArtifactStore
from core.precompute import QUICK, Precompute, gallery_specs


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


def test_quick_build_matches_the_committed_format(quick_store):
    committed = ArtifactStore()
    if not committed.manifest():
        pytest.skip("no committed artifacts in this checkout")
    assert _format(quick_store) == _format(committed)


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
