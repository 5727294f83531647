"""The three data roles of Prior Lab: web text ("c4"), question answering ("squad"), arithmetic ("math").

    >>> from core.data import load_examples
    >>> ex = load_examples("squad", n=3)[0]
    >>> ex.prompt.endswith("\\nAnswer:"), ex.target.startswith(" "), ex.answers[0] in ex.prompt
    (True, True, True)

Sources: "auto" is the embedded offline stand-in (QuAC rows in SQuAD form, news
articles, DeepMind's arithmetic generator); "hub" loads rajpurkar/squad,
allenai/c4 (en, streaming) or deepmind/math_dataset through `datasets`; a path
loads a local file (SQuAD: the official JSON or Hugging Face rows; c4: JSON
lines with "text"; math: JSON lines with "question" and "answer").

A local SQuAD file is one split, used whole for the split asked for: the
official dev file is the validation set (`load_examples("squad", "validation",
source="dev-v1.1.json")` gives all its answerable questions). To divide one
file into train and validation by passage, pass `source="split:FILE"`. Local
c4 and math files have no official split and are always divided by a hash of
the document or question ("split:" changes nothing for them).

Asking for more examples than a split holds returns all of them, with a
`UserWarning` that says how many there are.
`load_report(dataset)` gives counts, dropped answers and answer lengths.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Sequence

from core.assets import ensure_asset
from core.data import arith, qa, web
from core.data.example import (
    DATASETS,
    MATH_TEMPLATE,
    QA_TEMPLATE,
    SPLITS,
    Example,
    check_split,
    fit_to_length,
    render_math_prompt,
    render_qa_prompt,
)
from core.data.sources import HubUnavailableError, resolve_source, split_file
from core.mathgen import ARITHMETIC_MODULES, DIFFICULTIES

__all__ = [
    "ARITHMETIC_MODULES", "DATASETS", "DIFFICULTIES", "MATH_TEMPLATE", "QA_TEMPLATE", "SPLITS", "Example",
    "HubUnavailableError", "dataset_label", "dataset_task", "example_texts", "fit_to_length", "load_examples",
    "load_report", "math_task",
    "render_math_prompt", "render_qa_prompt",
]


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _check_n(n: int | None) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive integer or None (all), got {n!r}")


def _select(examples: list[Example], n: int | None, seed: int, what: str) -> list[Example]:
    """`n` examples (all when None, or all with a warning when fewer than `n` exist) in an order drawn with `seed`."""
    if n is not None and n > len(examples):
        warnings.warn(f"asked for n={n} {what} examples but only {len(examples)} exist; returning all "
                      f"{len(examples)}", UserWarning, stacklevel=3)
        n = len(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[: len(examples) if n is None else n]]


def _stamp(path: str) -> tuple[int, int]:
    """Modification time and size: a changed file is read again, not served from the in-process cache."""
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def load_examples(
    dataset: str,
    split: str = "validation",
    n: int | None = None,
    seed: int = 0,
    source: str | os.PathLike = "auto",
    *,
    modules: Sequence[str] | str | None = None,
    difficulty: str = "easy",
) -> list[Example]:
    """`n` examples of `dataset` ("squad" | "math" | "c4") from `split` ("train" | "validation").

    Deterministic for a seed; another seed gives another selection and order.
    `n=None` returns the whole split (not for generated or streamed data, which
    need an `n`). For "math", `modules` picks arithmetic modules: default
    `arithmetic__add_sub_multiple` alone (small integer answers, a task the
    model can learn; `math_task()` names it), "all" for the nine mixed, or a
    list ("mul", "arithmetic__div", ...); `difficulty` is the generator's
    entropy band ("easy", the default and easiest | "medium" | "hard"). Each
    example records its module and difficulty in `meta`. Raises ValueError for an unknown dataset, split, source or
    module; HubUnavailableError when
    source="hub" and the hub cannot be reached.
    """
    _check_dataset(dataset)
    check_split(split)
    _check_n(n)
    src = resolve_source(source)
    if dataset != "math" and modules is not None:
        raise ValueError(f"modules= selects arithmetic modules and applies to dataset 'math' only, not {dataset!r}")
    what = f"{dataset} {split} ({dataset_label(dataset, src)})"
    if dataset == "squad":
        if src == "hub":
            return _select(qa.load_squad_hub(split)[0], n, seed, what)
        return _select(_squad_load(src).by_split[split], n, seed, what)
    src = split_file(src)[0] if src not in ("auto", "hub") else src  # c4 and math files are always divided
    if dataset == "c4":
        if src == "hub":
            if n is None:
                raise ValueError("C4 from the hub is streamed: pass n, the number of documents to take")
            return web.load_c4_hub(split, n, seed)
        by_split = web.load_news(str(ensure_asset("news")))[0] if src == "auto" else web.load_text_file(
            src, _stamp(src))[0]
        return _select(by_split[split], n, seed, what)
    # math
    if src == "auto":
        if n is None:
            raise ValueError("math problems are generated: pass n, the number of problems (e.g. n=1000)")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
        return arith.generated_examples(n, split, seed, modules, difficulty)
    if src == "hub":
        return _select(arith.hub_examples(split, modules), n, seed, what)
    by_split = arith.file_examples(src, _stamp(src))
    return _select(by_split[split], n, seed, what)


def example_texts(
    dataset: str,
    n: int,
    seed: int = 0,
    source: str | os.PathLike = "auto",
    split: str = "validation",
    *,
    tokenizer=None,  # noqa: ANN001 - any Hugging Face tokenizer
    max_tokens: int | None = None,
) -> list[str]:
    """What the model reads for activations: prompt followed by target (plain text for c4).

    With `tokenizer` and `max_tokens`, each example is first shortened by
    `fit_to_length` (QA: the passage is cut around the answer, so question and
    answer stay in the text; c4: the document's beginning), instead of leaving a
    later right-truncation to drop the question and answer of a long passage.
    """
    examples = load_examples(dataset, split=split, n=n, seed=seed, source=source)
    if (tokenizer is None) != (max_tokens is None):
        raise ValueError("pass both tokenizer and max_tokens to fit texts to a length, or neither")
    if tokenizer is not None:
        examples = [fit_to_length(ex, tokenizer, max_tokens) for ex in examples]
    return [ex.text for ex in examples]


def _squad_load(src: str) -> qa.QALoad:
    if src == "auto":
        return qa.load_quac(str(ensure_asset("quac")))
    path, divide = split_file(src)
    return qa.load_squad_file(path, _stamp(path), divide)


def math_task(modules: Sequence[str] | str | None = None, difficulty: str = "easy") -> str:
    """The MATH task's short name, e.g. "add_sub_multiple@easy" (the default) or "all@easy"."""
    return arith.task_name(modules, difficulty)


def dataset_task(dataset: str, source: str | os.PathLike = "auto") -> str:
    """What `load_examples(dataset, source=source)` serves by default, for cache keys and labels: the dataset name,
    and for generated or hub MATH the default task ("math:add_sub_multiple@easy"), so results computed on
    another task (the nine modules mixed, before it changed) are never served for this one."""
    _check_dataset(dataset)
    if dataset == "math" and resolve_source(source) in ("auto", "hub"):
        return f"math:{math_task()}"
    return dataset


def dataset_label(dataset: str, source: str | os.PathLike = "auto") -> str:
    """An honest label of where the data comes from, for the UI."""
    _check_dataset(dataset)
    src = resolve_source(source)
    if src not in ("auto", "hub"):
        path, divide = split_file(src)
        kind = {"squad": "SQuAD-format file", "c4": "web text file", "math": "arithmetic file"}[dataset]
        how = ", split by passage" if dataset == "squad" and divide else (
            ", used whole for the split asked for" if dataset == "squad" else "")
        return f"{kind}: {os.path.basename(path)}{how}"
    labels = {
        ("squad", "auto"): qa.QUAC_LABEL,
        ("squad", "hub"): f"SQuAD v1.1 ({qa.HUB_NAME}, Hugging Face hub)",
        ("c4", "auto"): web.NEWS_LABEL,
        ("c4", "hub"): f"C4 ({web.HUB_NAME}, en, Hugging Face hub)",
        ("math", "auto"): f"{arith.GENERATOR_LABEL}; task {math_task()}",
        ("math", "hub"): f"DeepMind MATH ({arith.HUB_NAME}, Hugging Face hub); task {math_task()}",
    }
    return labels[dataset, src]


def load_report(dataset: str, source: str | os.PathLike = "auto") -> dict:
    """Counts per split, what was dropped and why, answer lengths (JSON-serialisable).

    For "squad"/"auto": questions, kept, dropped_cannotanswer, dropped_not_span,
    follow_ups_with_history, examples per split, passages per split,
    median_answer_words. Hub sources are not counted (that would download them).
    """
    _check_dataset(dataset)
    src = resolve_source(source)
    if src == "hub":
        return {"dataset": dataset, "source": "hub", "label": dataset_label(dataset, "hub"),
                "notes": "counts of hub datasets are not computed here (it would download them)"}
    if dataset == "squad":
        return dict(_squad_load(src).report)
    src = split_file(src)[0] if src != "auto" else src
    if dataset == "c4":
        return dict(web.load_news(str(ensure_asset("news")))[1] if src == "auto" else web.load_text_file(
            src, _stamp(src))[1])
    if src == "auto":
        return arith.generator_report()
    return arith.file_report(src, arith.file_examples(src, _stamp(src)))
