"""Our soft-prompt training step against PEFT prompt tuning, on the same real MATH and QA examples.

    .venv/bin/python bench/bench_tuning.py [--rounds 2] [--threads 1] [--batch-size 8] [--n 64] [--n-qa 16] [--compile]

Both train 20 virtual tokens on the embedded SmolLM2-135M (loaded in fp32) with the same thread count, in the
dtype `core.compute` picks for this CPU ("auto": bf16 only where bf16 matmuls are clearly faster, else fp32):
- PEFT: `get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init=RANDOM))`, trained the
  documented way: DataLoader-style shuffled batches padded on the right with an attention mask, labels -100 off
  the answer, `model(input_ids, attention_mask, labels).loss.backward()`, under `torch.autocast("cpu", bfloat16)`
  where the chosen dtype is bf16 (what a user of PEFT would run on this device), in plain fp32 otherwise.
- ours: `core.tuning` at compute "auto" (bf16 weights made once when bf16, batches bucketed by length, the
  block loop of core.tuning.blocks: the prompt's rows once per batch, fused projections, short attentions
  written out, the last block and logits only at answer positions).
Each round passes every example once per method and dataset, interleaved (PEFT, ours, PEFT, ours ...); the first
round is a warm-up, and tokens/s is the median over the measured rounds. Tokens are real (non-pad) tokens,
identical for both. Peak memory is the RSS high-water mark
(VmHWM) of a fresh child process per method running the same examples, run before the timed rounds, so neither
pays for the other's state.
The ceiling line divides our useful FLOP rate (4·N·tokens for the forward and the backward to activations, N the
non-embedding parameters, with the 20 virtual tokens counted once per batch as ours computes them, plus 4·d·V per
answer token for the head)
by this machine's matrix-product rate in the chosen dtype, measured here (2048 x 2048 x 2048).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.compute import cpu_model_name, matmul_gflops  # noqa: E402

N_VIRTUAL = 20


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_sets(lm, n: int, qa_max: int, n_qa: int = 0) -> dict[str, list]:
    from core.data import fit_to_length, load_examples

    math_ex = load_examples("math", split="train", n=n, seed=1)
    # QuAC passages run 350-1900 tokens; passages past qa_max are cut around the answer (core.data.fit_to_length)
    qa_ex = [fit_to_length(ex, lm.tokenizer, qa_max - 2)
             for ex in load_examples("squad", split="train", n=n_qa or n, seed=1)]
    return {"math": math_ex, "qa": qa_ex}


class Ours:
    def __init__(self, lm, examples: list, batch_size: int, compiled: bool = False) -> None:
        from core.tuning import build_prompt, compute_model, encode_examples

        self.model, self.amp = compute_model(lm, "auto", compiled=compiled)
        self.items = encode_examples(lm.tokenizer, examples, max_length=4096)
        self.pad, self.bs = lm.tokenizer.pad_token_id, batch_size
        self.prompt = build_prompt("soft", lm.hidden_size, lm.num_layers, n_tokens=N_VIRTUAL)
        torch.nn.init.normal_(self.prompt.soft, std=0.5)
        self.opt = torch.optim.AdamW(self.prompt.parameters(), lr=3e-3, weight_decay=0.0)
        self.epoch = 0

    def one_pass(self) -> tuple[int, int, int]:
        from core.tuning import answer_loss, collate
        from core.tuning.batches import epoch_batches

        tokens = answers = rows = 0
        for idx in epoch_batches(self.items, self.bs, seed=0, epoch=self.epoch):
            batch = collate([self.items[i] for i in idx], self.pad)
            loss = answer_loss(self.model, self.prompt, batch, self.amp) / batch.n_answer
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.prompt.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens, answers, rows = tokens + batch.n_tokens, answers + batch.n_answer, rows + len(idx)
        self.epoch += 1
        return tokens, answers, rows


class Peft:
    def __init__(self, lm, examples: list, batch_size: int) -> None:
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        from core.compute import decide
        from core.tuning import encode_examples

        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
        self.model = get_peft_model(lm.model, config)
        self.items = encode_examples(lm.tokenizer, examples, max_length=4096)  # the same token ids as ours
        self.pad, self.bs = lm.tokenizer.pad_token_id, batch_size
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=3e-3,
                                     weight_decay=0.0)
        self.rng = random.Random(0)
        self.bf16 = decide(lm).dtype == "bf16"  # the dtype a user would pick here, the same choice as ours

    def batch(self, idx: list[int]) -> dict:
        width = max(len(self.items[i].ids) for i in idx)
        ids = torch.full((len(idx), width), self.pad)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100)
        for r, i in enumerate(idx):
            item = self.items[i]
            ids[r, : len(item.ids)] = torch.tensor(item.ids)
            mask[r, : len(item.ids)] = 1
            labels[r, len(item.ids) - item.n_answer: len(item.ids)] = torch.tensor(item.ids[-item.n_answer:])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def one_pass(self) -> tuple[int, int, int]:
        order = list(range(len(self.items)))
        self.rng.shuffle(order)  # DataLoader(shuffle=True)
        tokens = answers = rows = 0
        for start in range(0, len(order) - self.bs + 1, self.bs):
            idx = order[start: start + self.bs]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(**self.batch(idx)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += sum(len(self.items[i].ids) for i in idx)
            answers += sum(self.items[i].n_answer for i in idx)
            rows += len(idx)
        return tokens, answers, rows


def make_runner(method: str, lm, examples: list, batch_size: int) -> Ours | Peft:
    if method == "peft":
        return Peft(lm, examples, batch_size)
    return Ours(lm, examples, batch_size, compiled=method == "ours_compiled")


def child(method: str, args: argparse.Namespace) -> None:
    """Fresh process: load, run every set once (twice for warm-up), print the RSS high-water mark."""
    from core.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(device="cpu")
    sets = load_sets(lm, args.n, args.qa_max_tokens, args.n_qa)
    base = vm_hwm_mb()
    for examples in sets.values():
        make_runner(method, lm, examples, args.batch_size).one_pass()
    print(json.dumps({"method": method, "loaded_mb": base, "peak_mb": vm_hwm_mb()}))


def peak_memory(methods: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Each method's peak RSS (MB) from a fresh child process, nan where the child failed. Run before this process
    loads anything: a parent holding a model and PEFT's freed activations (~11 GB here) beside a 12 GB child ran
    a 24 GB machine out of memory."""
    peak = {}
    for method in methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--threads", str(args.threads),
                              "--batch-size", str(args.batch_size), "--n", str(args.n), "--n-qa", str(args.n_qa),
                              "--qa-max-tokens", str(args.qa_max_tokens)], capture_output=True,
                             text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if not line:
            why = " (killed: out of memory?)" if out.returncode == -9 else ""
            print(f"memory child for {method} failed, exit {out.returncode}{why}: {out.stderr[-1000:]}")
            peak[method] = float("nan")
            continue
        measured = json.loads(line[-1])
        peak[method] = measured["peak_mb"]
        print(f"memory {method}: loaded {measured['loaded_mb']:.0f} MB, peak {measured['peak_mb']:.0f} MB",
              flush=True)
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=8)
    # a MATH pass of 16 examples took ~0.5 s, short enough for one slow second on this shared machine to move
    # the ratio by 20%; 64 (8 batches) is ~2 s. QA passes of 16 examples already take 15-50 s.
    parser.add_argument("--n", type=int, default=64, help="MATH examples (and QA examples when --n-qa is 0)")
    parser.add_argument("--n-qa", type=int, default=16, help="QA examples (0: same as --n)")
    parser.add_argument("--qa-max-tokens", type=int, default=640, help="QA examples longer than this are cut")
    parser.add_argument("--compile", action="store_true", help="also measure ours with torch.compile'd layers")
    parser.add_argument("--child", choices=["ours", "peft", "ours_compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return 0
    from core.compute import decide
    from core.models import load_model

    methods = ["peft", "ours"] + (["ours_compiled"] if args.compile else [])
    peak = peak_memory(methods, args)
    torch.set_num_threads(args.threads)
    lm = load_model(device="cpu")
    decision = decide(lm)
    print(f"device cpu: {cpu_model_name()} ({torch.backends.cpu.get_cpu_capability()}); "
          f"compute auto -> {decision.reason}")
    sets = load_sets(lm, args.n, args.qa_max_tokens, args.n_qa)
    params = {id(p): p for p in lm.model.parameters()}
    n_nonembed = sum(p.numel() for p in params.values()) - lm.model.get_input_embeddings().weight.numel()
    d, vocab = lm.hidden_size, lm.model.config.vocab_size
    print(f"threads {args.threads}, batch {args.batch_size}, {args.n} MATH and {args.n_qa or args.n} QA examples, "
          f"non-embedding params "
          f"{n_nonembed / 1e6:.1f} M")
    runners = {}
    for name, examples in sets.items():
        lengths = sorted(len(x) for x in (lm.tokenizer(e.prompt + e.target).input_ids for e in examples))
        print(f"{name}: lengths min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")
        runners[name] = {m: make_runner(m, lm, examples, args.batch_size) for m in methods}
    totals = {(s, m): [0, 0.0, 0] for s in sets for m in methods}
    rates: dict[tuple[str, str], list[float]] = {(s, m): [] for s in sets for m in methods}
    flops = {(s, m): 0.0 for s in sets for m in methods}
    for rnd in range(args.rounds + 1):
        for name in sets:
            for method in methods:
                start = time.perf_counter()
                tokens, answers, rows = runners[name][method].one_pass()
                elapsed = time.perf_counter() - start
                print(f"round {rnd} {name:4s} {method:13s} {tokens / elapsed:7.1f} tokens/s ({elapsed:.1f} s)",
                      flush=True)
                if rnd > 0:
                    rates[(name, method)].append(tokens / elapsed)
                    t = totals[(name, method)]
                    t[0], t[1], t[2] = t[0] + tokens, t[1] + elapsed, t[2] + 1
                    # ours runs the virtual tokens once per batch (shared keys/values), PEFT once per row
                    virtual = N_VIRTUAL * (rows // args.batch_size if method.startswith("ours") else rows)
                    flops[(name, method)] += 4 * n_nonembed * (tokens + virtual) + 4 * d * vocab * answers
    rate = 1e9 * matmul_gflops(torch.bfloat16 if decision.dtype == "bf16" else torch.float32,
                               torch.device("cpu"), size=2048, seconds=1.0)
    achieved = {m: sum(flops[(s, m)] for s in sets) / sum(totals[(s, m)][1] for s in sets) for m in methods}
    print(f"{decision.dtype} 2048^3 matmul: {rate / 1e9:.1f} GFLOP/s; useful rate "
          + ", ".join(f"{m} {achieved[m] / 1e9:.1f} GFLOP/s" for m in methods))
    for name in sets:  # the combined line is mostly QA's time; attention on its long rows is not counted as useful
        print(f"useful rate on {name} alone: " + ", ".join(
            f"{m} {flops[(name, m)] / totals[(name, m)][1] / 1e9:.1f} GFLOP/s "
            f"({flops[(name, m)] / totals[(name, m)][1] / rate:.2f} of the matmul rate)" for m in methods))
    results = []
    for ours_name in methods[1:]:
        tag = "" if ours_name == "ours" else "_compiled"
        for name in sets:
            # median over rounds: one round slowed by another process on this shared machine does not decide it
            ours, theirs = statistics.median(rates[(name, ours_name)]), statistics.median(rates[(name, "peft")])
            results.append(f"RESULT tokens_per_s_{name}{tag}_vs_peft ratio={ours / theirs:.3f} ours={ours:.1f} "
                           f"theirs={theirs:.1f} unit=tokens/s")
        results.append(f"RESULT peak_rss{tag}_vs_peft ratio={peak['peft'] / peak[ours_name]:.3f} "
                       f"ours={peak[ours_name]:.0f} theirs={peak['peft']:.0f} unit=MB")
        results.append(f"RESULT {decision.dtype}_matmul_ceiling{tag} ratio={achieved[ours_name] / rate:.3f} "
                       f"ours={achieved[ours_name] / 1e9:.1f} theirs={rate / 1e9:.1f} unit=GFLOP/s")
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
