"""Held-out evaluation: exact match and numeric error with CIs, answer-token loss, templates, cached baselines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core import evaluation as ev
from core.metrics import parse_exact_number, parse_number


def _math(question: str, answer: str) -> SimpleNamespace:
    return SimpleNamespace(prompt=f"Question: {question}\nAnswer:", target=" " + answer, answers=[answer], meta={})


ITEMS = [_math("What is 1 + 2?", "3"), _math("Calculate 5 - 7.", "-2"), _math("Evaluate 4 + 4.", "8"),
         _math("What is 10 - 1?", "9")]


def test_parse_number_takes_the_first_number_and_gold_must_be_all_number():
    assert parse_number("-4") == -4.0 and parse_number("The answer is 7.") == 7.0
    assert parse_number("3/4 of it") == 0.75 and parse_number(" .5") == 0.5
    assert parse_number("no idea") is None and parse_number("") is None
    assert parse_exact_number(" -12 ") == -12.0 and parse_exact_number("2*sqrt(3)") is None


def test_math_scores_exact_match_error_and_unparsed_with_cis():
    preds = ["3", "-1", "eight", "9", "12", "x"]
    answers = ["3", "-2", "8", "9", "2*sqrt(3)", "5"]
    out = ev.math_scores(preds, answers)
    assert out["n"] == 6 and out["accuracy"] == pytest.approx(2 / 6)
    # numeric gold: 3, -2, 8, 9, 5; "eight" and "x" have no number (misses, counted); the surd is left out
    assert out["n_unparsed"] == 2 and out["mae_n"] == 3 and out["mae"] == pytest.approx(1 / 3)
    low, high = out["accuracy_ci"]
    assert 0.0 <= low < out["accuracy"] < high <= 1.0
    assert out["mae_ci"][0] <= out["mae"] <= out["mae_ci"][1]
    one = ev.math_scores(["1"], ["2"])
    assert one["mae"] == 1.0 and one["mae_ci"] is None and one["accuracy_ci"] is None  # no CI from one item


def test_answer_loss_is_the_mean_cross_entropy_of_the_gold_answer_tokens(tiny_lm):
    # Independent reference: the full model on prompt + " answer\n", cross-entropy at the answer tokens only.
    tok, total, count = tiny_lm.tokenizer, 0.0, 0
    for ex in ITEMS:
        prompt = tok(ex.prompt, add_special_tokens=False).input_ids
        answer = tok(ex.target + "\n", add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = tiny_lm.model(ids).logits[0, len(prompt) - 1: -1]  # [n_answer, V]
        total += float(F.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum"))
        count += len(answer)
    got = ev.evaluate(tiny_lm, "math", ITEMS, max_new_tokens=2, compute="fp32", batch_size=3)
    assert got["answer_loss"] == pytest.approx(total / count, rel=1e-4)
    assert {"accuracy", "accuracy_ci", "mae", "mae_ci", "mae_n", "n_unparsed"} <= set(got)


def test_chat_template_renders_the_user_turn_and_opens_the_assistants(tiny_lm):
    plain = ev.render(tiny_lm, ITEMS[:1], "Be brief.")[0]
    assert plain.prompt == "Be brief.\nQuestion: What is 1 + 2?\nAnswer:" and plain.target == " 3"
    chat = ev.render(tiny_lm, ITEMS[:1], "Be brief.", template="chat")[0]
    assert "<|im_start|>user\nBe brief.\nQuestion: What is 1 + 2?\nAnswer:<|im_end|>" in chat.prompt
    assert chat.prompt.endswith("<|im_start|>assistant\n") and chat.target == "3"
    with pytest.raises(ValueError, match="template must be one of plain, chat; got 'chatml'"):
        ev.render(tiny_lm, ITEMS, template="chatml")
    no_template = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None), name="base-model")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template; base-model has none"):
        ev.render(no_template, ITEMS, template="chat")


def test_baselines_are_cached_per_template(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "cache_subdir", lambda name: tmp_path / name)
    first = ev.evaluate_with_baselines(tiny_lm, "math", ITEMS, None, compute="fp32", max_new_tokens=2)
    assert set(first) >= {"no_prompt", "text_prompt", "template", "text"} and first["template"] == "plain"
    assert "answer_loss" in first["no_prompt"] and first["no_prompt"]["n"] == 4
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(k.get("template")) or real(*a, **k))
    again = ev.evaluate_with_baselines(tiny_lm, "math", ITEMS, None, compute="fp32", max_new_tokens=2)
    assert calls == [] and again["no_prompt"] == first["no_prompt"]
    chat = ev.evaluate_with_baselines(tiny_lm, "math", ITEMS, None, compute="fp32", max_new_tokens=2,
                                      template="chat")
    assert calls == ["chat", "chat"] and chat["template"] == "chat"
    assert chat["no_prompt"]["answer_loss"] != first["no_prompt"]["answer_loss"]
    # "auto" where it resolves to fp32 is the same computation: served from the cache, not run again
    from core.compute import ComputeDecision

    monkeypatch.setattr("core.compute.decide", lambda lm, compute="auto": ComputeDecision(
        "fp32" if compute in ("auto", "fp32") else compute, compute, "cpu", "test: auto -> fp32"))
    auto = ev.evaluate_with_baselines(tiny_lm, "math", ITEMS, None, compute="auto", max_new_tokens=2)
    assert calls == ["chat", "chat"] and auto["no_prompt"] == first["no_prompt"]


def test_metrics_table_shows_the_cis_error_and_loss():
    from core.runs import metrics_table

    scores = ev.math_scores(["3", "-1", "8", "x"], ["3", "-2", "8", "9"]) | {"answer_loss": 1.5}
    rows = metrics_table({"eval": {"prompt": scores, "no_prompt": {"n": 4, "accuracy": 0.0}}})
    assert [r["condition"] for r in rows] == ["trained prompt", "no prompt"]
    assert rows[0]["accuracy"] == 0.5 and rows[0]["mae"] == pytest.approx(1 / 3) and rows[0]["n_unparsed"] == 1
    assert rows[0]["accuracy 95% CI"].startswith("[") and rows[0]["answer_loss"] == 1.5
    assert "mae" not in rows[1]  # a run evaluated before the error was stored shows what it has
