"""One trial: the same `core.tuning.train` as `core train`, with every failure turned into a recorded outcome.

Both backends call `run_trial`; the local one with the model it already holds, a Ray worker with the model
it builds from the trial's model spec (`load_trial_model`, cached per worker process).
"""

from __future__ import annotations

import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TINY_MODEL = "tiny-llama"  # a random 4-layer LLaMA with the embedded tokenizer (tests): every process builds the same

_MODELS: dict[tuple, object] = {}


@dataclass
class TrialOutcome:
    """How a trial ended: status "done", "failed" (error says why) or "stopped" (cancelled; resumable)."""

    status: str
    error: str = ""
    seconds: float = 0.0
    steps_done: int = 0
    final_val_loss: float | None = None
    converged: bool = False  # the plateau rule stopped the trial's run (core.tuning.train)


def load_trial_model(spec: dict):  # noqa: ANN201 - core.models.LoadedModel
    """The model a trial names: {"name", "precision", "device"}; "tiny-llama" (or "tiny-llama-4x64", the name
    `core.models.tiny_llama` gives) builds the tiny test model.

    Cached per process, so a worker that runs several trials of one model loads it once.
    """
    from core.models import load_model, tiny_llama

    key = (spec.get("name"), spec.get("precision", "fp32"), spec.get("device", "auto"))
    if key not in _MODELS:
        tiny = re.fullmatch(rf"{TINY_MODEL}(?:-(\d+)x(\d+))?", str(key[0]))  # also the name tiny_llama() gives it
        if tiny:
            _MODELS[key] = tiny_llama(*(int(g) for g in tiny.groups() if g is not None))
        else:
            _MODELS[key] = load_model(key[0], precision=key[1], device=key[2])
    return _MODELS[key]


def model_key(spec: dict) -> tuple:
    return spec.get("name"), spec.get("precision", "fp32"), spec.get("device", "auto")


def run_trial(lm, config: dict, out_dir: str | Path, *, resume: bool = False,  # noqa: ANN001 - LoadedModel
              on_progress: Callable | None = None, cancel: threading.Event | None = None,
              threads: int = 0) -> TrialOutcome:
    """Train one trial into `out_dir` and say how it ended; never raises for a failing trial.

    config: a `TrainConfig.to_dict()`. A non-finite loss (divergence), an exception in training, or an invalid
    config gives status "failed" with the reason; `cancel` set gives "stopped" (the run folder can resume).
    """
    import torch

    from core.tuning import TrainConfig, train

    start = time.perf_counter()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = train(lm, TrainConfig(**config), Path(out_dir), resume=resume, force=not resume,  # a sweep owns
                       on_progress=on_progress, cancel=cancel)  # its trial folders (under its lock)
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data for the sweep, not the sweep's end
        return TrialOutcome("failed", f"{type(exc).__name__}: {exc}\n{_short_trace()}",
                            round(time.perf_counter() - start, 2))
    finally:
        torch.set_num_threads(before)  # the process (a page, a test session) keeps its own setting
    vals = [h["val_loss"] for h in result.history if h.get("val_loss") is not None]
    steps = result.history[-1]["step"] if result.history else 0
    outcome = TrialOutcome("done", "", round(time.perf_counter() - start, 2), steps, vals[-1] if vals else None,
                           converged=result.converged)
    if result.status == "done":
        return outcome
    if result.status in ("cancelled", "interrupted"):
        outcome.status, outcome.error = "stopped", result.message
        return outcome
    outcome.status = "failed"
    outcome.error = f"{result.status}: {result.message}" if result.message else result.status
    return outcome


def _short_trace() -> str:
    return "".join(traceback.format_exc(limit=-3).splitlines(keepends=True)[-6:]).strip()
