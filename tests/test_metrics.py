"""core.metrics: SQuAD v1.1 exact match / F1 and arithmetic accuracy."""

from __future__ import annotations

import pytest

from core.metrics import (
    extract_answer,
    math_accuracy,
    math_equal,
    normalize_answer,
    squad_em_f1,
    squad_scores,
)


def test_normalisation_follows_squad_v11():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    # Articles are removed only as whole words.
    assert normalize_answer("Theatre and Anthem") == "theatre and anthem"


def test_squad_examples():
    assert squad_em_f1("the Denver Broncos", ["Denver Broncos"]) == (1.0, 1.0)
    em, f1 = squad_em_f1("Denver", ["Denver Broncos"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)
    # SQuAD dev question 56be4db0acb8001400a502ec: three annotators, the best one counts.
    truths = ["Denver Broncos", "Denver Broncos", "Denver Broncos"]
    assert squad_em_f1("Denver Broncos.", truths) == (1.0, 1.0)
    em, f1 = squad_em_f1("Santa Clara", ["Levi's Stadium", "Santa Clara, California"])
    assert em == 0.0 and f1 == pytest.approx(0.8)
    assert squad_em_f1("Carolina Panthers", ["Denver Broncos"]) == (0.0, 0.0)
    assert squad_em_f1("Broncos", "Broncos") == (1.0, 1.0)


def test_squad_max_over_ground_truths():
    em, f1 = squad_em_f1("Broncos", ["Denver Broncos", "the Broncos"])
    assert em == 1.0 and f1 == 1.0


def test_squad_scores_mean():
    scores = squad_scores(["Denver Broncos", "Denver"], [["Denver Broncos"], ["Denver Broncos"]])
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["n"] == 2


def test_squad_errors():
    with pytest.raises(ValueError, match="at least one ground-truth"):
        squad_em_f1("x", [])
    with pytest.raises(ValueError, match="must pair up"):
        squad_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one prediction"):
        squad_scores([], [])


def test_math_numbers_compare_as_numbers():
    assert math_equal("0.50", "0.5")
    assert math_equal(" 3/4 ", "0.75")
    assert math_equal("-28/3", "-28/3")
    assert math_equal("1,000", "1000")
    assert math_equal("5.", "5")
    assert not math_equal("0.51", "0.5")
    assert not math_equal("4", "-4")
    assert math_equal("2 - 12*sqrt(13)", "2-12*sqrt(13)")
    assert not math_equal("12*sqrt(13)", "2 - 12*sqrt(13)")
    assert not math_equal("1/0", "1")  # division by zero is not a number, and not the same text


def test_math_accuracy():
    preds = ["0.50", "3/4", "-28/3", "2 - 12*sqrt(13)", "7"]
    targets = ["0.5", "0.75", "-28/3", "2-12*sqrt(13)", "8"]
    assert math_accuracy(preds, targets) == pytest.approx(0.8)


def test_math_accuracy_errors():
    with pytest.raises(ValueError, match="must pair up"):
        math_accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="at least one prediction"):
        math_accuracy([], [])
    with pytest.raises(ValueError, match="lists of strings"):
        math_accuracy("1", "1")


def test_extract_answer_takes_first_line():
    assert extract_answer(" 1421\nQuestion: What is 2 + 2?\nAnswer: 4") == "1421"
    assert extract_answer("\n  Denver Broncos  \nmore") == "Denver Broncos"
    assert extract_answer("") == ""
