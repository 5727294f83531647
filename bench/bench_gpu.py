"""GPU speed of our soft-prompt step against PEFT prompt tuning, on a random-weight LLaMA shaped like SmolLM2-135M.

    python bench/bench_gpu.py                 # on a CUDA machine: torch, transformers and peft are all it needs
    python bench/bench_gpu.py --device cpu --layers 2 --rounds 1   # a quick check of the script itself

Speed does not depend on the weights, so no checkpoint travels: the model is built from the embedded model's
shape (30 layers, d=576, 9 heads / 3 KV heads, vocabulary 49,152; `bench/smollm2-135m-shape.json`) with random
weights, in the precision the dashboard proposes on this device (bf16 on a GPU with bf16, else fp32). Batches
are token ids with the length profile of the real data (MATH: 25-45 prompt tokens and a 3-token answer; QA:
150-600 prompt tokens and a 12-token answer); the content does not change the cost.

- PEFT: `get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))`, shuffled batches
  padded on the right with an attention mask, labels -100 off the answer, `model(**batch).loss.backward()`, under
  the same compute dtype (autocast when the weights are fp32 and the policy says bf16).
- ours: `core.tuning` at compute "auto": batches bucketed by length, logits only at answer positions.

Tokens/s counts real (non-pad) tokens, the same for both. The ceiling line divides our useful FLOP rate
(4·N·tokens, N the non-embedding parameters, virtual tokens counted, plus 4·d·V per answer token) by this
device's matrix-product rate in the chosen dtype (4096^3 on a GPU).

With `--deep-k K` (default 3; 0 skips it) it also times deep prompt-tuning without a soft prompt at the last K
blocks, one step from cached residuals (`core.tuning.cached.ResidualCache`, warm) against the uncached step from
block 0, interleaved on the same batches, as `bench/bench_deep_cached.py` does on the real model. `--profile`
counts each side's kernels and kernel time per step (torch.profiler), which says whether a step is bound by the
device or by launching kernels.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.compute import decide, default_precision, matmul_gflops  # noqa: E402
from core.tuning import answer_loss, build_prompt, collate, compute_model  # noqa: E402
from core.tuning.batches import Encoded, epoch_batches  # noqa: E402

SHAPE_FILE = Path(__file__).with_name("smollm2-135m-shape.json")
N_VIRTUAL = 20
PROFILES = {"math": ((25, 45), 3), "qa": ((150, 600), 12)}  # (prompt length range, answer length)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def random_llama(device: torch.device, precision: str, layers: int | None):  # noqa: ANN201 - LlamaForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = json.loads(SHAPE_FILE.read_text())
    if layers:
        shape["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)).to(device=device,
                                                                                   dtype=DTYPES[precision])
    model.eval().requires_grad_(False)
    return model


def make_items(kind: str, n: int, vocab: int, seed: int) -> list[Encoded]:
    (low, high), answer = PROFILES[kind]
    rng = random.Random(seed)
    return [Encoded([rng.randrange(10, vocab) for _ in range(rng.randint(low, high) + answer)], answer)
            for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    def __init__(self, lm, items: list[Encoded], batch_size: int) -> None:  # noqa: ANN001
        self.model, self.amp = compute_model(lm, "auto")
        self.items, self.bs, self.device = items, batch_size, lm.device
        self.prompt = build_prompt("soft", lm.hidden_size, lm.num_layers, n_tokens=N_VIRTUAL).to(lm.device)
        torch.nn.init.normal_(self.prompt.soft, std=0.5)
        self.opt = torch.optim.AdamW(self.prompt.parameters(), lr=3e-3, weight_decay=0.0)
        self.epoch = 0

    def one_pass(self) -> tuple[int, int, int]:
        tokens = answers = rows = 0
        for idx in epoch_batches(self.items, self.bs, seed=0, epoch=self.epoch):
            batch = collate([self.items[i] for i in idx], 0).to(self.device)
            loss = answer_loss(self.model, self.prompt, batch, self.amp) / batch.n_answer
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.prompt.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens, answers, rows = tokens + batch.n_tokens, answers + batch.n_answer, rows + len(idx)
        self.epoch += 1
        return tokens, answers, rows


class Peft:
    def __init__(self, lm, items: list[Encoded], batch_size: int) -> None:  # noqa: ANN001
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
        self.model = get_peft_model(lm.model, config)
        self.items, self.bs, self.device = items, batch_size, lm.device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=3e-3, weight_decay=0.0)
        # the same compute as ours: autocast only when fp32 weights meet a bf16 decision
        self.amp = lm.precision == "fp32" and decide(lm).dtype == "bf16"
        self.rng = random.Random(0)

    def batch(self, idx: list[int]) -> dict:
        width = max(len(self.items[i].ids) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100)
        for r, i in enumerate(idx):
            item = self.items[i]
            ids[r, : len(item.ids)] = torch.tensor(item.ids)
            mask[r, : len(item.ids)] = 1
            labels[r, len(item.ids) - item.n_answer: len(item.ids)] = torch.tensor(item.ids[-item.n_answer:])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device)}

    def one_pass(self) -> tuple[int, int, int]:
        order = list(range(len(self.items)))
        self.rng.shuffle(order)  # DataLoader(shuffle=True)
        tokens = answers = rows = 0
        for start in range(0, len(order) - self.bs + 1, self.bs):
            idx = order[start: start + self.bs]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.model(**self.batch(idx)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += sum(len(self.items[i].ids) for i in idx)
            answers += sum(self.items[i].n_answer for i in idx)
            rows += len(idx)
        return tokens, answers, rows


def step_profile(runner, device: torch.device) -> tuple[float, int, float]:  # noqa: ANN001 - Ours or Peft
    """(wall ms under the profiler, kernels launched, ms of kernel time) per step over one pass of `runner`, from
    torch.profiler: a step whose kernel time is far below its (unprofiled) wall time is bound by launching kernels,
    not by the device. The profiler itself slows the host side, so its wall time is only an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        rows = runner.one_pass()[2]
        sync(device)
    wall = time.perf_counter() - start
    steps = max(rows // runner.bs, 1)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3  # us -> ms
    return 1e3 * wall / steps, len(kernels) // steps, busy / steps


def deep_cached(lm, items: list[Encoded], batch_size: int, k: int, rounds: int) -> tuple[float, float, float]:  # noqa: ANN001
    """(median full step s, median cached step s, largest relative loss difference) for deep prompts at the last k."""
    from core.tuning.cached import ResidualCache

    model, amp = compute_model(lm, "auto")
    layers = list(range(lm.num_layers - k, lm.num_layers))
    prompt = build_prompt("deep", lm.hidden_size, lm.num_layers, n_tokens=N_VIRTUAL, layers=layers, soft=False)
    prompt.to(lm.device)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(std=0.02)
    cache = ResidualCache(lm, model, amp, start=layers[0])
    groups = [[items[i] for i in idx] for idx in epoch_batches(items, batch_size, seed=0, epoch=0)]

    def step(group: list[Encoded], cached: bool) -> tuple[float, float]:
        batch = collate(group, 0).to(lm.device)
        if cached:
            cache.attach(batch, group)
        sync(lm.device)
        start = time.perf_counter()
        loss = answer_loss(model, prompt, batch, amp) / batch.n_answer
        loss.backward()
        prompt.zero_grad(set_to_none=True)
        sync(lm.device)
        return time.perf_counter() - start, float(loss.detach())

    for group in groups:  # warm-up; fills the cache
        cache.get(group)
        step(group, cached=False)
        step(group, cached=True)
    full, warm, diffs = [], [], []
    for _ in range(rounds):
        for group in groups:
            t_full, loss_full = step(group, cached=False)
            t_warm, loss_warm = step(group, cached=True)
            full.append(t_full)
            warm.append(t_warm)
            diffs.append(abs(loss_full - loss_warm) / abs(loss_full))
    return statistics.median(full), statistics.median(warm), max(diffs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="weights (default: what the dashboard proposes on this device)")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers, for a quick check (0: all 30)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=64, help="sequences per data profile")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up")
    parser.add_argument("--profile", action="store_true", help="also count kernels and kernel time per step")
    parser.add_argument("--deep-k", type=int, default=3, help="also time cached deep tuning at the last k (0: skip)")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or (default_precision() if device.type == "cuda" else "fp32")
    model = random_llama(device, precision, args.layers)
    config = model.config
    lm = SimpleNamespace(model=model, device=device, precision=precision, extra={},
                         fingerprint=f"random-{config.num_hidden_layers}-{precision}",
                         tokenizer=SimpleNamespace(pad_token_id=0),
                         hidden_size=config.hidden_size, num_layers=config.num_hidden_layers)
    decision = decide(lm)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}; weights {precision}; compute auto -> {decision.reason}; torch {torch.__version__}")
    n_nonembed = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    sets = {kind: make_items(kind, args.n, config.vocab_size, seed=1) for kind in PROFILES}
    runners = {kind: {"peft": Peft(lm, items, args.batch_size), "ours": Ours(lm, items, args.batch_size)}
               for kind, items in sets.items()}
    rates: dict[tuple[str, str], list[float]] = {(k, m): [] for k in sets for m in ("peft", "ours")}
    step_ms: dict[tuple[str, str], list[float]] = {(k, m): [] for k in sets for m in ("peft", "ours")}
    flops, seconds = 0.0, 0.0
    for rnd in range(args.rounds + 1):
        for kind in sets:
            for method in ("peft", "ours"):
                sync(device)
                start = time.perf_counter()
                tokens, answers, rows = runners[kind][method].one_pass()
                sync(device)
                elapsed = time.perf_counter() - start
                print(f"round {rnd} {kind:4s} {method:4s} {tokens / elapsed:9.1f} tokens/s ({elapsed:.2f} s)",
                      flush=True)
                if rnd > 0:
                    rates[(kind, method)].append(tokens / elapsed)
                    step_ms[(kind, method)].append(1e3 * elapsed / max(rows // args.batch_size, 1))
                    if method == "ours":
                        flops += (4 * n_nonembed * (tokens + N_VIRTUAL * rows)
                                  + 4 * config.hidden_size * config.vocab_size * answers)
                        seconds += elapsed
    peak = 1e9 * matmul_gflops(DTYPES[decision.dtype], device, size=4096 if device.type == "cuda" else 1024,
                               seconds=1.0)
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    for kind in sets:
        ours, theirs = statistics.median(rates[(kind, "ours")]), statistics.median(rates[(kind, "peft")])
        print(f"RESULT gpu_tokens_per_s_{kind}_vs_peft ratio={ours / theirs:.3f} ours={ours:.1f} "
              f"theirs={theirs:.1f} unit=tokens/s")
    useful = flops / seconds
    print(f"RESULT gpu_{decision.dtype}_matmul_ceiling ratio={useful / peak:.3f} ours={useful / 1e9:.1f} "
          f"theirs={peak / 1e9:.1f} unit=GFLOP/s")
    if args.profile:
        for kind in sets:
            for method in ("peft", "ours"):
                profiled, kernels, busy = step_profile(runners[kind][method], device)
                wall = statistics.median(step_ms[(kind, method)])
                print(f"profile {kind:4s} {method:4s}: {kernels} kernels and {busy:.1f} ms of kernel time per step, "
                      f"against {wall:.1f} ms per step unprofiled ({busy / wall:.0%} busy; {profiled:.1f} ms profiled)")
    if args.deep_k:
        for kind, items in sets.items():
            t_full, t_warm, diff = deep_cached(lm, items, args.batch_size, args.deep_k, args.rounds)
            print(f"deep {kind}: blocks {config.num_hidden_layers - args.deep_k}..{config.num_hidden_layers - 1} of "
                  f"{config.num_hidden_layers}, step full {t_full * 1e3:.1f} ms, cached {t_warm * 1e3:.1f} ms; largest "
                  f"relative loss difference {diff:.2e}")
            print(f"RESULT gpu_deep_cached_step_k{args.deep_k}_{kind}_vs_full_forward ratio={t_full / t_warm:.2f} "
                  f"ours={t_warm:.4f} theirs={t_full:.4f} unit=s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
