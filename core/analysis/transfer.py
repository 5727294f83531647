"""Prompt transfer: every run's prompt scored on every task, and prompt distance against transfer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch

from core import runs as runs_mod
from core.analysis.runs_compare import same_model
from core.paths import ARTIFACTS_DIR


def prompt_from_run(run: runs_mod.Run, lm) -> torch.nn.Module:  # noqa: ANN001
    """The run's trained prompt as a `core.tuning` prompt module on `lm`'s device."""
    from core.tuning import build_prompt

    params = dict(run.config.get("prompt") or {})
    params.pop("num_layers", None)
    params.setdefault("n_tokens", int(run.config.get("n_tokens", 20)))
    prompt = build_prompt(run.config.get("method", "soft"), lm.hidden_size, lm.num_layers, **params)
    prompt.load_tensors(run.prompt)
    return prompt.to(lm.device).eval()


def encode_as_in_training(tokenizer, examples: list, max_length: int = 320) -> list:  # noqa: ANN001
    """Examples encoded as the trainer encodes them: QA passages first cut by `core.data.fit_to_length` to
    `max_length - 2` tokens around the answer (never the question or the answer), then `max_length` tokens of
    prompt + answer (`core.tuning.encode_examples`). Without the cut, a long passage loses its beginning, and
    with it the answer span, to the encoder's last-resort left truncation."""
    from core.data import fit_to_length
    from core.tuning import encode_examples

    fitted = [fit_to_length(ex, tokenizer, max_length - 2) if getattr(ex, "dataset", None) == "squad" else ex
              for ex in examples]
    return encode_examples(tokenizer, fitted, max_length)


@torch.no_grad()
def prompt_loss(lm, prompt, examples: list, batch_size: int = 8, compute: str = "auto",  # noqa: ANN001
                max_length: int = 320) -> float:
    """Mean answer-token cross-entropy of `examples` with `prompt` prepended (None: no prompt), encoded as in
    training (`encode_as_in_training`), so a run's own validation loss is reproduced."""
    from core.tuning import answer_loss, collate, compute_model
    from core.tuning.batches import fixed_batches

    model, autocast = compute_model(lm, compute)
    items = encode_as_in_training(lm.tokenizer, examples, max_length)
    total, count = 0.0, 0
    for idx in fixed_batches(items, batch_size):
        batch = collate([items[i] for i in idx], lm.tokenizer.pad_token_id).to(lm.device)
        total += float(answer_loss(model, prompt, batch, autocast))
        count += batch.n_answer
    return total / max(count, 1)


def transfer_matrix(
    lm,  # noqa: ANN001
    run_paths: Iterable[str | Path],
    datasets: Iterable[str] = ("math", "squad"),
    n: int = 32,
    seed: int = 1234,
    compute: str = "auto",
    max_length: int | dict[str, int] = 320,
    progress: Callable[[float], None] | None = None,
) -> pd.DataFrame:
    """Every run's prompt scored on every dataset's held-out examples (validation split, `n` examples, `seed`),
    encoded as in training at `max_length` tokens (or {dataset: tokens}, each task at the length it was trained).

    Returns a long table: run, path, trained_on, prior, evaluated_on, loss, no_prompt_loss,
    own_loss (the loss of the prompt trained on `evaluated_on` with the same prior, method and seed when one
    is among the runs), gain = no_prompt_loss - loss. Runs trained on other weights are refused.
    """
    from core.data import load_examples

    paths = [Path(p) for p in run_paths]
    datasets = list(datasets)
    if not paths:
        raise ValueError("no runs given: train some or run `python -m core precompute`")
    loaded = [runs_mod.load_run(p) for p in paths]
    for run in loaded:
        if not same_model(run, lm):
            raise ValueError(f"run {run.path.name} was trained on other weights ({run.config.get('model_fingerprint')})"
                             f"; transfer needs runs of the loaded model {lm.fingerprint}")
    examples = {d: load_examples(d, split="validation", n=n, seed=seed) for d in datasets}
    length = {d: max_length[d] if isinstance(max_length, dict) else max_length for d in datasets}
    baseline = {d: prompt_loss(lm, None, examples[d], compute=compute, max_length=length[d]) for d in datasets}
    rows, total, done = [], len(loaded) * len(datasets), 0
    for run in loaded:
        prompt = prompt_from_run(run, lm)
        for d in datasets:
            loss = prompt_loss(lm, prompt, examples[d], compute=compute, max_length=length[d])
            rows.append({"run": run.path.name, "path": str(run.path), "trained_on": run.config.get("dataset"),
                         "method": run.config.get("method"), "prior": run.config.get("prior"),
                         "seed": run.config.get("seed"), "evaluated_on": d, "loss": loss,
                         "no_prompt_loss": baseline[d], "gain": baseline[d] - loss})
            done += 1
            if progress is not None:
                progress(done / total)
    return pd.DataFrame(rows)


def distance_vs_transfer(transfer: pd.DataFrame, tensor: str = "soft",
                         base: Path = ARTIFACTS_DIR) -> tuple[pd.DataFrame, dict]:
    """Prompt distance against transfer, over ordered pairs (A, B) of runs trained on different tasks.

    For each pair: distance = Frobenius norm of P_A - P_B (tensor `tensor`, [n, d]), and
    transfer = share of B's own gain on B's task that A's prompt recovers:
    (no_prompt - loss of A on task B) / (no_prompt - loss of B on task B); 1 = as good as B's own prompt.
    Relative run paths (as stored in the committed artifacts) are read under `base`.
    Returns (pairs table, {"n", "pearson", "spearman", "p_value", "statement"}).
    """
    from scipy.stats import pearsonr, spearmanr

    needed = {"path", "trained_on", "evaluated_on", "loss", "no_prompt_loss"}
    if not needed <= set(transfer.columns):
        raise ValueError(f"transfer table lacks columns {sorted(needed - set(transfer.columns))}; "
                         "build it with transfer_matrix()")
    runs_by_path = {p: runs_mod.load_run(Path(p) if Path(p).is_absolute() else Path(base) / p)
                    for p in transfer["path"].unique()}
    lookup = transfer.set_index(["path", "evaluated_on"])
    rows = []
    for a, run_a in runs_by_path.items():
        for b, run_b in runs_by_path.items():
            task_b = run_b.config.get("dataset")
            if a == b or run_a.config.get("dataset") == task_b or (a, task_b) not in lookup.index:
                continue
            if tensor not in run_a.prompt or tensor not in run_b.prompt:
                continue
            own = lookup.loc[(b, task_b)]
            other = lookup.loc[(a, task_b)]
            own_gain = float(own["no_prompt_loss"] - own["loss"])
            if own_gain <= 0:
                continue  # B's prompt did not help on its own task: nothing to recover
            rows.append({
                "prompt_of": run_a.path.name, "evaluated_with_task_of": run_b.path.name, "task": task_b,
                "distance": float(torch.linalg.matrix_norm(run_a.prompt[tensor] - run_b.prompt[tensor])),
                "transfer": float(other["no_prompt_loss"] - other["loss"]) / own_gain,
                "prior_a": run_a.config.get("prior"), "prior_b": run_b.config.get("prior"),
            })
    pairs = pd.DataFrame(rows, columns=["prompt_of", "evaluated_with_task_of", "task", "distance", "transfer",
                                        "prior_a", "prior_b"])
    stats = {"n": len(pairs), "pearson": math.nan, "spearman": math.nan, "p_value": math.nan}
    if len(pairs) < 3 or pairs["distance"].nunique() < 2 or pairs["transfer"].nunique() < 2:
        stats["statement"] = (f"Only {len(pairs)} cross-task pairs: need 3 or more (runs on both tasks whose "
                              "prompts beat no prompt on their own task).")
        return pairs, stats
    stats["pearson"] = float(pearsonr(pairs["distance"], pairs["transfer"])[0])
    rho, p = spearmanr(pairs["distance"], pairs["transfer"])
    stats["spearman"], stats["p_value"] = float(rho), float(p)
    closer = "transfer better" if rho < 0 else "transfer worse"
    stats["statement"] = (f"Over {len(pairs)} cross-task pairs, closer prompts {closer} (Spearman rho={rho:.2f}, "
                          f"p={p:.3f}; Pearson r={stats['pearson']:.2f}). The cs224u write-up found closer "
                          "prompts transfer better, i.e. a negative correlation here.")
    return pairs, stats
