"""Run folders: what a training run leaves behind, and how to list, load and delete them.

    DIR/run.json                {"config", "history", "metrics", "snapshot_steps", "status", ...}
    DIR/prompt.safetensors      "soft" [n, d] and, for deep prompts, "deep.{layer}" [n, d]
    DIR/snapshots.safetensors   the same keys, each [S, n, d], aligned with snapshot_steps (step 0 = the prior sample)
    DIR/checkpoint.pt           optimizer, scheduler and RNG state, so the run can be resumed exactly
    DIR/.lock                   while a process trains it (core.locks.FolderLock): {pid, host, started, purpose}

User runs live under RUNS_DIR (gitignored; `PRIOR_LAB_RUNS` moves it).

A run folder belongs to one run: `core.run_folders` reserves, claims (locks) and
deletes them; run.json lists the files the run wrote ("files", the manifest).

Statuses (run.json "status", as `run_info` reports it):
    running      training (its process holds the lock)
    evaluating   training done, measuring task metrics
    done         finished
    cancelled    stopped on request (Ctrl-C, SIGTERM, the page's Cancel); resumable
    diverged     a loss became non-finite or the validation loss grew past DIVERGE_FACTOR x its initial value;
                 run.json["diverged"] = {"step", "reason", ...}

A finished run also says why it stopped: run.json "converged" (true only when the plateau rule stopped it;
older runs without the field read as false, `run_converged`), "stop_reason" ("plateau", "budget",
"cancelled", "diverged") and "stop_rule" (the rule as text); metrics["drift"] gives each tensor's drift.
    interrupted  run.json says running/evaluating but no live process holds the lock (it died); resumable
    unreadable   (listing only) run.json cannot be read or has the wrong shape: see `scan_runs`
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core import paths
from core.locks import lock_holder

RUN_JSON, PROMPT_FILE, SNAPSHOT_FILE, CHECKPOINT_FILE = (
    "run.json", "prompt.safetensors", "snapshots.safetensors", "checkpoint.pt")
RUN_FILES = (RUN_JSON, PROMPT_FILE, SNAPSHOT_FILE, CHECKPOINT_FILE)  # what a run writes: its default manifest
LIVE_STATUSES = ("running", "evaluating")  # a run in these states needs a live lock holder, else it is interrupted


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
    note: str = ""  # why the status is what it is (the divergence, the dead lock holder), or ""
    converged: bool = False  # the plateau rule stopped it (`run_converged`); False for a budget hit or older runs

    def row(self) -> dict:
        """A flat dict for a table."""
        return {"name": self.name, "method": self.method, "dataset": self.dataset, "prior": self.prior,
                "lr": self.lr, "steps": f"{self.steps_done}/{self.steps}", "status": self.status,
                "converged": self.converged, "final val loss": self.final_val_loss, **self.metric,
                "created": self.created, "note": self.note, "path": str(self.path)}


@dataclass
class RunProblem:
    """A run folder whose run.json cannot be listed: the file and what is wrong with it."""

    path: Path
    file: Path
    problem: str

    def row(self) -> dict:
        """A flat dict for the same table as `RunInfo.row()` (status "unreadable")."""
        return {"name": self.path.name, "status": "unreadable", "note": f"{self.file}: {self.problem}",
                "path": str(self.path)}


@dataclass
class RunScan:
    """Every run folder under a root: the readable runs (newest first) and the unreadable ones."""

    runs: list[RunInfo]
    problems: list[RunProblem]


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


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(tmp_path) callable
    """Write `path` through a temporary file beside it, so a reader never sees half a file.

    The file gets the user's normal permissions (0666 less the umask), not tempfile's private 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
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
    """run.json of the run folder `path`, checked: raises FileNotFoundError (no run) or ValueError (malformed)."""
    path = Path(path)
    file = path / RUN_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no {RUN_JSON}); list runs with `python -m core runs`")
    try:
        data = json.loads(file.read_text())
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    problem = run_json_problem(data)
    if problem:
        raise ValueError(f"{file}: {problem}")
    return data


def _is_number(value: object, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, int | float) and not isinstance(value, bool)


def run_json_problem(data: object) -> str | None:
    """What is wrong with a parsed run.json (None when it has the shape runs are read with).

    Non-finite losses are allowed (a diverged run records them); strings, lists and other types are not.
    """
    if not isinstance(data, dict):
        return f"expected an object {{config, history, ...}}, found {type(data).__name__}"
    for key, kind in (("config", dict), ("history", list), ("metrics", dict), ("snapshot_steps", list)):
        if key in data and not isinstance(data[key], kind):
            return f"{key!r} is {type(data[key]).__name__} {str(data[key])[:40]!r}, expected a {kind.__name__}"
    if "config" not in data:
        return "no 'config': not written by `core train`"
    for i, h in enumerate(data.get("history", [])):
        if not isinstance(h, dict):
            return f"history[{i}] is {type(h).__name__}, expected {{step, train_loss, val_loss}}"
        if not isinstance(h.get("step"), int) or isinstance(h.get("step"), bool):
            return f"history[{i}].step is {h.get('step')!r}, expected an integer"
        for key in ("train_loss", "val_loss"):
            if not _is_number(h.get(key), allow_none=True):
                return f"history[{i}].{key} is {h.get(key)!r}, expected a number or null"
    for key in ("status", "created"):
        if key in data and not isinstance(data[key], str):
            return f"{key!r} is {data[key]!r}, expected a string"
    if "steps_done" in data and not (isinstance(data["steps_done"], int) and not isinstance(data["steps_done"], bool)):
        return f"'steps_done' is {data['steps_done']!r}, expected an integer"
    config = data["config"]
    if "lr" in config and not _is_number(config["lr"]):
        return f"config.lr is {config['lr']!r}, expected a number"
    if "steps" in config and not (isinstance(config["steps"], int) and not isinstance(config["steps"], bool)):
        return f"config.steps is {config['steps']!r}, expected an integer"
    if "files" in data and not (isinstance(data["files"], list) and all(isinstance(f, str) for f in data["files"])):
        return f"'files' is {data['files']!r}, expected a list of file names"
    return None


def load_run(path: str | Path) -> Run:
    """Load a run folder written by `core.tuning.train` (or the precompute gallery)."""
    path = Path(path)
    data = read_run_json(path)
    prompt = load_file(str(path / PROMPT_FILE)) if (path / PROMPT_FILE).exists() else {}
    # fp32 in memory: the committed gallery stores its snapshots in fp16 (core.precompute.halve_snapshots)
    snapshots = ({k: v.float() for k, v in load_file(str(path / SNAPSHOT_FILE)).items()}
                 if (path / SNAPSHOT_FILE).exists() else {})
    return Run(path=path, config=data.get("config", {}), history=data.get("history", []),
               metrics=data.get("metrics", {}), snapshot_steps=data.get("snapshot_steps", []),
               prompt=prompt, snapshots=snapshots, status=data.get("status", "done"),
               info={k: v for k, v in data.items() if k not in {"config", "history", "metrics", "snapshot_steps"}})


def _headline_metric(metrics: dict) -> dict:
    tuned = metrics.get("eval", {}).get("prompt", {})
    return {k: tuned[k] for k in ("accuracy", "exact_match", "f1") if k in tuned and _is_number(tuned[k])}


def live_status(path: str | Path, data: dict) -> tuple[str, str]:
    """(status, note) of a run as it is now: "running" in run.json with no live lock holder is "interrupted"."""
    status = str(data.get("status", "?"))
    note = str(data.get("message", "") or "")
    if status == "diverged" and isinstance(data.get("diverged"), dict):
        d = data["diverged"]
        note = f"diverged at step {d.get('step')}: {d.get('reason', '')}"
    if status in LIVE_STATUSES:
        holder = lock_holder(path)
        if holder is None or holder.alive is False:
            who = f" (its process, {holder.describe()}, is gone)" if holder is not None else " (no process holds it)"
            return "interrupted", f"was {status} at step {data.get('steps_done', '?')}{who}; resume it with --resume"
        if holder.alive is None:
            note = f"{status} on {holder.host} (pid {holder.pid}); cannot tell from here whether it still runs"
    return status, note


def run_converged(data: dict) -> bool:
    """Whether a run.json says the plateau rule stopped the run; runs written before the field existed trained
    a fixed number of steps, so they read as not converged."""
    return data.get("converged") is True


def drift_rows(metrics: dict) -> list[dict]:
    """The run's drift (run.json metrics["drift"], written by `core.tuning.train`) as one row per prompt tensor:
    {"tensor", "l2", "max_l2", "init_norm", "relative_to_init_norm", "relative_to_token_nn_gap"}; [] when the run
    recorded none (runs from before drift was measured)."""
    drift = metrics.get("drift") if isinstance(metrics, dict) else None
    if not isinstance(drift, dict):
        return []
    return [{"tensor": name, **values} for name, values in drift.items() if isinstance(values, dict)]


def run_info(path: Path) -> RunInfo:
    """The list line of one run (raises FileNotFoundError or ValueError naming the file and the problem)."""
    data = read_run_json(path)
    config, history = data.get("config", {}), data.get("history", [])
    vals = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    status, note = live_status(path, data)
    return RunInfo(
        path=Path(path), name=Path(path).name, method=str(config.get("method", "?")),
        dataset=str(config.get("dataset", "?")), prior=str(config.get("prior", "?")),
        lr=config.get("lr", float("nan")), steps=config.get("steps", 0),
        steps_done=data.get("steps_done", history[-1]["step"] if history else 0), status=status,
        final_val_loss=vals[-1] if vals else None, created=data.get("created", ""),
        metric=_headline_metric(data.get("metrics", {})), note=note, converged=run_converged(data),
    )


def scan_runs(root: str | Path | None = None) -> RunScan:
    """Every run folder directly under `root` (default RUNS_DIR; or `root` itself if it is a run).

    A folder with a run.json that cannot be read or has the wrong shape is a `RunProblem` (never skipped
    silently, never an exception), so a listing shows it beside the good runs.
    """
    root = Path(root if root is not None else paths.RUNS_DIR)
    if not root.is_dir():
        return RunScan([], [])
    folders = [root] if is_run(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_run(p))
    infos, problems = [], []
    for folder in folders:
        try:
            infos.append(run_info(folder))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            text = str(exc).replace(f"{folder / RUN_JSON}: ", "")
            problems.append(RunProblem(folder, folder / RUN_JSON, text or type(exc).__name__))
    return RunScan(sorted(infos, key=lambda r: r.created, reverse=True), problems)


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """The readable runs under `root` (see `scan_runs`, which also returns the unreadable ones), newest first."""
    return scan_runs(root).runs


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
            row = {"condition": label, "n": scores.get("n"),
                   **{k: scores[k] for k in ("accuracy", "exact_match", "f1") if k in scores}}
            for k in ("accuracy", "mae"):  # 95% bootstrap CIs over items (core.evaluation), where stored
                if scores.get(f"{k}_ci"):
                    row[f"{k} 95% CI"] = "[{:.3g}, {:.3g}]".format(*scores[f"{k}_ci"])
            row.update({k: scores[k] for k in ("mae", "n_unparsed", "answer_loss") if k in scores})
            rows.append(row)
    return rows
