"""Sweeps: a grid of `core train` trials (priors x seeds x settings) as one resumable experiment.

    >>> from core.sweep import expand, run_sweep, train_parser
    >>> parser = train_parser()
    >>> trials = expand(parser, parser.parse_args(["--steps", "40"]), {"prior": ["gaussian", "fitted"],
    ...                                                                "seed": ["0", "1"]})
    >>> run_sweep("runs/priors", trials, backend="local")          # or backend="ray"

Modules: `spec` (grid -> trials), `trial` (one trial through `core.tuning.train`, failures contained),
`engine` (plan against sweep.json, run on a backend, record), `record` (sweep.json, the sweep list),
`backends` (one module per engine: local, ray).
"""

from core.sweep.engine import SweepResult, run_sweep
from core.sweep.record import SWEEP_JSON, SweepInfo, find_sweep, is_sweep, list_sweeps, read_sweep, sweep_of_run
from core.sweep.spec import SweepSpec, Trial, expand, load_spec, parse_grid, plan_trials, train_parser
from core.sweep.trial import TINY_MODEL, TrialOutcome, load_trial_model, run_trial

__all__ = [
    "SWEEP_JSON", "SweepInfo", "SweepResult", "SweepSpec", "TINY_MODEL", "Trial", "TrialOutcome", "expand",
    "find_sweep", "is_sweep", "list_sweeps", "load_spec", "load_trial_model", "parse_grid", "plan_trials",
    "read_sweep",
    "run_sweep", "run_trial", "sweep_of_run", "train_parser",
]
