"""The `Example` record, the prompt templates (the one place they live), splits and truncation.

Templates follow the paper:

    QA:          "{context}\\nQuestion: {question}\\nAnswer:"   target " {answer}"
    arithmetic:  "Question: {question}\\nAnswer:"              target " {answer}"

The target starts with a space because the model continues the prompt.
A QA follow-up question (QuAC turns 2 and 3) carries the earlier turns of its
dialogue between the context and the current question, each as
"Question: ...\\nAnswer: ..." lines, so that "did they have any children?" is
answerable.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

DATASETS = ("squad", "math", "c4")
SPLITS = ("train", "validation")

# {history} is empty for a first question, which gives the paper's template exactly.
QA_TEMPLATE = "{context}\n{history}Question: {question}\nAnswer:"
MATH_TEMPLATE = "Question: {question}\nAnswer:"
TURN_TEMPLATE = "Question: {question}\nAnswer: {answer}\n"
# How an earlier turn without an answer (QuAC's CANNOTANSWER) reads in the history.
NO_ANSWER_TEXT = "unknown"


@dataclass(frozen=True)
class Example:
    """One dataset item as the model reads it.

    prompt:  text the model is given (for c4, the whole document)
    target:  text it should continue with (" answer"; "" for c4)
    answers: every ground truth (for metrics); answers[0] is the one in `target`
    dataset: "squad" | "math" | "c4";  source: "auto" | "hub" | a file path
    meta:    dataset-specific fields (QA: context, question, history, answer_start,
             turn, passage_id; math: module, question; c4: title, ...)
    """

    prompt: str
    target: str
    answers: list[str]
    dataset: str
    source: str = "auto"
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Prompt followed by target: what a forward pass for activations reads."""
        return self.prompt + self.target


def render_qa_prompt(context: str, question: str, history: list[tuple[str, str]] | tuple = ()) -> str:
    """The QA prompt: context, earlier turns (question, answer) oldest first, then the question."""
    turns = "".join(TURN_TEMPLATE.format(question=q, answer=a or NO_ANSWER_TEXT) for q, a in history)
    return QA_TEMPLATE.format(context=context, history=turns, question=question)


def render_math_prompt(question: str) -> str:
    return MATH_TEMPLATE.format(question=question)


def render_target(answer: str) -> str:
    return " " + answer


def qa_example(
    context: str,
    question: str,
    answers: list[str],
    *,
    history: list[tuple[str, str]] | tuple = (),
    answer_start: int = -1,
    source: str = "auto",
    **meta: object,
) -> Example:
    """Build a QA example; `answers[0]` becomes the target. meta keeps the parts for truncation."""
    return Example(
        prompt=render_qa_prompt(context, question, history),
        target=render_target(answers[0]),
        answers=list(answers),
        dataset="squad",
        source=source,
        meta={
            "context": context,
            "question": question,
            "history": [list(t) for t in history],
            "answer_start": answer_start,
            **meta,
        },
    )


def in_validation(key: str, fraction: float) -> bool:
    """Stable split by content hash: the same key is in the same split in every process."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return bucket < fraction


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _n_tokens(tokenizer, text: str) -> int:  # noqa: ANN001 - any HF tokenizer
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_to_length(example: Example, tokenizer, max_tokens: int) -> Example:  # noqa: ANN001
    """Shorten an example so that `tokenizer(prompt + target)` (special tokens included) fits `max_tokens`.

    QA: cuts the context only, keeping a window of it around the answer span, so
    the question, the target and (when it fits) the answer inside the context
    survive; if the context is gone and it still does not fit, the oldest earlier
    turns are dropped. c4: keeps the first `max_tokens` tokens of the document.
    Arithmetic problems cannot be cut. Returns the example unchanged when it fits;
    a cut example has `meta["truncated"] = True`.

    Raises ValueError when question and answer alone exceed the budget.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    total = _n_tokens(tokenizer, example.text)
    if total <= max_tokens:
        return example
    if example.dataset == "c4":
        enc = tokenizer(example.prompt, add_special_tokens=True, return_offsets_mapping=True)
        n_special = len(enc["input_ids"]) - len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
        offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
        keep = max_tokens - n_special
        end = offsets[keep - 1][1] if keep >= 1 else 0
        return dataclasses.replace(example, prompt=example.prompt[:end], meta={**example.meta, "truncated": True})
    if example.dataset != "squad":
        raise ValueError(
            f"a {example.dataset} example of {total} tokens does not fit max_tokens={max_tokens} and has no "
            "context to cut; raise max_tokens"
        )
    return _fit_qa(example, tokenizer, max_tokens)


_REBUILT = ("context", "question", "history", "answer_start", "truncated")  # meta keys _fit_qa sets itself


def _fit_qa(example: Example, tokenizer, max_tokens: int) -> Example:  # noqa: ANN001
    meta = example.meta
    context, question = meta["context"], meta["question"]
    history = [tuple(t) for t in meta.get("history", [])]
    answer = example.answers[0]

    def build(ctx: str, hist: list, start: int) -> Example:
        return qa_example(
            ctx, question, example.answers, history=hist, answer_start=start, source=example.source,
            **{k: v for k, v in meta.items() if k not in _REBUILT},
            truncated=True,
        )

    # Drop the oldest earlier turns only when even an empty context does not fit.
    while _n_tokens(tokenizer, build("", history, -1).text) > max_tokens:
        if not history:
            need = _n_tokens(tokenizer, build("", [], -1).text)
            raise ValueError(
                f"question and answer alone need {need} tokens, more than max_tokens={max_tokens}; "
                "raise max_tokens (the context is the only part that is cut)"
            )
        history = history[1:]

    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    start_char = meta.get("answer_start", -1)
    if start_char is None or start_char < 0:
        start_char = context.find(answer)
    # Token span of the answer inside the context (or the beginning if it is not there).
    if start_char >= 0:
        a_first = next((i for i, (s, e) in enumerate(offsets) if e > start_char), 0)
        end_char = start_char + len(answer)
        a_last = next((i for i, (s, e) in enumerate(offsets) if e >= end_char), len(offsets) - 1)
    else:
        a_first = a_last = 0
    base = _n_tokens(tokenizer, build("", history, -1).text)
    budget = max(0, max_tokens - base)
    while True:
        lo, hi = _window(len(offsets), a_first, a_last, budget)
        ctx_start = offsets[lo][0] if hi > lo else 0
        ctx_end = offsets[hi - 1][1] if hi > lo else 0
        ctx = context[ctx_start:ctx_end]
        new_start = start_char - ctx_start if 0 <= start_char and ctx_start <= start_char < ctx_end else -1
        candidate = build(ctx, history, new_start)
        over = _n_tokens(tokenizer, candidate.text) - max_tokens
        if over <= 0:
            return candidate
        # Token counts are not exactly additive across the boundaries; shrink and retry.
        budget -= over


def _window(n: int, first: int, last: int, budget: int) -> tuple[int, int]:
    """[lo, hi) token window of size <= budget containing [first, last] when it fits, centred on it."""
    if budget <= 0 or n == 0:
        return 0, 0
    if budget >= n:
        return 0, n
    span = last - first + 1
    if span >= budget:
        return first, first + budget
    lo = first - (budget - span) // 2
    lo = max(0, min(lo, n - budget))
    return lo, lo + budget
