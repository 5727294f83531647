"""What a sweep runs: `core train` options, a grid over some of them, and the trials they expand to.

    >>> parser = train_parser()
    >>> base = parser.parse_args(["--dataset", "math", "--steps", "2"])
    >>> trials = expand(parser, base, {"prior": ["gaussian", "fitted"], "seed": ["0", "1"]})
    >>> [t.name for t in trials]
    ['soft-math-gaussian-s0', 'soft-math-gaussian-s1', 'soft-math-fitted-s0', 'soft-math-fitted-s1']

A grid key is a `core train` option name (`prior`, `seed`, `lr`, `method`, `dataset`, `model`, ...);
`prior-param.NAME` sets one parameter of the prior. Values are parsed as the option parses them, so a
value the option refuses (`--grid dataset=c5`) stops the sweep before anything runs, while a value that
makes an invalid config (`--grid lr=nan`) becomes that trial's failure, with its reason.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

NOT_GRIDDABLE = ("out", "resume")


@dataclass
class Trial:
    """One point of the grid: its folder name, the options it sets, the model it needs and its resolved config.

    config: `TrainConfig.to_dict()` of the trial, or None when its options make no valid config (see `error`).
    """

    name: str
    overrides: dict
    model: dict
    config: dict | None
    error: str = ""
    threads: int = 0
    options: dict = field(default_factory=dict)  # method, dataset, prior, seed, lr as given (even when invalid)

    def record(self) -> dict:
        return {"name": self.name, "overrides": self.overrides, "model": self.model, "config": self.config,
                "options": self.options, "threads": self.threads}


@dataclass
class SweepSpec:
    """A sweep as data: base `core train` options, a grid, and optional explicit trials (each a dict of options).

    The trials are the product of `trials` (or one empty trial) with the grid. Stored in sweep.json under "spec",
    so `--spec DIR/sweep.json` reproduces a sweep elsewhere.
    """

    options: dict = field(default_factory=dict)
    grid: dict[str, list[str]] = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"options": self.options, "grid": self.grid, "trials": self.trials}

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        data = data.get("spec", data)  # a sweep.json is a spec too
        grid = {k: [str(v) for v in (vals if isinstance(vals, list) else [vals])]
                for k, vals in (data.get("grid") or {}).items()}
        return cls(options=dict(data.get("options") or {}), grid=grid, trials=list(data.get("trials") or []))


def train_parser() -> argparse.ArgumentParser:
    """A parser of exactly the `core train` options (the sweep parses each trial's options with it)."""
    from core.cli_train import add_arguments

    parser = argparse.ArgumentParser(prog="core train", add_help=False)
    add_arguments(parser)
    return parser


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["prior=gaussian,fitted", "seed=0,1"] -> {"prior": ["gaussian", "fitted"], "seed": ["0", "1"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid takes KEY=V1,V2 (e.g. --grid prior=gaussian,fitted); got {item!r}")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice; list every value once: --grid {key}=V1,V2,...")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def load_spec(path: str | Path) -> SweepSpec:
    """Read a spec file (JSON: {"options": {...}, "grid": {KEY: [values]}, "trials": [{...}]}, or a sweep.json)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--spec {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--spec {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--spec {path} must hold a JSON object with options, grid and/or trials")
    return SweepSpec.from_dict(data)


def _by_field(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    """The option that sets TrainConfig field `key` when no option has its name (scale_deep_lr: --no-deep-lr-scale)."""
    dest = key.replace("-", "_")
    if "--" + key.replace("_", "-") in parser._option_string_actions:  # noqa: SLF001 - named by its option
        return None
    found = [a for a in parser._actions if a.option_strings and a.dest == dest]  # noqa: SLF001
    return found[0] if found else None


def _action(parser: argparse.ArgumentParser, key: str) -> argparse.Action:
    option = "--" + key.replace("_", "-")
    actions = parser._option_string_actions  # noqa: SLF001 - the one public-enough map from option to action
    field_action = _by_field(parser, key)
    if field_action is not None and key not in NOT_GRIDDABLE:
        return field_action
    if option not in actions or key in NOT_GRIDDABLE:
        names = sorted({a.dest.replace("_", "-") for a in parser._actions if a.option_strings}  # noqa: SLF001
                       - set(NOT_GRIDDABLE) - {"help"})
        raise ValueError(f"unknown sweep key {key!r}: use a `core train` option ({', '.join(names)}) "
                         "or prior-param.NAME")
    return actions[option]


def _json_or_text(text: object) -> object:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_option(parser: argparse.ArgumentParser, ns: argparse.Namespace, key: str, value: object) -> None:
    """Set option `key` (a `core train` option name, or prior-param.NAME / prior-param as a dict) on `ns`,
    parsing a string value as the option would. Raises ValueError naming the option and its accepted values."""
    key = key.removeprefix("--")
    if key.startswith("prior-param.") or key.startswith("prior_param."):
        name = key.split(".", 1)[1]
        pairs = [(k, v) for k, v in ns.prior_param if k != name]
        ns.prior_param = [*pairs, (name, _json_or_text(value))]
        return
    if key in ("prior-param", "prior_param", "prior_params"):
        if not isinstance(value, dict):
            raise ValueError(f"{key} in a spec must be an object of prior parameters; got {value!r}")
        ns.prior_param = list(value.items())
        return
    action = _action(parser, key)
    if isinstance(action, argparse._StoreConstAction):  # noqa: SLF001 - store_true / store_false
        text = str(value).lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--{key} is a switch: give true or false; got {value!r}")
        on = text in ("true", "1", "yes")
        if _by_field(parser, key) is action:  # named by its field (scale_deep_lr=false): the value is the field's
            setattr(ns, action.dest, on)
            return
        setattr(ns, action.dest, action.const if on else action.default)
        return
    if action.nargs in ("*", "+"):  # a list option (--layers 27 28 29): a list, or a string of space-separated words
        words = value.split() if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        try:
            value = [action.type(w) if action.type is not None and isinstance(w, str) else w for w in words]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--{key} value {value!r} is not valid ({exc}): give its values as a list, or "
                             f"separated by spaces") from None
        setattr(ns, action.dest, value)
        return
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--{key} value {value!r} is not valid ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--{key} value {value!r} is not one of {', '.join(map(str, action.choices))}")
    setattr(ns, action.dest, value)


def _short(value: object) -> str:
    if isinstance(value, (list, tuple)):  # --layers 27 28 29 -> 27.28.29
        return ".".join(_short(v) for v in value)
    if isinstance(value, str) and len(value.split()) > 1:  # the same list as a grid's string "27 28 29"
        return ".".join(_short(v) for v in value.split())
    text = str(value)
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:g}"
    text = text.rstrip("/").rsplit("/", 1)[-1]  # a model path or hub id: its last part
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def trial_name(ns: argparse.Namespace, overrides: dict) -> str:
    """`{method}-{dataset}-{prior}-s{seed}` (the gallery's names), then `-{key}{value}` for any other grid key."""
    name = f"{ns.method}-{ns.dataset}-{_short(ns.prior)}-s{ns.seed}"
    for key, value in overrides.items():
        key = key.replace("_", "-")
        if key in ("method", "dataset", "prior", "seed"):
            continue
        if key in ("prior-param", "prior-params"):
            name += "".join(f"-{k}{_short(v)}" for k, v in sorted(dict(value).items()))
        else:
            name += f"-{key.removeprefix('prior-param.')}{_short(value)}"
    return name


def expand(parser: argparse.ArgumentParser, base: argparse.Namespace, grid: dict[str, list[str]],
           trials: list[dict] | None = None) -> list[Trial]:
    """Every trial of the sweep, in grid order (the last key varies fastest), with its resolved config.

    Option errors (unknown key, a value the option refuses) raise ValueError before anything runs; a trial whose
    options make an invalid TrainConfig is kept with `config=None` and its `error`, to be reported as failed.
    """
    from core.cli_train import config_from_args

    for key in grid:
        if not key.startswith(("prior-param.", "prior_param.")):
            _action(parser, key)
    if not grid and not trials:
        trials = [{}]
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] or [{}]
    out: list[Trial] = []
    for extra in trials or [{}]:
        for point in points:
            overrides = {**extra, **point}
            given_name = overrides.pop("name", None)  # an explicit trial may name its folder (the gallery does)
            ns = copy.deepcopy(base)
            for key, value in overrides.items():
                apply_option(parser, ns, key, value)
            model = {"name": ns.model, "precision": ns.precision, "device": ns.device}
            try:
                config, error = config_from_args(ns).to_dict(), ""
            except (ValueError, TypeError) as exc:
                config, error = None, f"invalid options: {exc}"
            options = _jsonable({k: getattr(ns, k) for k in ("method", "dataset", "prior", "seed", "lr")})
            name = f"{given_name}{trial_name(ns, point)[len(trial_name(ns, {})):]}" if given_name else \
                trial_name(ns, overrides)
            out.append(Trial(name, _jsonable(overrides), model, config, error,
                             threads=int(getattr(ns, "threads", 0) or 0), options=options))
    seen: dict[str, int] = {}
    for trial in out:  # two spellings of one value (lr=0.001 and lr=1e-3) must not share a folder
        seen[trial.name] = seen.get(trial.name, 0) + 1
        if seen[trial.name] > 1:
            trial.name = f"{trial.name}-{seen[trial.name]}"
    return out


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def plan_trials(options: dict, grid: dict | None = None,
                trials: list[dict] | None = None) -> tuple[SweepSpec, list[Trial]]:
    """A sweep from data, as a page or the gallery builds it: `core train` options {name: value} (model and
    precision included), a grid {KEY: [values]} and explicit trials. Returns (spec, expanded trials)."""
    grid = {k: [str(v) for v in vals] for k, vals in (grid or {}).items()}
    parser = train_parser()
    base = parser.parse_args([])
    for key, value in options.items():
        apply_option(parser, base, key, value)
    spec = SweepSpec(options=dict(options), grid=grid, trials=list(trials or []))
    return spec, expand(parser, base, grid, spec.trials)
