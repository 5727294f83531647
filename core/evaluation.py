"""Task metrics by greedy generation, side by side with the no-prompt and text-prompt baselines.

    >>> evaluate_with_baselines(lm, "math", examples, prompt)  # {"prompt": .., "no_prompt": .., "text_prompt": ..}

Generation is batched with left padding and a KV cache, stops at a newline (the
trained prompts learn to end answers with one) or the end-of-text token, or
after `max_new_tokens`. QA is scored with SQuAD exact match and F1 over all
ground truths, arithmetic with exact-match accuracy (core.metrics).
Baselines do not depend on the trained prompt, so they are cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch

from core.paths import cache_subdir
from core.tuning.base import PromptModule
from core.tuning.compute import compute_model

TEXT_PROMPTS = {
    "math": "Answer the arithmetic question with just the number.",
    "squad": "Answer with a short span copied from the passage.",
}
N_SHOWN = 8  # predictions kept in run.json per condition, for the page


@torch.no_grad()
def generate(lm, texts: list[str], prompt: PromptModule | None = None, max_new_tokens: int = 12,
             batch_size: int = 8, compute: str = "auto", stop: str = "\n") -> list[str]:
    """Greedy continuations of `texts`, cut at the first `stop`; one string per text, in order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    from transformers import DynamicCache

    model, amp_dtype = compute_model(lm, compute)
    tok, decoder, device = lm.tokenizer, model.model, lm.device
    stop_ids = {i for i in (tok.eos_token_id,) if i is not None}
    encoded = [tok(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    out: list[str] = [""] * len(texts)
    n = prompt.n_prefix if prompt is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), n + width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1  # left padding; prompt columns set below
        ids, mask = ids.to(device), mask.to(device)
        embeds = decoder.embed_tokens(ids)  # [B, W, d]
        if prompt is not None:
            # the prompt sits right before each row's first real token, so positions start at 0 on it
            full = torch.zeros((len(idx), n + width, embeds.shape[-1]), dtype=embeds.dtype, device=device)
            prefix = prompt.prefix(len(idx), embeds.dtype)
            for row, i in enumerate(idx):
                pad = width - len(encoded[i])
                full[row, pad: pad + n] = prefix[row]
                full[row, pad + n:] = embeds[row, pad:]
                mask[row, pad: pad + n] = 1
            embeds = full
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        hooks = prompt.hooks(model) if prompt is not None else contextlib.nullcontext()
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        tokens: list[list[int]] = [[] for _ in idx]
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        with hooks, amp:
            step_embeds, step_pos = embeds, positions
            for _ in range(max_new_tokens):
                hidden = decoder(inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_pos,
                                 past_key_values=cache, use_cache=True).last_hidden_state
                nxt = model.lm_head(hidden[:, -1]).argmax(-1)  # [B]
                for row, t in enumerate(nxt.tolist()):
                    if not done[row]:
                        tokens[row].append(t)
                finished = torch.tensor([t in stop_ids or stop in tok.decode(tokens[r][-1:])
                                         for r, t in enumerate(nxt.tolist())], device=device)
                done |= finished
                if bool(done.all()):
                    break
                step_embeds = decoder.embed_tokens(nxt[:, None])  # [B, 1, d]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step_pos = step_pos[:, -1:] + 1
        for row, i in enumerate(idx):
            text = tok.decode([t for t in tokens[row] if t not in stop_ids], skip_special_tokens=True)
            out[i] = text.split(stop)[0].strip()
    return out


def score(dataset: str, predictions: list[str], examples: list) -> dict:
    """{"n", "accuracy"} for math, {"n", "exact_match", "f1"} for squad (fractions in [0, 1])."""
    from core.metrics import math_accuracy, squad_em_f1

    if dataset == "math":
        return {"n": len(examples), "accuracy": float(math_accuracy(predictions, [ex.answers[0] for ex in examples]))}
    if dataset == "squad":
        pairs = [squad_em_f1(p, ex.answers) for p, ex in zip(predictions, examples, strict=True)]
        return {"n": len(examples), "exact_match": sum(e for e, _ in pairs) / max(len(pairs), 1),
                "f1": sum(f for _, f in pairs) / max(len(pairs), 1)}
    raise ValueError(f"no task metric for dataset {dataset!r}: evaluate 'math' or 'squad'")


def evaluate(lm, dataset: str, examples: list, prompt: PromptModule | None = None, text_prompt: str | None = None,
             max_new_tokens: int = 12, compute: str = "auto", batch_size: int = 8) -> dict:
    """Greedy-generate answers for `examples` and score them; `text_prompt` is prepended as a line of text."""
    texts = [(text_prompt + "\n" if text_prompt else "") + ex.prompt for ex in examples]
    preds = generate(lm, texts, prompt, max_new_tokens=max_new_tokens, batch_size=batch_size, compute=compute)
    result = score(dataset, preds, examples)
    result["shown"] = [{"prompt_tail": ex.prompt[-80:], "prediction": p, "answer": ex.answers[0]}
                       for ex, p in zip(examples[:N_SHOWN], preds[:N_SHOWN], strict=True)]
    return result


def _baseline_key(lm, dataset: str, examples: list, kind: str, max_new_tokens: int, compute: str) -> str:
    digest = hashlib.sha256(json.dumps([[ex.prompt, list(ex.answers)] for ex in examples]).encode()).hexdigest()
    return json.dumps([lm.fingerprint, str(lm.device), compute, dataset, kind, TEXT_PROMPTS.get(dataset),
                       max_new_tokens, digest])


def evaluate_with_baselines(lm, dataset: str, examples: list, prompt: PromptModule | None, compute: str = "auto",
                            max_new_tokens: int = 12, source: str = "auto", max_length: int = 320) -> dict:
    """{"prompt": .., "no_prompt": .., "text_prompt": .., "text": TEXT_PROMPTS[dataset]} on the same examples."""
    import diskcache

    if dataset == "squad":
        from core.data import fit_to_length

        examples = [fit_to_length(ex, lm.tokenizer, max_length) if hasattr(ex, "meta") and "context" in ex.meta
                    else ex for ex in examples]
    out: dict = {"text": TEXT_PROMPTS[dataset], "source": source}
    with diskcache.Cache(str(cache_subdir("baselines"))) as cache:
        for kind, text in (("no_prompt", None), ("text_prompt", TEXT_PROMPTS[dataset])):
            key = _baseline_key(lm, dataset, examples, kind, max_new_tokens, compute)
            if key not in cache:
                cache[key] = evaluate(lm, dataset, examples, None, text, max_new_tokens, compute)
            out[kind] = cache[key]
    if prompt is not None:
        out["prompt"] = evaluate(lm, dataset, examples, prompt, None, max_new_tokens, compute)
    return out
