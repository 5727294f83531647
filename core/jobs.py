"""Background training jobs: a thread per run, a cancel event, progress readable from any thread.

The Train page starts a job and keeps only its id in `st.session_state`; each
rerun finds the job again here, so a rerun or another page never blocks or
loses it. No streamlit here.

    >>> job_id = start_job(lm, TrainConfig(steps=40), out_dir)
    >>> get_job(job_id).snapshot()["step"]
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from core.tuning import Progress, TrainConfig, train

_JOBS: dict[str, Job | SweepJob] = {}
_LOCK = threading.Lock()
_IDS = itertools.count(1)


@dataclass(kw_only=True)
class _Background:
    """What every background job has: a state, a cancel event, an error, its start time, thread and lock."""

    FINISHED: ClassVar[tuple[str, ...]] = ("done", "cancelled", "failed")
    state: str = "starting"
    cancel_event: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    started: float = field(default_factory=time.time)
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        """Ask the work to stop after its current step; it saves a usable, resumable state."""
        self.cancel_event.set()

    @property
    def finished(self) -> bool:
        return self.state in self.FINISHED


@dataclass
class Job(_Background):
    """One training run in a background thread; read it with `snapshot()`.

    state: starting, running, evaluating, done, cancelled, diverged, failed."""

    FINISHED: ClassVar[tuple[str, ...]] = ("done", "cancelled", "diverged", "failed")
    id: str
    config: TrainConfig
    out_dir: Path
    progress: Progress | None = None
    message: str = ""
    result_metrics: dict = field(default_factory=dict)

    def snapshot(self) -> dict:
        """A consistent copy of the job's state for display (safe from another thread)."""
        with self.lock:
            p = self.progress
            return {"id": self.id, "state": self.state, "message": self.message, "error": self.error,
                    "step": p.step if p else 0, "total": self.config.steps,
                    "history": list(p.history) if p else [], "tokens_per_s": p.tokens_per_s if p else 0.0,
                    "elapsed": p.elapsed if p else 0.0, "out_dir": str(self.out_dir),
                    "metrics": dict(self.result_metrics), "wall": time.time() - self.started}


def _run(job: Job, lm, init: torch.Tensor | dict | None, examples: tuple | None) -> None:
    def on_progress(progress: Progress) -> None:
        with job.lock:
            job.progress = progress
            job.state = {"train": "running", "eval": "evaluating", "done": job.state}[progress.phase]

    try:
        result = train(lm, job.config, job.out_dir, init=init, examples=examples, on_progress=on_progress,
                       cancel=job.cancel_event)
        with job.lock:
            job.state, job.message, job.result_metrics = result.status, result.message, result.metrics
    except Exception as exc:  # noqa: BLE001 - the page shows any failure instead of losing it in a thread
        with job.lock:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            job.message = traceback.format_exc(limit=6)
        with contextlib.suppress(OSError):  # rmdir removes only an empty folder: a failure before the first write
            job.out_dir.rmdir()  # leaves no empty run folder behind; anything written stays


def start_job(lm, config: TrainConfig, out_dir: str | Path, init: torch.Tensor | dict | None = None,
              examples: tuple | None = None) -> str:
    """Start training in a daemon thread and return the job id."""
    job = Job(id=f"job-{next(_IDS)}", config=config, out_dir=Path(out_dir))
    job.thread = threading.Thread(target=_run, args=(job, lm, init, examples), name=job.id, daemon=True)
    with _LOCK:
        _JOBS[job.id] = job
    job.thread.start()
    return job.id


def get_job(job_id: str) -> Job | SweepJob:
    with _LOCK:
        if job_id not in _JOBS:
            raise KeyError(f"no training job {job_id!r} in this process (the server may have restarted)")
        return _JOBS[job_id]


def list_jobs() -> list[Job]:
    with _LOCK:
        return list(_JOBS.values())


@dataclass
class SweepJob(_Background):
    """A sweep (core.sweep, local backend: one trial after another on the page's model) in a background thread.

    state: starting, running, done, cancelled (resumes from its folder when started again), failed."""

    id: str
    out_dir: Path
    trials: int
    current: str = ""
    step: int = 0
    total: int = 0
    counts: dict = field(default_factory=dict)
    finished_trials: list[dict] = field(default_factory=list)  # {"trial", "status", "error"} in finishing order

    def snapshot(self) -> dict:
        with self.lock:
            return {"id": self.id, "state": self.state, "current": self.current, "step": self.step,
                    "total": self.total, "trials": self.trials, "finished": list(self.finished_trials),
                    "counts": dict(self.counts), "error": self.error, "out_dir": str(self.out_dir),
                    "wall": time.time() - self.started}

    def on_event(self, kind: str, name: str, info: dict) -> None:
        with self.lock:
            self.state = "running"
            if kind == "started":
                self.current, self.step = name, 0
            elif kind == "progress":
                self.step, self.total = info["step"], info["total"]
            elif kind == "finished":
                self.finished_trials.append({"trial": name, "status": info["status"], "error": info["error"]})


def _run_sweep(job: SweepJob, lm, trials: list, spec) -> None:  # noqa: ANN001
    from core.sweep import run_sweep

    try:
        result = run_sweep(job.out_dir, trials, spec=spec, backend="local", lm=lm, cancel=job.cancel_event,
                           on_event=job.on_event, progress=False)
        with job.lock:
            job.counts, job.state = result.counts, "cancelled" if result.interrupted else "done"
    except Exception as exc:  # noqa: BLE001 - shown on the page
        with job.lock:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"


def start_sweep_job(lm, out_dir: str | Path, trials: list, spec=None) -> str:  # noqa: ANN001
    """Run a sweep's trials (core.sweep.Trial list) in a daemon thread on `lm`; returns the id for get_job."""
    job = SweepJob(id=f"sweep-{next(_IDS)}", out_dir=Path(out_dir), trials=len(trials))
    job.thread = threading.Thread(target=_run_sweep, args=(job, lm, trials, spec), name=job.id, daemon=True)
    with _LOCK:
        _JOBS[job.id] = job
    job.thread.start()
    return job.id
