"""Run folders: what a training run leaves behind, and how to list, load and delete them.

    DIR/run.json                {"config", "history", "metrics", "snapshot_steps", "status", ...}
    DIR/prompt.safetensors      "soft" [n, d] and, for deep prompts, "deep.{layer}" [n, d]
    DIR/snapshots.safetensors   the same keys, each [S, n, d], aligned with snapshot_steps (step 0 = the prior sample)
    DIR/checkpoint.pt           optimizer, scheduler and RNG state, so the run can be resumed exactly

User runs live under RUNS_DIR (gitignored; `PRIOR_LAB_RUNS` moves it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core import paths

RUN_JSON, PROMPT_FILE, SNAPSHOT_FILE, CHECKPOINT_FILE = (
    "run.json", "prompt.safetensors", "snapshots.safetensors", "checkpoint.pt")


@dataclass
class RunInfo:
    """One line of the run list (read from run.json only; tensors are not loaded)."""

    path: Path
    name: str
    method: str
    dataset: str
    prior: str
    lr: float
    steps: int
    steps_done: int
    status: str
    final_val_loss: float | None
    created: str
    metric: dict = field(default_factory=dict)

    def row(self) -> dict:
        """A flat dict for a table."""
        return {"name": self.name, "method": self.method, "dataset": self.dataset, "prior": self.prior,
                "lr": self.lr, "steps": f"{self.steps_done}/{self.steps}", "status": self.status,
                "final val loss": self.final_val_loss, **self.metric, "created": self.created, "path": str(self.path)}


@dataclass
class Run:
    """A loaded run: its json parts and tensors.

    prompt: {"soft": [n, d], "deep.{layer}": [n, d]} fp32.
    snapshots: the same keys, each [S, n, d], aligned with `snapshot_steps`.
    """

    path: Path
    config: dict
    history: list[dict]
    metrics: dict
    snapshot_steps: list[int]
    prompt: dict[str, torch.Tensor]
    snapshots: dict[str, torch.Tensor]
    status: str = "done"
    info: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["method"]

    def val_curve(self) -> list[tuple[int, float]]:
        """(step, val_loss) where validation loss was measured."""
        return [(h["step"], h["val_loss"]) for h in self.history if h.get("val_loss") is not None]


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(tmp_path) callable
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str)))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def is_run(path: Path) -> bool:
    return (Path(path) / RUN_JSON).is_file()


def read_run_json(path: str | Path) -> dict:
    path = Path(path)
    file = path / RUN_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no {RUN_JSON}); list runs with `python -m core runs`")
    return json.loads(file.read_text())


def load_run(path: str | Path) -> Run:
    """Load a run folder written by `core.tuning.train` (or the precompute gallery)."""
    path = Path(path)
    data = read_run_json(path)
    prompt = load_file(str(path / PROMPT_FILE)) if (path / PROMPT_FILE).exists() else {}
    snapshots = load_file(str(path / SNAPSHOT_FILE)) if (path / SNAPSHOT_FILE).exists() else {}
    return Run(path=path, config=data.get("config", {}), history=data.get("history", []),
               metrics=data.get("metrics", {}), snapshot_steps=data.get("snapshot_steps", []),
               prompt=prompt, snapshots=snapshots, status=data.get("status", "done"),
               info={k: v for k, v in data.items() if k not in {"config", "history", "metrics", "snapshot_steps"}})


def _headline_metric(metrics: dict) -> dict:
    tuned = metrics.get("eval", {}).get("prompt", {})
    return {k: tuned[k] for k in ("accuracy", "exact_match", "f1") if k in tuned}


def run_info(path: Path) -> RunInfo:
    data = read_run_json(path)
    config, history = data.get("config", {}), data.get("history", [])
    vals = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    return RunInfo(
        path=Path(path), name=Path(path).name, method=config.get("method", "?"), dataset=config.get("dataset", "?"),
        prior=config.get("prior", "?"), lr=config.get("lr", float("nan")), steps=config.get("steps", 0),
        steps_done=data.get("steps_done", history[-1]["step"] if history else 0), status=data.get("status", "?"),
        final_val_loss=vals[-1] if vals else None, created=data.get("created", ""),
        metric=_headline_metric(data.get("metrics", {})),
    )


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Every run folder directly under `root` (default RUNS_DIR; or `root` itself), newest first."""
    root = Path(root if root is not None else paths.RUNS_DIR)
    if not root.exists():
        return []
    folders = [root] if is_run(root) else [p for p in root.iterdir() if p.is_dir() and is_run(p)]
    infos = []
    for folder in folders:
        try:
            infos.append(run_info(folder))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign folder is not a run
    return sorted(infos, key=lambda r: r.created, reverse=True)


def delete_run(path: str | Path) -> None:
    """Remove a run folder (only folders that hold a run.json)."""
    path = Path(path)
    if not is_run(path):
        raise FileNotFoundError(f"{path} is not a run folder (no {RUN_JSON}); nothing deleted")
    shutil.rmtree(path)


def new_run_dir(config_name: str, root: str | Path | None = None) -> Path:
    """A fresh, unique folder name under `root` (default RUNS_DIR) for a new run."""
    import time

    root = Path(root if root is not None else paths.RUNS_DIR)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{config_name}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def history_long(history: list[dict]) -> list[dict]:
    """History as long rows {"step", "kind": "train"|"validation", "loss"} for a line chart."""
    rows = []
    for h in history:
        for kind, key in (("train", "train_loss"), ("validation", "val_loss")):
            if h.get(key) is not None:
                rows.append({"step": h["step"], "kind": kind, "loss": float(h[key])})
    return rows


def metrics_table(metrics: dict) -> list[dict]:
    """Task metrics beside the baselines: one row per condition (trained prompt, no prompt, text prompt)."""
    names = {"prompt": "trained prompt", "no_prompt": "no prompt", "text_prompt": "hand-written text prompt"}
    rows = []
    for key, label in names.items():
        scores = metrics.get("eval", {}).get(key)
        if scores:
            rows.append({"condition": label, "n": scores.get("n"),
                         **{k: scores[k] for k in ("accuracy", "exact_match", "f1") if k in scores}})
    return rows
