"""`python -m core train`: train a soft or deep prompt and write DIR/run.json (the engine the Train page uses)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from core.tuning.trainer import TrainConfig


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--prior-param takes key=value (e.g. sigma=0.02); got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string such as source=tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--model", default="smollm2-135m", help="embedded 'smollm2-135m', a hub id or a local folder")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"], help="base model weights")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--dataset", default=d.dataset, choices=["math", "squad"])
    parser.add_argument("--source", default=d.source, help="data source: auto (embedded), hub, a local SQuAD file "
                        "(used whole for each split asked), or split:FILE (one file divided by passage)")
    parser.add_argument("--method", default=d.method, choices=["soft", "deep"])
    parser.add_argument("--prior", default=d.prior, help="a core.priors name: gaussian, xavier, fitted, ...")
    parser.add_argument("--prior-param", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                        help="prior parameter, repeatable (values parsed as JSON when they can be)")
    parser.add_argument("--lr", type=float, default=d.lr,
                        help="Adam rate of the soft prompt (deep tensors: scaled per tensor, see --no-deep-lr-scale)")
    parser.add_argument("--max-steps", "--steps", dest="steps", type=int, default=d.steps,
                        help="the step budget; the plateau stop usually ends a run before it (--steps: same)")
    parser.add_argument("--schedule", default=d.schedule, choices=["constant", "linear"],
                        help="constant: the rate after a short warm-up; linear: warm-up then decay over the budget")
    parser.add_argument("--plateau-patience", type=int, default=d.plateau_patience,
                        help="stop after this many evaluations without a relative gain above --plateau-margin "
                             "(the run then counts as converged); 0: train the whole budget")
    parser.add_argument("--plateau-margin", type=float, default=d.plateau_margin,
                        help="relative validation-loss gain that counts as an improvement (0.01: 1%%)")
    parser.add_argument("--keep", default=d.keep, choices=["best", "last"],
                        help="a finished run's prompt: best = of the lowest validation loss (early stopping; "
                             "default), last = the last step's")
    parser.add_argument("--no-deep-lr-scale", dest="scale_deep_lr", action="store_false",
                        help="deep: train every tensor at --lr (default: each deep tensor at lr x its layer's "
                             "activation RMS over the token embeddings' RMS, so it moves as much, relatively)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--warmup-steps", type=int, default=-1,  # not d.: resolved for the default budget
                        help="-1: 10%% of the budget for --schedule linear, at most 10 for constant")
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="deep: decoder layers (default last 3)")
    parser.add_argument("--n-tokens", type=int, default=d.n_tokens)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--compute", default=d.compute, choices=["auto", "bf16", "fp32"],
                        help="compute dtype; auto: bf16 only where this device multiplies bf16 clearly faster "
                             "(measured once per machine), else fp32")
    parser.add_argument("--no-soft", dest="soft", action="store_false",
                        help="deep: train only the per-layer vectors, no token-level soft prompt; training then starts "
                             "at the first prompted layer from cached activations (about L/k faster per step)")
    parser.add_argument("--no-activation-cache", dest="cached_activations", action="store_false",
                        help="deep --no-soft: run the full forward every step instead (same loss, slower)")
    parser.add_argument("--n-train", type=int, default=d.n_train)
    parser.add_argument("--n-val", type=int, default=d.n_val)
    parser.add_argument("--val-every", type=int, default=d.val_every)
    parser.add_argument("--snapshot-every", type=int, default=d.snapshot_every)
    parser.add_argument("--eval-n", type=int, default=d.eval_n, help="held-out examples for task metrics; 0 skips")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: 12 for math, 40 for squad")
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (a larger --steps extends a finished run)")
    parser.add_argument("--force", action="store_true",
                        help="replace the run in --out (only its own files; a folder holding others is refused)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder layers for training (bf16 on an fp32 model; ~1 min to compile)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `core train` options describe (shared by `core sweep`, one trial at a time).

    Every TrainConfig field with an option of the same name is read from `args`; `--prior-param` pairs become
    `prior_params`. Raises ValueError (naming the option) when the options do not make a valid config.
    """
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["prior_params"] = dict(getattr(args, "prior_param", []) or [])
    values["layers"] = list(values.get("layers") or [])
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from core.models import load_model
    from core.run_folders import check_run_dir, reserve_run_dir
    from core.tuning import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if (args.resume or args.force) and not args.out:
        raise ValueError(f"--{'resume' if args.resume else 'force'} needs --out DIR, the run folder to "
                         f"{'continue' if args.resume else 'replace'}")
    if args.out:
        check_run_dir(args.out, resume=args.resume, force=args.force)  # before the model loads; again under the lock
    wall = time.perf_counter()
    lm = load_model(args.model, precision=args.precision, device=args.device)
    from core.compute import decide

    print(f"compute: {decide(lm, config.compute).reason}", flush=True)
    bar = tqdm(total=config.steps, desc=f"{config.method} {config.dataset}", unit="step", delay=0.5)  # none on errors
    last_val: list[float] = []

    def on_progress(p) -> None:  # noqa: ANN001 - core.tuning.Progress
        if p.phase == "eval":
            bar.set_description("evaluating (greedy generation)")
            return
        bar.n = p.step
        if p.val_loss is not None:
            last_val.append(p.val_loss)
        bar.set_postfix(loss=f"{p.train_loss:.3f}" if p.train_loss is not None else "-",
                        val=f"{last_val[-1]:.3f}" if last_val else "-", tok_s=f"{p.tokens_per_s:.0f}")
        bar.refresh()

    out = Path(args.out) if args.out else reserve_run_dir(f"{args.method}-{args.dataset}-{args.prior}-s{args.seed}")
    cancel = threading.Event()
    try:
        with _cancel_on_signals(cancel) as caught:
            result = train(lm, config, out, resume=args.resume, force=args.force, on_progress=on_progress,
                           cancel=cancel)
    except BaseException:
        if not args.out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the folder reserved for this run holds nothing
        raise
    finally:
        bar.close()
    m = result.metrics
    print(f"\nrun: {result.path}  status: {result.status}  converged: {result.converged} "
          f"(stop: {result.stop_reason} at step {m.get('steps_done')} of {config.steps})  "
          f"wall: {time.perf_counter() - wall:.1f} s "
          f"(training {m.get('train_seconds')} s, {m.get('train_tokens_per_s')} tokens/s)")
    if result.status == "cancelled":
        print(f"cancelled at step {result.history[-1]['step']} of {config.steps}, checkpoint saved; resume with: "
              f"{resume_command(getattr(args, 'argv', None), out)}")
    elif result.message:
        print(result.message)
    if m.get("initial_val_loss") is not None:
        change = m.get("val_loss_reduction", 0)
        print(f"val loss: {m['initial_val_loss']:.4f} -> {m['final_val_loss']:.4f} "
              f"({100 * abs(change):.1f}% {'lower' if change >= 0 else 'higher'})"
              + (f"; kept step {m['kept_step']}'s prompt, val loss {m['kept_val_loss']:.4f}" if "kept_step" in m
                 else ""))
    for kind in ("prompt", "no_prompt", "text_prompt"):
        scores = m.get("eval", {}).get(kind)
        if scores:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in scores.items()
                              if k in ("accuracy", "exact_match", "f1", "mae", "answer_loss") and isinstance(v, float))
            print(f"  {kind:12s} n={scores['n']}: {shown}")
    for name, d in (m.get("drift") or {}).items():
        if d.get("l2") is not None:
            gap = d.get("relative_to_token_nn_gap")
            print(f"  drift {name}: L2 {d['l2']:.3g} = {d['relative_to_init_norm']:.3g} x its initial norm"
                  + (f", {gap:.3g} x the token nearest-neighbour gap" if gap is not None else ""))
    if result.status == "cancelled":
        return 128 + (caught[0] if caught else signal.SIGINT)  # the shell's code for a run stopped by a signal
    return 0 if result.status == "done" else 1


def resume_command(argv: list[str] | None, out: str | Path) -> str:
    """The command that continues this run: the same `train` options, `--out DIR --resume`."""
    tokens = list(argv if argv is not None else sys.argv[1:])
    kept, skip = [], False
    for tok in tokens:
        if skip:
            skip = False
        elif tok == "--out":
            skip = True
        elif tok not in ("--resume", "--force") and not tok.startswith("--out="):
            kept.append(tok)
    if "train" not in kept:
        kept = ["train", *kept]
    return "python -m core " + shlex.join([*kept, "--out", str(out), "--resume"])


@contextlib.contextmanager
def _cancel_on_signals(cancel: threading.Event) -> Iterator[list[int]]:
    """SIGINT (Ctrl-C) and SIGTERM set `cancel`: the run stops after its current step and saves. A second one
    stops at once (KeyboardInterrupt: the run is left `interrupted`, resumable from its last checkpoint).
    Yields the list of signals caught."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        cancel.set()
        print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
