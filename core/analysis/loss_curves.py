"""Loss curves of stored runs as one long table (the Runs page's chart)."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from core import runs as runs_mod
from core.analysis.runs_compare import RunEntry


def loss_curves(entries: Iterable[RunEntry]) -> pd.DataFrame:
    """Long table of every run's losses: run, origin, prior, step, kind ("train"/"validation"), loss."""
    rows = []
    for entry in entries:
        data = runs_mod.read_run_json(entry.path)
        prior = data.get("config", {}).get("prior")
        for h in data.get("history", []):
            for kind, key in (("train", "train_loss"), ("validation", "val_loss")):
                if h.get(key) is not None:
                    rows.append({"run": entry.info.name, "origin": entry.origin, "prior": prior,
                                 "step": h["step"], "kind": kind, "loss": h[key]})
    return pd.DataFrame(rows, columns=["run", "origin", "prior", "step", "kind", "loss"])
