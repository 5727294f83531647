"""`--backend local`: trials one after another in this process, sharing one loaded model."""

from __future__ import annotations

import os
import threading

from core.sweep.backends.base import Backend, Events, TrialJob
from core.sweep.trial import TrialOutcome, load_trial_model, run_trial


class LocalBackend(Backend):
    """Runs each trial in the calling thread. `lm`: an already loaded model, used by the trials that name it."""

    name = "local"

    def __init__(self, lm=None) -> None:  # noqa: ANN001 - core.models.LoadedModel
        self.lm = lm

    def _model(self, spec: dict):  # noqa: ANN202
        from core.models import DEFAULT_MODEL, EMBEDDED_ALIASES

        lm = self.lm
        if lm is not None:
            name = DEFAULT_MODEL if spec.get("name") in EMBEDDED_ALIASES else spec.get("name")
            if name == lm.name and spec.get("precision", "fp32") == lm.precision:
                return lm
        return load_trial_model(spec)

    def run(self, jobs: list[TrialJob], events: Events, cancel: threading.Event) -> None:
        for job in jobs:
            if cancel.is_set():
                return
            events.started(job.name, os.getpid())
            try:
                lm = self._model(job.model)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load fails its trials, not the sweep
                events.finished(job.name, TrialOutcome("failed", f"model {job.model.get('name')!r}: "
                                                                 f"{type(exc).__name__}: {exc}"))
                continue

            def progress(p, name=job.name) -> None:  # noqa: ANN001 - core.tuning.Progress
                if p.phase == "train":
                    events.progress(name, p.step, p.total, p.val_loss)

            outcome = run_trial(lm, job.config, job.out_dir, resume=job.resume, on_progress=progress, cancel=cancel,
                                threads=job.threads)
            events.finished(job.name, outcome)
