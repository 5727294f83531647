"""Committed precomputed results under `artifacts/`, and whether they fit the loaded model.

`python -m core precompute` writes them with a `manifest.json` (model fingerprint,
asset versions, seeds, command, code version, date). Pages read them through
`ArtifactStore`, which refuses to serve results built on other weights: a page
then says so and offers to compute live.

Layout:
    artifacts/manifest.json
    artifacts/tables/<name>.csv          small tables (separation per layer, run summaries, transfer)
    artifacts/arrays/<name>.safetensors  projections and fitted statistics (float16 where lossless enough)
    artifacts/runs/<run>/                gallery of trained runs, same format as user runs
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.paths import ARTIFACTS_DIR


@dataclass
class ArtifactStore:
    """Read and write access to one artifacts folder."""

    root: Path = field(default_factory=lambda: ARTIFACTS_DIR)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def runs_root(self) -> Path:
        return self.root / "runs"

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            return {}

    def save_manifest(self, manifest: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_name("manifest.json.partial")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.manifest_path)
        return self.manifest_path

    def status(self, fingerprint: str) -> tuple[bool, str]:
        """(usable, message) for a model fingerprint; the message is for the UI."""
        manifest = self.manifest()
        if not manifest:
            return False, "No precomputed artifacts here: run `python -m core precompute` or compute live."
        built_for = manifest.get("model_fingerprint")
        if built_for != fingerprint:
            return False, (
                f"The precomputed artifacts were built for model `{built_for}`, not the loaded "
                f"`{fingerprint}`; they are not shown. Compute live instead, or rebuild them with "
                "`python -m core precompute`."
            )
        return True, f"Precomputed on {manifest.get('date', '?')} by `{manifest.get('command', '?')}`."

    # ---- tables -------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.root / "tables" / f"{name}.csv"

    def load_table(self, name: str) -> pd.DataFrame | None:
        path = self.table_path(name)
        return pd.read_csv(path) if path.exists() else None

    def load_table_for(self, name: str, fingerprint: str) -> pd.DataFrame | None:
        """The table, only where these artifacts were built for the model `fingerprint` (`status`); else None."""
        return self.load_table(name) if self.status(fingerprint)[0] else None

    def save_table(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.table_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        frame.to_csv(tmp, index=False, float_format="%.6g")
        os.replace(tmp, path)
        return path

    # ---- arrays -------------------------------------------------------------------------
    def arrays_path(self, name: str) -> Path:
        return self.root / "arrays" / f"{name}.safetensors"

    def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        from safetensors.numpy import load_file

        path = self.arrays_path(name)
        return load_file(str(path)) if path.exists() else None

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
        from safetensors.numpy import save_file

        path = self.arrays_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        save_file(contiguous, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
        return path

    # ---- json -----------------------------------------------------------------------------
    def json_path(self, name: str) -> Path:
        return self.root / "tables" / f"{name}.json"

    def load_json(self, name: str) -> dict | None:
        path = self.json_path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def save_json(self, name: str, payload: dict) -> Path:
        path = self.json_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)
        return path

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def default_store() -> ArtifactStore:
    return ArtifactStore()
