"""`python -m core <command>`: the headless entry to the same engine the pages use.

Each command is a module with `add_arguments(parser)` and `run(args) -> int`,
imported only when chosen so that `python -m core assets` stays light.

Expected errors (a bad option value, a model that cannot load, a malformed data file, a run folder that
cannot be used) print one line `error: ...` and exit 2; `--debug` (anywhere on the line) shows the traceback.
Ctrl-C outside training exits 130 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "assets": ("core.assets", "fetch and verify the embedded model and datasets"),
    "train": ("core.cli_train", "train a soft or deep prompt and write DIR/run.json"),
    "runs": ("core.cli_runs", "list stored runs"),
    "precompute": ("core.precompute", "build the committed artifacts under artifacts/"),
    "sweep": ("core.cli_sweep", "run a grid of train trials (priors x seeds x settings), locally or on Ray"),
    "sweeps": ("core.cli_sweeps", "list sweeps, or summarise one per prior with 95% CIs"),
}


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix from the message alone: shown as one line, not a traceback."""
    from core.locks import LockHeld
    from core.models import ModelLoadError

    found: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                        PermissionError, ModelLoadError, LockHeld]
    try:
        from core.data.sources import HubUnavailableError

        found.append(HubUnavailableError)
    except ImportError:  # pragma: no cover - data package without hub sources
        pass
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="python -m core", description="Prior Lab command line")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not built in this checkout
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    args.argv, args.debug = argv, debug  # the command line as given (train prints the exact resume command)
    if debug:
        return int(modules[args.command].run(args) or 0)
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except expected_errors() as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
