"""Activation extraction: ours (`collect_activations`, compute "auto") vs `model(..., output_hidden_states=True)`.

Same real texts (C4, SQuAD and MATH stand-ins, mixed lengths, each cut to --max-length
tokens), same batch size; cold (no disk cache: `collect_activations` never caches).
The reference is what a user would write: tokenise each batch of 8 in the given order
with padding, run the whole model with all hidden states, keep the non-padding rows of
the wanted layer, in the dtype a user would pick on this device: fp32 where the CPU has
no fast bf16, bf16 autocast where it has (the same decision `core.compute` makes for
ours). Ours stops after the layer and sorts texts by length into batches. The ceiling
line divides our useful FLOP rate (2 x the parameters of the blocks run x tokens) by this
machine's matrix-product rate in the chosen dtype.

Error: relative Frobenius error ||ours - ref|| / ||ref|| over all non-padding rows
except each text's first token (the attention sink, which the views leave out),
and the 99th percentile of the per-row relative error. For the last layer
transformers returns the hidden state *after* the final norm, ours is the block
output before it, so the norm is applied to ours before comparing.

    .venv/bin/python bench/bench_activations.py            # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.activations import collect_activations, keep_side, tokenize  # noqa: E402
from core.compute import decide, matmul_gflops  # noqa: E402
from core.data import example_texts  # noqa: E402
from core.models import load_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def reference(lm, texts: list[str], keep: list[str], layer: int, max_length: int, batch_size: int,  # noqa: ANN001
              amp: torch.dtype | None = None):
    """Plain transformers: every layer and the head, padded batches in the given order (bf16 autocast if `amp`)."""
    ids = [tokenize(lm, [t], max_length, k)[0] for t, k in zip(texts, keep, strict=True)]
    rows, padded = [], 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        enc = lm.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        padded += enc["input_ids"].numel()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            hidden = lm.model(**enc, output_hidden_states=True).hidden_states[layer]  # [B, T, d]
        for r, seq in enumerate(batch):
            rows.append(hidden[r, 1 : len(seq)].float().numpy())  # first token left out, as in our default view
    return np.concatenate(rows), padded


def ours(lm, texts: list[str], keep: list[str], layer: int, max_length: int, batch_size: int,  # noqa: ANN001
         compute: str = "auto"):
    # Texts of one dataset share a truncation side; group calls by side and keep the given order.
    parts = []
    for side in dict.fromkeys(keep):
        chosen = [t for t, k in zip(texts, keep, strict=True) if k == side]
        parts.append(collect_activations(lm, chosen, [layer], max_length=max_length, batch_size=batch_size,
                                         keep=side, compute=compute))
    return parts


def ours_rows(parts, layer: int) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([p.layer(layer) for p in parts])


def timed(fn, repeats: int) -> tuple[float, object]:  # noqa: ANN001
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-dataset", type=int, default=8, help="texts per dataset (3 datasets)")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides; 1 because the 2 cores here are shared and spinning "
                             "OpenMP threads made both sides 2-5x slower and noisy under load")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(precision="fp32", device="cpu")
    decision = decide(lm)
    amp = torch.bfloat16 if decision.dtype == "bf16" else None
    peak = 1e9 * matmul_gflops(DTYPES[decision.dtype], torch.device("cpu"), size=1024, seconds=1.0)
    print(f"device cpu ({torch.backends.cpu.get_cpu_capability()}); compute auto -> {decision.reason}; "
          f"{decision.dtype} 1024^3 matmul {peak / 1e9:.1f} GFLOP/s at {torch.get_num_threads()} thread(s)")
    texts, keep = [], []
    for d in ("c4", "squad", "math"):
        got = example_texts(d, args.per_dataset, seed=0)
        texts += got
        keep += [keep_side(d)] * len(got)
    # Interleave datasets so that the reference's batches mix lengths, as a user's would.
    order = np.random.default_rng(0).permutation(len(texts))
    texts, keep = [texts[i] for i in order], [keep[i] for i in order]
    # ours() groups by truncation side; align the reference's row order with it.
    by_side = [i for side in dict.fromkeys(keep) for i in range(len(texts)) if keep[i] == side]
    ref_texts, ref_keep = [texts[i] for i in by_side], [keep[i] for i in by_side]
    n_tokens = sum(len(tokenize(lm, [t], args.max_length, k)[0]) for t, k in zip(texts, keep, strict=True))
    print(f"model {lm.name} fp32 weights on {lm.device}, reference in {decision.dtype}, "
          f"torch threads {torch.get_num_threads()}; {len(texts)} texts, "
          f"{n_tokens} tokens (max {args.max_length}/text), batch size {args.batch_size}; CPU shared with others")

    mid, last = lm.num_layers // 2, lm.num_layers
    results = []
    for layer in (mid, last):
        # Warm-up every path once (first-call allocations, kernel selection).
        reference(lm, ref_texts[:8], ref_keep[:8], layer, args.max_length, args.batch_size, amp)
        t_ref, (ref_rows, padded) = timed(
            lambda layer=layer: reference(lm, ref_texts, ref_keep, layer, args.max_length, args.batch_size, amp),
            args.repeats)
        # Rows whose norm is far above the median: massive activations at a few non-first tokens.
        norms = np.linalg.norm(ref_rows, axis=1)
        massive = norms > 5 * np.median(norms)
        print(f"layer {layer}: reference {t_ref:.2f} s, {padded} padded positions for {n_tokens} tokens")
        # The default, and the model's own fp32 when the default is bf16 autocast (its accuracy costs nothing then).
        for compute in ("auto",) + (("native",) if decision.dtype == "bf16" else ()):
            ours(lm, texts[:8], keep[:8], layer, args.max_length, args.batch_size, compute)
            t_ours, parts = timed(lambda layer=layer, c=compute: ours(lm, texts, keep, layer, args.max_length,
                                                                      args.batch_size, c), args.repeats)
            got = ours_rows(parts, layer)
            if layer == lm.num_layers:
                with torch.inference_mode():
                    got = lm.model.model.norm(torch.from_numpy(got)).numpy()
            err = float(np.linalg.norm(got - ref_rows) / np.linalg.norm(ref_rows))
            rest = float(np.linalg.norm((got - ref_rows)[~massive]) / np.linalg.norm(ref_rows[~massive]))
            mode = parts[0].compute
            print(f"  ours ({mode}): {t_ours:.2f} s; relative error {100 * err:.2f}% over {len(got)} rows, "
                  f"{100 * rest:.2f}% without the {int(massive.sum())} massive-activation rows")
            results.append((layer, compute, t_ref, t_ours, err))
    for layer, mode, _t_ref, _t_ours, err in results:
        name = "middle" if layer == mid else "last"
        print(f"ERROR extract_{name}_layer{layer}_{mode} relative_error={err:.4f}")
    block_params = sum(p.numel() for p in lm.decoder_layers[0].parameters())
    for layer, compute, t_ref, t_ours, _err in results:
        name = "middle" if layer == mid else "last"
        suffix = "" if compute == "auto" else "_native_fp32"
        print(f"RESULT extract_{name}_layer{layer}{suffix}_vs_hf_output_hidden_states ratio={t_ref / t_ours:.2f} "
              f"ours={t_ours:.3f} theirs={t_ref:.3f} unit=s")
        if compute == "auto":
            useful = 2 * block_params * layer * n_tokens / t_ours
            print(f"RESULT extract_{name}_layer{layer}_{decision.dtype}_matmul_ceiling ratio={useful / peak:.3f} "
                  f"ours={useful / 1e9:.1f} theirs={peak / 1e9:.1f} unit=GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
