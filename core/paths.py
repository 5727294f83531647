"""Where Prior Lab keeps fetched assets, caches and user runs (all gitignored).

`PRIOR_LAB_CACHE` moves the cache folder; `PRIOR_LAB_RUNS` moves the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("PRIOR_LAB_CACHE", REPO_ROOT / ".cache"))
ASSETS_DIR = CACHE_DIR / "assets"
MODELS_DIR = CACHE_DIR / "models"
RUNS_DIR = Path(os.environ.get("PRIOR_LAB_RUNS", REPO_ROOT / "runs"))
ARTIFACTS_DIR = REPO_ROOT / "artifacts"


def cache_subdir(name: str) -> Path:
    """A named folder under the cache, created on first use."""
    path = CACHE_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path
