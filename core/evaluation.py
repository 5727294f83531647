"""Task metrics by greedy generation and answer-token loss, beside the no-prompt and text-prompt baselines.

    >>> evaluate_with_baselines(lm, "math", examples, prompt)  # {"prompt": .., "no_prompt": .., "text_prompt": ..}

Generation is batched with left padding and a KV cache, stops at a newline (the
trained prompts learn to end answers with one) or the end-of-text token, or
after `max_new_tokens`. QA is scored with SQuAD exact match and F1 over all
ground truths; arithmetic with exact-match accuracy and the mean absolute error
of the first number in each generation (a generation with no number counts as a
miss and is counted in `n_unparsed`), each with a 95% bootstrap CI over items
(scipy.stats.bootstrap). Every condition also gets `answer_loss`: the mean
cross-entropy of the gold answer tokens, the loss training minimises
(core.tuning.loss.answer_loss).

`template` formats each item: "plain" (the paper's "Question: ..\nAnswer:"; the
text prompt, if any, is a line before it) or "chat" (the same text as the user
turn of the tokenizer's chat template, answered in the assistant turn). Plain is
the default, as in training: SmolLM2-135M-Instruct does worse with its chat
template on both baselines (bench/chat_template.py has the numbers).
Baselines do not depend on the trained prompt, so they are cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import torch

from core.paths import cache_subdir
from core.tuning.base import PromptModule
from core.tuning.compute import compute_model

TEXT_PROMPTS = {
    "math": "Answer the arithmetic question with just the number.",
    "squad": "Answer with a short span copied from the passage.",
}
N_SHOWN = 8  # predictions kept in run.json per condition, for the page
# Held-out items per evaluation: 200 binary outcomes give a 95% CI of about +-7 points on exact match,
# narrow enough to tell a trained prompt from the no-prompt baseline (24 gave about +-20).
DEFAULT_EVAL_N = 200
TEMPLATES = ("plain", "chat")
EVAL_FORMAT = 2  # bump when what a stored result holds changes, so cached baselines of the old form are not reused


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


def _ci(samples: np.ndarray, statistic=np.mean) -> list | None:  # noqa: ANN001 - a callable
    """95% bootstrap CI over items as [low, high], None with fewer than 2 items (JSON-safe: no NaN)."""
    from core.analysis.claims import bootstrap_ci

    low, high = bootstrap_ci((np.asarray(samples, dtype=np.float64),), statistic)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def math_scores(predictions: list[str], answers: list[str]) -> dict:
    """Exact match ("accuracy") and mean absolute numeric error ("mae"), each with a 95% bootstrap CI over items.

    The error compares the first number in a prediction (core.metrics.parse_number) with a gold answer that is a
    number; a prediction with no number is a miss counted in `n_unparsed`, and items whose gold answer is not a
    number (surds, polynomials) are left out of the error (`mae_n` items remain).
    """
    from core.metrics import math_equal, parse_exact_number, parse_number

    correct = np.array([math_equal(p, a) for p, a in zip(predictions, answers, strict=True)], dtype=np.float64)
    errors, unparsed = [], 0
    for pred, answer in zip(predictions, answers, strict=True):
        gold = parse_exact_number(answer)
        if gold is None:
            continue
        value = parse_number(pred)
        if value is None:
            unparsed += 1
        else:
            errors.append(abs(value - gold))
    errs = np.array(errors, dtype=np.float64)
    return {"n": len(answers), "accuracy": float(correct.mean()) if len(correct) else math.nan,
            "accuracy_ci": _ci(correct), "mae": float(errs.mean()) if len(errs) else None,
            "mae_ci": _ci(errs), "mae_n": int(len(errs)), "n_unparsed": unparsed}


def score(dataset: str, predictions: list[str], examples: list) -> dict:
    """Math: `math_scores` ({"n", "accuracy", "accuracy_ci", "mae", "mae_ci", "mae_n", "n_unparsed"});
    squad: {"n", "exact_match", "f1"} (fractions in [0, 1])."""
    from core.metrics import squad_em_f1

    if dataset == "math":
        return math_scores(predictions, [ex.answers[0] for ex in examples])
    if dataset == "squad":
        pairs = [squad_em_f1(p, ex.answers) for p, ex in zip(predictions, examples, strict=True)]
        return {"n": len(examples), "exact_match": sum(e for e, _ in pairs) / max(len(pairs), 1),
                "f1": sum(f for _, f in pairs) / max(len(pairs), 1)}
    raise ValueError(f"no task metric for dataset {dataset!r}: evaluate 'math' or 'squad'")


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")


def render(lm, examples: list, text_prompt: str | None = None, template: str = "plain") -> list:  # noqa: ANN001
    """What the model reads for each example: objects with `.prompt` and `.target` (for `generate` and the loss).

    plain: "{text_prompt}\n{prompt}" and the example's target (" answer").
    chat:  the same text as the user turn of the tokenizer's chat template, the assistant turn opened; the target
           loses its leading space, since the assistant's answer starts a line.
    """
    _check_template(template)
    tok = lm.tokenizer
    if template == "chat" and not getattr(tok, "chat_template", None):
        raise ValueError(f"template 'chat' needs a tokenizer with a chat template; {lm.name} has none: use 'plain'")
    out = []
    for ex in examples:
        text = (text_prompt + "\n" if text_prompt else "") + ex.prompt
        if template == "chat":
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            out.append(SimpleNamespace(prompt=text, target=ex.target.lstrip(" ")))
        else:
            out.append(SimpleNamespace(prompt=text, target=ex.target))
    return out


def answer_token_loss(lm, rendered: list, prompt: PromptModule | None = None, compute: str = "auto",  # noqa: ANN001
                      max_length: int = 320, batch_size: int = 8) -> float:
    """Mean cross-entropy per gold answer token (answer + the newline that ends it) over `rendered` items, as
    training's validation loss computes it (core.analysis.transfer.prompt_loss: core.tuning.loss.answer_loss)."""
    from core.analysis.transfer import prompt_loss

    return prompt_loss(lm, prompt, rendered, batch_size=batch_size, compute=compute, max_length=max_length)


def evaluate(lm, dataset: str, examples: list, prompt: PromptModule | None = None, text_prompt: str | None = None,
             max_new_tokens: int = 12, compute: str = "auto", batch_size: int = 8, template: str = "plain",
             max_length: int = 320, loss: bool = True) -> dict:
    """Greedy-generate answers for `examples` and score them, with the answer-token loss unless `loss=False`.
    `text_prompt` is prepended as a line of text; `template` as in `render`."""
    rendered = render(lm, examples, text_prompt, template)
    preds = generate(lm, [r.prompt for r in rendered], prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     compute=compute)
    result = score(dataset, preds, examples)
    if loss and all(r.target for r in rendered):
        result["answer_loss"] = answer_token_loss(lm, rendered, prompt, compute, max_length, batch_size)
    result["shown"] = [{"prompt_tail": ex.prompt[-80:], "prediction": p, "answer": ex.answers[0]}
                       for ex, p in zip(examples[:N_SHOWN], preds[:N_SHOWN], strict=True)]
    return result


def _baseline_key(lm, dataset: str, examples: list, kind: str, max_new_tokens: int, compute: str,  # noqa: ANN001
                  template: str, max_length: int) -> str:
    from core.compute import decide

    digest = hashlib.sha256(json.dumps([[ex.prompt, ex.target, list(ex.answers)] for ex in examples]).encode())
    # the resolved dtype, not the name asked for: "auto" that resolved to fp32 computes what "fp32" does
    dtype = decide(lm, compute).dtype
    return json.dumps([EVAL_FORMAT, lm.fingerprint, str(lm.device), dtype, dataset, kind, TEXT_PROMPTS.get(dataset),
                       max_new_tokens, template, max_length, digest.hexdigest()])


def evaluate_with_baselines(lm, dataset: str, examples: list, prompt: PromptModule | None, compute: str = "auto",  # noqa: ANN001
                            max_new_tokens: int = 12, source: str = "auto", max_length: int = 320,
                            template: str = "plain") -> dict:
    """{"prompt": .., "no_prompt": .., "text_prompt": .., "text": TEXT_PROMPTS[dataset], "template": ..} on the
    same examples; each condition as `evaluate` returns it (metrics with CIs, answer_loss, a few predictions)."""
    import diskcache

    _check_template(template)
    if dataset == "squad":
        from core.data import fit_to_length

        examples = [fit_to_length(ex, lm.tokenizer, max_length) if hasattr(ex, "meta") and "context" in ex.meta
                    else ex for ex in examples]
    out: dict = {"text": TEXT_PROMPTS[dataset], "source": source, "template": template}
    with diskcache.Cache(str(cache_subdir("baselines"))) as cache:
        for kind, text in (("no_prompt", None), ("text_prompt", TEXT_PROMPTS[dataset])):
            key = _baseline_key(lm, dataset, examples, kind, max_new_tokens, compute, template, max_length)
            if key not in cache:
                cache[key] = evaluate(lm, dataset, examples, None, text, max_new_tokens, compute, template=template,
                                      max_length=max_length)
            out[kind] = cache[key]
    if prompt is not None:
        out["prompt"] = evaluate(lm, dataset, examples, prompt, None, max_new_tokens, compute, template=template,
                                 max_length=max_length)
    return out
