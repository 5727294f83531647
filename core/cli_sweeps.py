"""`python -m core sweeps`: list sweeps with their trial counts, or print one sweep's per-prior summary.

    python -m core sweeps                         # sweeps under runs/ and the committed gallery
    python -m core sweeps runs/other              # sweeps in (or under) given folders
    python -m core sweeps --summary priors        # mean and 95% CI over seeds per prior x method x dataset
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("roots", nargs="*", help="folders holding sweeps (default: runs/ and artifacts/runs)")
    parser.add_argument("--summary", metavar="NAME", help="a sweep's name or folder: print its grouped table")
    parser.add_argument("--trials", action="store_true", help="with --summary: also the long table, one row per trial")


def _print_table(rows: list[dict], cols: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def run(args: argparse.Namespace) -> int:
    from core.sweep import find_sweep, list_sweeps

    roots = args.roots or None
    if args.summary:
        from core.analysis.sweeps import format_summary, sweep_summary, sweep_table

        try:
            path = find_sweep(args.summary, roots)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        table = sweep_table(path)
        print(f"sweep {path}: {len(table)} trial(s)\n")
        print(format_summary(sweep_summary(table)).to_string(index=False))
        print("\nmean [95% CI] over seeds (t-interval; '-' where a group has one seed: no interval)")
        if args.trials:
            cols = [c for c in ("trial", "status", "prior", "method", "dataset", "seed", "lr", "final_val_loss",
                                "metric_value", "steps_to_loss", "error") if c in table]
            print("\n" + table[cols].to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
        return 0
    sweeps = list_sweeps(roots)
    if not sweeps:
        print("no sweeps found; run one with `python -m core sweep --grid prior=gaussian,fitted --grid seed=0,1 "
              "--out runs/my-sweep`")
        return 0
    _print_table([s.row() for s in sweeps], ["sweep", "trials", "pending", "running", "done", "failed", "backend",
                                             "grid", "path"])
    return 0
