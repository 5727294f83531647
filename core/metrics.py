"""Task metrics: SQuAD v1.1 exact match and F1, arithmetic exact-match accuracy.

`squad_em_f1` follows the official SQuAD v1.1 evaluation script: lowercase,
drop punctuation, drop the articles a/an/the, collapse whitespace; token F1;
both the maximum over the ground truths.

    >>> squad_em_f1("the Denver Broncos", ["Denver Broncos"])
    (1.0, 1.0)
    >>> math_accuracy(["0.50", "3/4"], ["0.5", "0.75"])
    1.0

`extract_answer` turns a generated continuation into the answer text (its
first line, stripped): the one place that decides what counts as the answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/[+-]?\d+)?$")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(truth).split()
    common = Counter(pred_tokens) & Counter(true_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(prediction: str, ground_truths: Sequence[str] | str) -> tuple[float, float]:
    """(exact match, F1), each in [0, 1], the maximum over `ground_truths`.

    Raises ValueError when there is no ground truth.
    """
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    if not ground_truths:
        raise ValueError("squad_em_f1 needs at least one ground-truth answer, got none")
    em = max(float(normalize_answer(prediction) == normalize_answer(t)) for t in ground_truths)
    f1 = max(_f1(prediction, t) for t in ground_truths)
    return em, f1


def squad_scores(predictions: Sequence[str], ground_truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over a set, in [0, 1]: {"exact_match", "f1", "n"}."""
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"{len(predictions)} predictions but {len(ground_truths)} ground-truth lists; they must pair up"
        )
    if not predictions:
        raise ValueError("squad_scores needs at least one prediction, got none")
    pairs = [squad_em_f1(p, t) for p, t in zip(predictions, ground_truths, strict=True)]
    return {
        "exact_match": sum(e for e, _ in pairs) / len(pairs),
        "f1": sum(f for _, f in pairs) / len(pairs),
        "n": len(pairs),
    }


def _as_number(text: str) -> Fraction | None:
    """'3', '-0.50', '3/4', '.5' -> an exact Fraction; anything else (e.g. '2*sqrt(3)') -> None."""
    text = text.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    if not _NUMBER.match(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(prediction: str, target: str) -> bool:
    """Exact match after stripping; numbers compare as numbers ("0.50" == "0.5" == "1/2")."""
    pred, true = prediction.strip(), target.strip()
    if pred == true:
        return True
    a, b = _as_number(pred.replace(" ", "")), _as_number(true.replace(" ", ""))
    if a is not None and b is not None:
        return a == b
    # Symbolic answers ("2 - 12*sqrt(13)") compare as text, ignoring spacing.
    return pred.replace(" ", "") == true.replace(" ", "")


def math_accuracy(preds: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target under `math_equal`, in [0, 1].

    Raises ValueError when the lists differ in length or are empty.
    """
    if isinstance(preds, str) or isinstance(targets, str):
        raise ValueError("math_accuracy takes lists of strings; wrap a single answer in a list")
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets; they must pair up")
    if not preds:
        raise ValueError("math_accuracy needs at least one prediction, got none")
    return sum(math_equal(p, t) for p, t in zip(preds, targets, strict=True)) / len(preds)


_NUMBER_IN_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")


def parse_number(text: str) -> float | None:
    """The first number written in `text` ("-4", "3.5", "3/4", "The answer is 7." -> 7.0), or None when there is none.

    For the mean absolute error of arithmetic answers: a generation that is not
    exactly the answer may still be close to it ("-5" for "-4"), and how close is
    what the error measures. Gold answers are parsed strictly (`parse_exact_number`).
    """
    match = _NUMBER_IN_TEXT.search(text)
    if match is None:
        return None
    try:
        return float(Fraction(match.group()))
    except (ValueError, ZeroDivisionError):
        return None


def parse_exact_number(text: str) -> float | None:
    """`text` as a number only when all of it is one ("-4", "0.5", "3/4"); None for "2*sqrt(3)" or words."""
    value = _as_number(text.strip().replace(" ", ""))
    return None if value is None else float(value)


def extract_answer(continuation: str) -> str:
    """The answer inside a generated continuation: its first non-empty line, stripped.

    The model continues "...\\nAnswer:" and may go on with "\\nQuestion: ..."; only the first line counts.
    """
    for line in continuation.splitlines():
        if line.strip():
            return line.strip()
    return ""
