"""Running a sweep: plan against DIR/sweep.json, run what is left on a backend, record every outcome.

    >>> trials = expand(train_parser(), base, {"prior": ["gaussian", "fitted"], "seed": ["0", "1"]})
    >>> result = run_sweep("runs/my-sweep", trials, backend="local")
    >>> result.counts
    {'pending': 0, 'running': 0, 'done': 4, 'failed': 0}

Re-running resumes: done trials are skipped, running (or stopped) ones continue from their checkpoints, and
failed ones run again from scratch only with `retry_failed`. A run folder already holding a finished run
with the trial's config counts as done (that is how an existing gallery becomes a sweep without training).
One writer per sweep folder: a second sweep on the same folder raises `core.locks.LockHeld`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core import runs
from core.locks import FolderLock
from core.sweep.backends import make_backend
from core.sweep.backends.base import TrialJob
from core.sweep.record import SWEEP_JSON, counts, now, read_sweep, write_sweep
from core.sweep.spec import SweepSpec, Trial
from core.sweep.trial import TrialOutcome


@dataclass
class SweepResult:
    path: Path
    counts: dict
    ran: list[str]  # trials this call started (trained, or tried to)
    interrupted: bool
    seconds: float
    record: dict


class _Recorder:
    """The backend's `Events`: keeps sweep.json current and drives the progress display."""

    def __init__(self, path: Path, data: dict, jobs: list[TrialJob],
                 on_event: Callable[[str, str, dict], None] | None, show: bool) -> None:
        self.path, self.data, self.on_event = path, data, on_event
        self.by_name = {t["name"]: t for t in data["trials"]}
        self.totals = {j.name: int(j.config.get("steps", 0)) for j in jobs}
        self.steps = {j.name: 0 for j in jobs}
        self.ran: list[str] = []  # trials started, in order
        self.bars = None
        if show:
            from tqdm import tqdm

            self.bars = (tqdm(total=len(jobs), desc="trials", unit="trial", position=0),
                         tqdm(total=sum(self.totals.values()), desc="steps", unit="step", position=1))

    def _save(self) -> None:
        write_sweep(self.path, self.data)

    def started(self, name: str, pid: int | None = None) -> None:
        trial = self.by_name[name]
        self.ran.append(name)
        trial.update(status="running", started=now(), pid=pid, attempts=trial.get("attempts", 0) + 1)
        self._save()
        if self.bars:
            self.bars[0].set_postfix_str(name)
        self._emit("started", name, {"pid": pid})

    def progress(self, name: str, step: int, total: int, val_loss: float | None = None) -> None:
        delta = step - self.steps.get(name, 0)
        self.steps[name] = step
        if self.bars and delta > 0:
            self.bars[1].update(delta)
        self._emit("progress", name, {"step": step, "total": total, "val_loss": val_loss})

    def finished(self, name: str, outcome: TrialOutcome) -> None:
        trial = self.by_name[name]
        status = {"stopped": "pending"}.get(outcome.status, outcome.status)
        trial.update(status=status, error=outcome.error if status == "failed" else "", finished=now(),
                     seconds=round(trial.get("seconds", 0.0) + outcome.seconds, 2), pid=None)
        if outcome.status == "stopped":
            trial["note"] = f"stopped ({outcome.error or 'cancelled'}); the next run resumes it"
        else:
            trial.pop("note", None)
        if outcome.status == "done":
            trial.update(steps_done=outcome.steps_done, final_val_loss=outcome.final_val_loss,
                         converged=outcome.converged)
        self._save()
        if self.bars:
            self.bars[0].update(1)
            self.bars[1].update(max(0, self.totals.get(name, 0) - self.steps.get(name, 0)))
            self.steps[name] = self.totals.get(name, 0)
        self._emit("finished", name, {"status": status, "error": trial.get("error", "")})

    def _emit(self, kind: str, name: str, info: dict) -> None:
        if self.on_event is not None:
            self.on_event(kind, name, info)

    def close(self) -> None:
        if self.bars:
            for bar in self.bars:
                bar.close()


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _matches(planned: dict, found: dict) -> bool:
    """Whether a run's stored config is this trial's: every planned field the run records is equal (the run may
    record more: the prior's resolved parameters; "auto" compute and default deep layers match what they became)."""
    for key, value in planned.items():
        if key not in found:
            continue
        if key == "prior_params":
            if any(not _same(found[key].get(k), v) for k, v in value.items()):
                return False
        elif (key == "compute" and value == "auto") or (key == "layers" and not value):
            continue
        elif not _same(found[key], value):
            return False
    return True


def _budget_raised(planned: dict, recorded: dict) -> bool:
    """Whether a trial's planned config differs from its record only by a larger step budget under a constant
    schedule. There the budget is a ceiling that does not shape the run (the warm-up, the learning rate and the
    plateau stop are the same under either), so a run that converged before the old budget is this trial's run."""
    if "steps" not in recorded or "steps" not in planned or planned["steps"] <= recorded["steps"]:
        return False
    same_budget = {**planned, "steps": recorded["steps"]}
    return (planned.get("schedule") == recorded.get("schedule") == "constant"
            and planned.get("warmup_steps") == recorded.get("warmup_steps") and _matches(same_budget, recorded))


def _raise_budget(path: Path, trial: Trial, entry: dict) -> None:
    """A trial whose step budget grew: if its run converged (the plateau stop ended it) it stays done, its record
    unchanged; otherwise it trains on to the new budget, from its checkpoint where one is kept, or again from
    scratch where a finished run's checkpoint was pruned. Only the record changes here (plan() writes nothing);
    the trial's `budget_raised` says which, and its `seconds` go on adding up (the compute spent on it in all)."""
    if entry.get("status") == "done" and entry.get("converged"):
        return
    folder = path / trial.name
    note = f"budget raised from {entry['config']['steps']} to {trial.config['steps']} steps"
    if (folder / runs.CHECKPOINT_FILE).is_file():
        note += "; it trains on from its checkpoint"
    elif runs.is_run(folder):  # the trial's job starts afresh and replaces the run (a sweep owns its folders)
        note += "; no checkpoint was kept, so it trains again from step 0"
    entry.update(trial.record(), status="pending", error="", budget_raised=note)  # kept: the note is not


def plan(path: Path, trials: list[Trial], spec: SweepSpec | None, backend: dict,
         retry_failed: bool, name: str | None = None) -> tuple[dict, list[Trial]]:
    """Merge the trials into DIR/sweep.json's record; return (record, trials to run now)."""
    data = read_sweep(path) if (path / SWEEP_JSON).is_file() else {"name": path.name, "created": now(), "trials": []}
    data["name"] = name or data.get("name") or path.name
    data["backend"] = backend.get("name", "?")
    data["backend_options"] = backend
    if spec is not None:
        data["spec"] = spec.to_dict()
        data["grid"] = spec.grid
    known = {t["name"]: t for t in data["trials"]}
    to_run: list[Trial] = []
    for trial in trials:
        entry = known.get(trial.name)
        if entry is not None and entry.get("config") is not None and trial.config is not None \
                and not _matches(trial.config, entry["config"]):
            if not _budget_raised(trial.config, entry["config"]):
                diff = sorted(k for k in trial.config if not _same(entry["config"].get(k), trial.config[k]))
                raise ValueError(f"{path / SWEEP_JSON} already holds trial {trial.name} with other settings "
                                 f"({', '.join(diff)}); use another --out for a new sweep, or the same options to "
                                 "resume")
            _raise_budget(path, trial, entry)  # a done, converged trial stays done; the others run on below
        if entry is None:
            entry = {**trial.record(), "status": "pending", "error": "", "seconds": 0.0, "attempts": 0}
            data["trials"].append(entry)
            known[trial.name] = entry
            folder = path / trial.name
            if trial.config is not None and runs.is_run(folder):
                found = runs.read_run_json(folder)
                if found.get("status") == "done" and _matches(trial.config, found.get("config", {})):
                    vals = [h["val_loss"] for h in found.get("history", []) if h.get("val_loss") is not None]
                    entry.update(status="done", note="adopted: the folder already held this finished run",
                                 steps_done=found.get("steps_done"), final_val_loss=vals[-1] if vals else None,
                                 converged=runs.run_converged(found),
                                 seconds=found.get("train_seconds", 0.0), finished=found.get("updated", ""))
        if trial.config is None:
            entry.update(status="failed", error=trial.error)
            continue
        if entry["status"] == "done":
            continue
        if entry["status"] == "failed":
            if not retry_failed:
                continue
            shutil.rmtree(path / trial.name, ignore_errors=True)  # a retry starts from scratch
            entry.update(status="pending", error="")
        to_run.append(trial)
    return data, to_run


@contextlib.contextmanager
def _first_ctrl_c_stops(cancel: threading.Event) -> Iterator[None]:
    """In the main thread: the first Ctrl-C asks the sweep to stop after the current steps, a second one
    interrupts at once (the default). Elsewhere (a page's background thread): nothing to install."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:  # noqa: ANN001
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nstopping the sweep after the current step (Ctrl-C again to stop at once) ...", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(out_dir: str | Path, trials: list[Trial], *, spec: SweepSpec | None = None, backend: str = "local",
              backend_options: dict | None = None, retry_failed: bool = False, lm=None,  # noqa: ANN001
              cancel: threading.Event | None = None, on_event: Callable[[str, str, dict], None] | None = None,
              progress: bool = True, name: str | None = None) -> SweepResult:
    """Run the trials not yet done into `out_dir` (one run folder each) and keep `out_dir/sweep.json` current.

    backend: "local" (in this process; `lm` is shared by the trials that name its model) or "ray"
    (backend_options: address, cpus_per_trial, gpus_per_trial, num_cpus). cancel: when set, no new trial
    starts and running ones stop after their step, resumable. on_event(kind, trial, info): "started",
    "progress", "finished" (for a page). name: the sweep's display name (default: the folder's).
    Raises LockHeld when another sweep writes to `out_dir`.
    """
    path = Path(out_dir)
    start = time.perf_counter()
    options = dict(backend_options or {})
    if backend == "local":
        options["lm"] = lm
    engine = make_backend(backend, **options)
    cancel = cancel or threading.Event()
    interrupted = False
    with FolderLock(path, purpose=f"sweep ({backend} backend)"):
        data, todo = plan(path, trials, spec, engine.describe(), retry_failed, name)
        jobs = [TrialJob(t.name, t.config, t.model, path / t.name, resume=(path / t.name / runs.CHECKPOINT_FILE)
                         .is_file(), threads=t.threads) for t in todo]
        write_sweep(path, data)
        recorder = _Recorder(path, data, jobs, on_event, progress)
        try:
            with _first_ctrl_c_stops(cancel):
                if jobs:
                    engine.run(jobs, recorder, cancel)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            recorder.close()
            interrupted = interrupted or cancel.is_set()
            for trial in data["trials"]:
                if trial.get("status") == "running" and trial.get("pid") is not None and interrupted:
                    trial.update(status="pending", pid=None, note="interrupted; the next run resumes it from its "
                                                                  "last checkpoint")
            write_sweep(path, data)
    return SweepResult(path, counts(data["trials"]), recorder.ran, interrupted,
                       round(time.perf_counter() - start, 2), data)
