"""`python -m core runs`: list stored runs as a table (or delete one).

Statuses are those of `core.runs` (running, evaluating, done, cancelled, diverged, interrupted); a run
folder whose run.json cannot be read is listed as "unreadable" with the file and the problem.
"""

from __future__ import annotations

import argparse

from core.paths import RUNS_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=str(RUNS_DIR), help="folder holding run folders")
    parser.add_argument("--delete", metavar="RUN_DIR",
                        help="delete this run: the files it wrote, then the folder (refused if it holds others)")


def run(args: argparse.Namespace) -> int:
    from core.run_folders import delete_run
    from core.runs import scan_runs

    if args.delete:
        deleted = delete_run(args.delete)
        print(f"deleted {args.delete} ({', '.join(deleted) or 'empty'})")
        return 0
    scan = scan_runs(args.root)
    if not scan.runs and not scan.problems:
        print(f"no runs under {args.root}; train one with `python -m core train ... --out DIR`")
        return 0
    cols = ["name", "method", "dataset", "prior", "lr", "steps", "status", "final val loss", "metric", "note"]
    rows = []
    for info in scan.runs:
        r = info.row()
        r["final val loss"] = f"{r['final val loss']:.4f}" if r["final val loss"] is not None else "-"
        r["metric"] = " ".join(f"{k}={v:.3f}" for k, v in info.metric.items()) or "-"
        rows.append([str(r[c]) for c in cols])
    for problem in scan.problems:  # never dropped in silence: the file and what is wrong with it
        r = problem.row()
        rows.append([str(r.get(c, "-")) for c in cols])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    unreadable = f", {len(scan.problems)} unreadable (fix or delete their run.json)" if scan.problems else ""
    print(f"\n{len(scan.runs)} run(s) under {args.root}{unreadable}")
    return 0
