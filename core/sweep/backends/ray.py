"""`--backend ray`: each trial a Ray task with declared CPUs and (fractional) GPUs.

`ray.init()` starts a local cluster when no address is given (listening on 127.0.0.1 only: it serves this
machine), and joins an existing cluster with `address` ("auto", or "HOST:6379" of `ray start --head`).
No shared filesystem is needed: a task trains in a scratch folder on its worker and returns the run folder's
files as bytes, which the driver writes into the sweep folder; to continue a trial, the driver ships its
checkpoint files to the worker. Tasks are not retried by Ray (`max_retries=0`): a worker that dies makes its
trial fail with the reason, and the sweep goes on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from core.sweep.backends.base import Backend, Events, TrialJob
from core.sweep.trial import TrialOutcome

RUN_FILES = ("run.json", "prompt.safetensors", "snapshots.safetensors", "checkpoint.pt")
POLL_S = 0.25


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: float | None = None,
             ship_code: bool | None = None) -> bool:
    """Connect to Ray (a no-op when connected); returns True when this call started a local cluster.

    No address: a local cluster on 127.0.0.1 only, with `num_cpus` / `num_gpus` (default: the machine's).
    An address joins that cluster; `ship_code` (default: on when joining) sends this repository's code to the
    workers as the job's working directory, so they need only the pinned packages, not a checkout.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        # Ray picks the node's routable IP unless clusters are "disabled" (its OSX/Windows default): then every
        # server binds 127.0.0.1. Must be set before ray reads its constants, and patched in case it already did.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        from ray._private import ray_constants  # noqa: PLC2701 - the switch above, if ray was imported before

        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        return True
    runtime_env = None
    if ship_code is None or ship_code:
        from core.paths import REPO_ROOT

        runtime_env = {"working_dir": str(REPO_ROOT),
                       "excludes": [".venv/", ".cache/", "runs/", "artifacts/", ".git/", "tests/", "bench/"]}
        if os.environ.get("PRIOR_LAB_CACHE"):  # a cache folder every worker sees (e.g. on a shared disk)
            runtime_env["env_vars"] = {"PRIOR_LAB_CACHE": os.environ["PRIOR_LAB_CACHE"]}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return False


class RayBackend(Backend):
    """Trials as Ray tasks. cpus_per_trial / gpus_per_trial: the resources each task declares (fractions allowed:
    gpus_per_trial=0.25 puts four trials on one GPU). address: join this cluster instead of starting one.
    num_cpus: CPUs of a local cluster this backend starts (default: all)."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
                 num_cpus: int | None = None, ship_code: bool | None = None) -> None:
        if cpus_per_trial <= 0:
            raise ValueError(f"--cpus-per-trial must be positive; got {cpus_per_trial}")
        if gpus_per_trial < 0:
            raise ValueError(f"--gpus-per-trial must be 0 or more (fractions share a GPU); got {gpus_per_trial}")
        self.address, self.cpus, self.gpus = address, float(cpus_per_trial), float(gpus_per_trial)
        self.num_cpus, self.ship_code = num_cpus, ship_code

    def describe(self) -> dict:
        return {"name": self.name, "address": self.address or "local", "cpus_per_trial": self.cpus,
                "gpus_per_trial": self.gpus}

    def run(self, jobs: list[TrialJob], events: Events, cancel: threading.Event) -> None:
        import ray

        started_here = init_ray(self.address, self.num_cpus, ship_code=self.ship_code)
        try:
            self._run(ray, jobs, events, cancel)
        finally:
            if started_here:
                ray.shutdown()

    def slots(self, ray) -> int:  # noqa: ANN001
        """How many trials the cluster holds at once by their declared CPUs and GPUs."""
        total = ray.cluster_resources()
        fits = [total.get("CPU", 0.0) / self.cpus]
        if self.gpus:
            fits.append(total.get("GPU", 0.0) / self.gpus)
        return max(1, int(min(fits) + 1e-9))

    def _run(self, ray, jobs: list[TrialJob], events: Events, cancel: threading.Event) -> None:  # noqa: ANN001
        control = ray.remote(num_cpus=0)(_Control).remote()
        task = ray.remote(_train_remote).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)
        threads = max(1, int(self.cpus))
        # Submitted a window at a time, not all at once: Ray hands a task's CPUs back while it waits in ray.get
        # (its stop poll), and would start queued trials on them, oversubscribing the cores.
        queue, slots = list(jobs), self.slots(ray)
        pending = {}
        started: set[str] = set()
        stop_sent = False
        while pending or queue:
            while queue and len(pending) < slots and not cancel.is_set():
                job = queue.pop(0)
                files = _read_files(job.out_dir) if job.resume else {}
                spec = {"name": job.name, "config": job.config, "model": job.model,
                        "threads": job.threads or threads}
                pending[task.remote(spec, files, control)] = job
            if cancel.is_set() and queue:  # never submitted: they stay pending for the next run
                for job in queue:
                    events.finished(job.name, TrialOutcome("stopped", "cancelled before it started"))
                queue.clear()
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for event in ray.get(control.drain.remote()):
                kind, name, *rest = event
                if kind == "started":
                    started.add(name)
                    events.started(name, rest[0])
                elif kind == "progress":
                    events.progress(name, *rest)
            if cancel.is_set() and not stop_sent:
                stop_sent = True
                ray.get(control.stop.remote())  # running trials stop after their step and return their folder
                for ref, job in pending.items():
                    if job.name not in started:
                        ray.cancel(ref)  # queued: never starts
            for ref in done:
                job = pending.pop(ref)
                events.finished(job.name, self._collect(ray, ref, job, started))

    @staticmethod
    def _collect(ray, ref, job: TrialJob, started: set[str]) -> TrialOutcome:  # noqa: ANN001
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return TrialOutcome("stopped", "cancelled before it started")
        except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, node lost) or Ray failed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            where = "its worker process died" if job.name in started else "Ray could not run it"
            return TrialOutcome("failed", f"{where}: {type(exc).__name__}: {first}")
        _write_files(job.out_dir, result["files"])
        return TrialOutcome(**result["outcome"])


class _Control:
    """A tiny actor between driver and workers: trial events up, the stop request down."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.stopped = False

    def report(self, event: tuple) -> None:
        self.events.append(event)

    def drain(self) -> list[tuple]:
        out, self.events = self.events, []
        return out

    def stop(self) -> None:
        self.stopped = True

    def is_stopped(self) -> bool:
        return self.stopped


def _train_remote(spec: dict, files: dict[str, bytes], control) -> dict:  # noqa: ANN001 - Ray actor handle
    """The task body on a worker: build (or reuse) the model, train in a scratch folder, return its files."""
    import dataclasses

    import ray

    from core.sweep.trial import load_trial_model, run_trial

    name = spec["name"]
    control.report.remote(("started", name, os.getpid()))
    cancel = threading.Event()
    last = [0.0]

    def on_progress(p) -> None:  # noqa: ANN001 - core.tuning.Progress
        if p.phase != "train":
            return
        control.report.remote(("progress", name, p.step, p.total, p.val_loss))
        if time.monotonic() - last[0] > 0.5:  # ask at most twice a second whether the sweep is stopping
            last[0] = time.monotonic()
            if ray.get(control.is_stopped.remote()):
                cancel.set()

    scratch = Path(tempfile.mkdtemp(prefix=f"prior-lab-{name}-"))
    try:
        _write_files(scratch, files)
        try:
            lm = load_trial_model(spec["model"])
        except Exception as exc:  # noqa: BLE001 - reported as the trial's failure
            outcome = TrialOutcome("failed", f"model {spec['model'].get('name')!r}: {type(exc).__name__}: {exc}")
        else:
            outcome = run_trial(lm, spec["config"], scratch, resume=bool(files), on_progress=on_progress,
                                cancel=cancel, threads=spec.get("threads", 0))
        return {"outcome": dataclasses.asdict(outcome), "files": _read_files(scratch)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _read_files(folder: Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {f: (folder / f).read_bytes() for f in RUN_FILES if (folder / f).is_file()}


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    from core.runs import _atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name not in RUN_FILES:
            continue
        _atomic_write(folder / name, lambda tmp, data=data: tmp.write_bytes(data))
