"""Sweep backends: one small module per engine behind one interface, chosen by name like a prior.

    >>> backend = make_backend("local", lm=lm)                   # trials one after another, sharing `lm`
    >>> backend = make_backend("ray", cpus_per_trial=1, gpus_per_trial=0.25)   # Ray tasks; local cluster or --address

A backend's `run(jobs, events, cancel)` trains every job (a `TrialJob`), reports through `events`
(`started`, `progress`, `finished` with a `TrialOutcome`), leaves each job's run folder in `job.out_dir` on
this machine, and stops starting trials once `cancel` is set (running ones stop after their current step,
keeping a resumable run folder). Modules are imported only when chosen, so `local` never imports Ray.
"""

from __future__ import annotations

import importlib

from core.sweep.backends.base import Backend, Events, TrialJob

BACKENDS = {
    "local": ("core.sweep.backends.local", "LocalBackend"),
    "ray": ("core.sweep.backends.ray", "RayBackend"),
}


def make_backend(name: str, **options: object) -> Backend:
    """The backend registered under `name` ("local" or "ray"), built with its options."""
    if name not in BACKENDS:
        raise ValueError(f"unknown sweep backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["BACKENDS", "Backend", "Events", "TrialJob", "make_backend"]
