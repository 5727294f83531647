"""`DIR/sweep.json`: a sweep's spec, grid and trials with their status and timing; and the list of sweeps.

    {"name", "created", "updated", "backend", "spec": {...}, "grid": {KEY: [values]},
     "counts": {"pending": n, "running": n, "done": n, "failed": n},
     "trials": [{"name", "overrides", "model", "config", "status", "error", "started", "finished",
                 "seconds", "steps_done", "final_val_loss", "converged", "attempts"}, ...]}

A trial's run folder is `DIR/<trial name>/` (the same files `core train` writes). Statuses: pending (not run,
or stopped and resumable from its checkpoint), running (being trained, or its process died: the next run
resumes it), done, failed (error says why; `--retry-failed` runs it again from scratch).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from core import runs

SWEEP_JSON = "sweep.json"
STATUSES = ("pending", "running", "done", "failed")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_JSON).is_file()


def read_sweep(path: str | Path) -> dict:
    """The sweep.json of sweep folder `path`."""
    file = Path(path) / SWEEP_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a sweep folder (no {SWEEP_JSON}); list sweeps with "
                                "`python -m core sweeps`")
    return json.loads(file.read_text())


def write_sweep(path: str | Path, data: dict) -> None:
    data["updated"] = now()
    data["counts"] = counts(data.get("trials", []))
    runs.write_json(Path(path) / SWEEP_JSON, data)


def counts(trials: list[dict]) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for trial in trials:
        out[trial.get("status", "pending")] = out.get(trial.get("status", "pending"), 0) + 1
    return out


@dataclass
class SweepInfo:
    """One line of the sweep list."""

    path: Path
    name: str
    trials: int
    counts: dict
    backend: str
    updated: str
    grid: dict

    def row(self) -> dict:
        return {"sweep": self.name, "trials": self.trials, **self.counts, "backend": self.backend,
                "grid": " ".join(f"{k}={','.join(map(str, v))}" for k, v in self.grid.items()),
                "updated": self.updated, "path": str(self.path)}


def sweep_info(path: str | Path) -> SweepInfo:
    data = read_sweep(path)
    trials = data.get("trials", [])
    return SweepInfo(Path(path), data.get("name") or Path(path).name, len(trials), counts(trials),
                     data.get("backend", "?"), data.get("updated", ""), data.get("grid", {}))


def list_sweeps(roots: list[str | Path] | None = None) -> list[SweepInfo]:
    """Sweep folders that are, or sit directly under, each root (default: the user's runs and the gallery)."""
    from core.paths import ARTIFACTS_DIR, RUNS_DIR

    out, seen = [], set()
    for root in roots if roots is not None else [RUNS_DIR, ARTIFACTS_DIR / "runs"]:
        root = Path(root)
        if not root.is_dir():
            continue
        candidates = [root] if is_sweep(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_sweep(p))
        for folder in candidates:
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            try:
                out.append(sweep_info(folder))
            except (OSError, ValueError):
                continue  # half-written or foreign
    return out


def find_sweep(name: str, roots: list[str | Path] | None = None) -> Path:
    """A sweep folder by path, or by folder name among `list_sweeps(roots)`."""
    if is_sweep(name):
        return Path(name)
    sweeps = list_sweeps(roots)
    matches = [s.path for s in sweeps if name in (s.name, s.path.name)]
    if not matches:
        known = ", ".join(s.name for s in sweeps) or "none"
        raise FileNotFoundError(f"no sweep named {name!r} (known: {known}); give its folder, e.g. "
                                "`python -m core sweeps --summary runs/my-sweep`")
    return matches[0]


def sweep_members(folder: str | Path) -> tuple[str, set[str]] | None:
    """(the sweep's name, its trials' run names) of sweep folder `folder`, or None where it holds no readable
    sweep.json."""
    folder = Path(folder)
    if not is_sweep(folder):
        return None
    try:
        record = read_sweep(folder)
    except (OSError, ValueError):
        return None
    return record.get("name") or folder.name, {t.get("name") for t in record.get("trials", [])}


def sweep_of_run(run_path: str | Path, members: tuple[str, set[str]] | None = None) -> str | None:
    """The name of the sweep a run folder belongs to (its parent holds a sweep.json listing it), else None.
    `members`: the parent's `sweep_members`, where the caller has read them already (many runs of one sweep)."""
    run_path = Path(run_path)
    members = sweep_members(run_path.parent) if members is None else members
    if members is None:
        return None
    name, runs = members
    return name if run_path.name in runs else None
