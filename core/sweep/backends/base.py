"""The interface every sweep backend implements, and what it receives."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.sweep.trial import TrialOutcome


@dataclass
class TrialJob:
    """One trial to train: its name, resolved TrainConfig dict, model spec and run folder (on the driver)."""

    name: str
    config: dict
    model: dict  # {"name", "precision", "device"}
    out_dir: Path
    resume: bool  # continue from out_dir's checkpoint
    threads: int = 0  # torch CPU threads for the trial (0: the backend's default)


class Events(Protocol):
    """What a backend reports while it runs (called on the driver's thread that called `run`)."""

    def started(self, name: str, pid: int | None = None) -> None: ...

    def progress(self, name: str, step: int, total: int, val_loss: float | None = None) -> None: ...

    def finished(self, name: str, outcome: TrialOutcome) -> None: ...


class Backend(ABC):
    name = "?"

    @abstractmethod
    def run(self, jobs: list[TrialJob], events: Events, cancel: threading.Event) -> None:
        """Train `jobs`, reporting each through `events`; return when all ended or `cancel` stopped them."""

    def describe(self) -> dict:
        """What sweep.json records about the backend (name and options)."""
        return {"name": self.name}
