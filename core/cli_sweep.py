"""`python -m core sweep`: a grid of `core train` trials as one resumable experiment, locally or on Ray.

    python -m core sweep --dataset math --method soft --grid prior=gaussian,fitted --grid seed=0,1 \\
        --steps 40 --out runs/priors                       # local: one trial after another, one model load
    python -m core sweep ... --backend ray --gpus-per-trial 0.25 --out runs/priors   # Ray: local cluster
    python -m core sweep ... --backend ray --address HEAD:6379 --model meta-llama/Llama-3.2-1B --out ...
    python -m core sweep --out runs/priors                 # resume the sweep recorded in runs/priors/sweep.json

Every `core train` option passes through to every trial; `--grid KEY=V1,V2` (repeatable) varies one of them
(`prior-param.NAME=...` a prior's parameter). Each trial writes DIR/<trial>/run.json as `core train` does;
DIR/sweep.json records the grid, each trial's config, status and timing.
"""

from __future__ import annotations

import argparse
import sys

from core.cli_train import add_arguments as add_train_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    actions = parser._option_string_actions  # noqa: SLF001 - the sweep gives train's --out its own meaning
    actions["--out"].help = "the sweep's folder: DIR/sweep.json and DIR/<trial>/ (required)"
    for option in ("--resume", "--force"):  # a sweep always resumes; --retry-failed replaces failed trials
        if option in actions:
            actions[option].help = argparse.SUPPRESS
    group = parser.add_argument_group("sweep")
    group.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="vary a train option over values, repeatable: prior, seed, lr, method, dataset, model, "
                            "prior-param.NAME, or any other train option")
    group.add_argument("--spec", metavar="FILE",
                       help='JSON {"options": {...}, "grid": {KEY: [values]}, "trials": [{...}]}, or a sweep.json '
                            "(options given on the command line win)")
    group.add_argument("--backend", default="local", choices=["local", "ray"],
                       help="local: trials one after another in this process; ray: Ray tasks")
    group.add_argument("--retry-failed", action="store_true", help="run failed trials again, from scratch")
    group.add_argument("--address", default=None,
                       help="ray: join this cluster (HOST:PORT of `ray start --head`, or auto); default: start a "
                            "local cluster on 127.0.0.1")
    group.add_argument("--cpus-per-trial", type=float, default=1.0, help="ray: CPUs each trial declares")
    group.add_argument("--gpus-per-trial", type=float, default=0.0,
                       help="ray: GPUs each trial declares; fractions share a GPU (0.25: four trials per GPU)")
    group.add_argument("--num-cpus", type=int, default=None, help="ray: CPUs of the local cluster (default: all)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


SWEEP_ONLY = ("grid", "spec", "backend", "retry_failed", "address", "cpus_per_trial", "gpus_per_trial", "num_cpus",
              "progress", "command", "out", "resume", "force", "debug", "argv")


def _base_options(args: argparse.Namespace, spec_options: dict) -> tuple[argparse.Namespace, dict]:
    """(train namespace, the options that differ from `core train`'s defaults): spec options fill in every train
    option the command line left at its default."""
    from core.sweep.spec import apply_option, train_parser

    parser = train_parser()
    defaults = vars(parser.parse_args([]))
    ns = parser.parse_args([])
    for dest in defaults:
        setattr(ns, dest, getattr(args, dest, defaults[dest]))
    for key, value in spec_options.items():
        dest = key.replace("-", "_")
        if dest == "prior_params":
            dest = "prior_param"
        if dest in SWEEP_ONLY or getattr(ns, dest, None) != defaults.get(dest):
            continue  # given on the command line: it wins
        apply_option(parser, ns, key, value)
    changed = {k.replace("_", "-"): v for k, v in vars(ns).items()
               if k not in SWEEP_ONLY and v != defaults.get(k)}
    if "prior-param" in changed:
        changed["prior-param"] = dict(changed["prior-param"])
    return ns, changed


def run(args: argparse.Namespace) -> int:
    from core.locks import LockHeld
    from core.sweep import SweepSpec, expand, is_sweep, load_spec, parse_grid, read_sweep, run_sweep, train_parser

    if not args.out:
        print("error: --out DIR is required: the sweep's folder (DIR/sweep.json and one run folder per trial)",
              file=sys.stderr)
        return 2
    try:
        if args.spec:
            spec = load_spec(args.spec)
        elif not args.grid and is_sweep(args.out):
            spec = SweepSpec.from_dict(read_sweep(args.out))  # the same sweep again: resume it
            print(f"resuming the sweep recorded in {args.out}")
        else:
            spec = SweepSpec()
        base, options = _base_options(args, spec.options)
        spec = SweepSpec(options=options, grid={**spec.grid, **parse_grid(args.grid)}, trials=spec.trials)
        trials = expand(train_parser(), base, spec.grid, spec.trials)
        backend_options = ({"address": args.address, "cpus_per_trial": args.cpus_per_trial,
                            "gpus_per_trial": args.gpus_per_trial, "num_cpus": args.num_cpus}
                           if args.backend == "ray" else {})
        result = run_sweep(args.out, trials, spec=spec, backend=args.backend, backend_options=backend_options,
                           retry_failed=args.retry_failed, progress=args.progress)
    except (ValueError, LockHeld, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nsweep {result.path}: {len(result.ran)} trial(s) run in {result.seconds:.1f} s; "
          + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    for trial in result.record["trials"]:
        val = trial.get("final_val_loss")
        line = f"  {trial['name']:40s} {trial['status']:8s} " + (f"val {val:.4f}" if val is not None else "")
        if trial["status"] == "done":
            line += f"  converged {bool(trial.get('converged'))}"
        if trial.get("error"):
            line += f"  {trial['error'].splitlines()[0][:160]}"
        print(line)
    if result.interrupted:
        print("stopped: run the same command again to resume")
        return 130
    return 1 if result.counts.get("failed") else 0
