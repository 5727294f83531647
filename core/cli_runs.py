"""`python -m core runs`: list stored runs as a table (or delete one)."""

from __future__ import annotations

import argparse

from core.paths import RUNS_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=str(RUNS_DIR), help="folder holding run folders")
    parser.add_argument("--delete", metavar="RUN_DIR", help="delete this run folder")


def run(args: argparse.Namespace) -> int:
    from core.runs import delete_run, list_runs

    if args.delete:
        delete_run(args.delete)
        print(f"deleted {args.delete}")
        return 0
    infos = list_runs(args.root)
    if not infos:
        print(f"no runs under {args.root}; train one with `python -m core train ... --out DIR`")
        return 0
    cols = ["name", "method", "dataset", "prior", "lr", "steps", "status", "final val loss", "metric"]
    rows = []
    for info in infos:
        r = info.row()
        r["final val loss"] = f"{r['final val loss']:.4f}" if r["final val loss"] is not None else "-"
        r["metric"] = " ".join(f"{k}={v:.3f}" for k, v in info.metric.items()) or "-"
        rows.append([str(r[c]) for c in cols])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"\n{len(infos)} run(s) under {args.root}")
    return 0
