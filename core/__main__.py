"""`python -m core <command>`: the headless entry to the same engine the pages use.

Each command is a module with `add_arguments(parser)` and `run(args) -> int`,
imported only when chosen so that `python -m core assets` stays light.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="Prior Lab command line")
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
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
