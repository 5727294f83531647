"""core.data and core.mathgen: the three datasets, their sources, splits, templates and truncation."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from core import mathgen
from core.data import (
    ARITHMETIC_MODULES,
    Example,
    HubUnavailableError,
    dataset_label,
    example_texts,
    fit_to_length,
    load_examples,
    load_report,
    render_qa_prompt,
)
from core.data.qa import longest_span_prefix, segment_answers

# --- QA: the embedded QuAC rows -----------------------------------------------------------------


def test_squad_validation_has_1000_answerable_examples():
    examples = load_examples("squad", n=1000)
    assert len(examples) == 1000
    for ex in examples:
        assert ex.dataset == "squad"
        assert ex.answers[0] in ex.meta["context"] and ex.answers[0] in ex.prompt
        assert ex.prompt.endswith(f"Question: {ex.meta['question']}\nAnswer:")
        assert ex.target == " " + ex.answers[0]
        assert ex.meta["context"][ex.meta["answer_start"]:].startswith(ex.answers[0])
        assert "CANNOTANSWER" not in ex.answers


def test_first_question_uses_the_paper_template_exactly():
    ex = next(e for e in load_examples("squad", n=200) if e.meta["turn"] == 1)
    assert ex.prompt == f"{ex.meta['context']}\nQuestion: {ex.meta['question']}\nAnswer:"


def test_follow_ups_carry_earlier_turns():
    examples = load_examples("squad", split="train")
    follow = [e for e in examples if e.meta["turn"] == 3 and len(e.meta["history"]) == 2]
    assert follow, "some third questions keep both earlier turns"
    ex = follow[0]
    (q1, a1), (q2, _) = ex.meta["history"]
    body = ex.prompt[len(ex.meta["context"]):]
    assert body.index(f"Question: {q1}\nAnswer: ") < body.index(f"Question: {q2}") < body.index(ex.meta["question"])
    if a1:
        assert f"Answer: {a1}\n" in body


def test_squad_splits_share_no_passage_and_validation_is_at_least_half():
    train = load_examples("squad", split="train")
    val = load_examples("squad", split="validation")
    assert not {e.meta["context"] for e in train} & {e.meta["context"] for e in val}
    report = load_report("squad")
    assert report["examples"] == {"train": len(train), "validation": len(val)}
    assert report["passages"]["validation"] >= report["passages"]["train"]


def test_quac_report_accounts_for_every_question():
    report = load_report("squad")
    assert report["questions"] == 3000
    assert report["kept"] + report["dropped_cannotanswer"] + report["dropped_not_span"] == 3000
    assert report["dropped_cannotanswer"] == 451  # measured on the shipped file (DESIGN.md)
    assert 10 <= report["median_answer_words"] <= 20  # QuAC answers are long
    assert report["label"] == "QuAC, SQuAD format: offline stand-in for SQuAD"
    json.dumps(report)  # the home page shows it


def test_answer_recovery_from_run_together_spans():
    passage = "In May 1983, she married Nikos Karvelas, a composer, with whom she worked."
    block = "In May 1983, she married Nikos Karvelas, In May 1983, she married Nikos Karvelas, a composer,"
    assert longest_span_prefix(block, passage) == "In May 1983, she married Nikos Karvelas,"
    assert segment_answers(block, passage) == [
        "In May 1983, she married Nikos Karvelas,", "In May 1983, she married Nikos Karvelas, a composer,"]
    # Greedy would swallow the next answer's first word ("... Album a"); the tail goes back.
    passage2 = "Rufus Wainwright won a GLAAD Media Award for Outstanding Music Album a year later."
    block2 = "Rufus Wainwright won a GLAAD Media Award for Outstanding Music Album a GLAAD Media Award"
    assert segment_answers(block2, passage2) == [
        "Rufus Wainwright won a GLAAD Media Award for Outstanding Music Album", "a GLAAD Media Award"]
    assert longest_span_prefix("nothing here", passage) == ""


def test_selection_is_seeded():
    a = load_examples("squad", n=50, seed=0)
    assert a == load_examples("squad", n=50, seed=0)
    b = load_examples("squad", n=50, seed=1)
    assert [e.prompt for e in a] != [e.prompt for e in b]


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_dataset_split_source_and_n():
    with pytest.raises(ValueError, match="unknown dataset 'imdb'; choose one of squad, math, c4"):
        load_examples("imdb")
    with pytest.raises(ValueError, match="unknown split 'test'; choose one of train, validation"):
        load_examples("squad", split="test")
    with pytest.raises(ValueError, match="source must be 'auto'.*'hub'.*'nowhere.json' is none of these"):
        load_examples("squad", source="nowhere.json")
    with pytest.warns(UserWarning, match=r"asked for n=100000 squad validation .* only \d+ exist; returning all"):
        load_examples("squad", n=100_000)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        load_examples("squad", n=0)
    with pytest.raises(ValueError, match="applies to dataset 'math' only"):
        load_examples("squad", n=5, modules=["mul"])
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_label("imdb")


@pytest.mark.parametrize(
    ("dataset", "name"), [("squad", "rajpurkar/squad"), ("c4", "allenai/c4"), ("math", "deepmind/math_dataset")]
)
def test_hub_offline_says_so_and_names_the_stand_in(monkeypatch, dataset, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=f"hub is not reachable.*{name}.*source=\"auto\""):
        load_examples(dataset, n=5, source="hub", modules=["add_or_sub"] if dataset == "math" else None)


def test_hub_unreachable_fails_fast_with_the_same_advice(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    message = "cannot connect to 127.0.0.1:9 for 'rajpurkar/squad'.*source=\"auto\""
    with pytest.raises(HubUnavailableError, match=message):
        load_examples("squad", n=5, source="hub")


# --- local SQuAD files in both layouts ----------------------------------------------------------

ARTICLES = [
    ("Super_Bowl_50", [
        ("Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina Panthers 24-10.",
         [("Which team won Super Bowl 50?", [("Denver Broncos", 49), ("The Denver Broncos", 45)]),
          ("What was the score?", [("24-10", 0)])]),  # a wrong answer_start: found by search
        ("The game was played at Levi's Stadium in Santa Clara, California.",
         [("Where was the game played?", [("Levi's Stadium", 23)]),
          ("Who sang the anthem?", [("Lady Gaga", 0)])]),  # not a span: dropped
    ]),
    ("Warsaw", [
        ("Warsaw is the capital and largest city of Poland. It stands on the Vistula River.",
         [("Which river runs through Warsaw?", [("Vistula River", 67)])]),
    ]),
]


def _official(articles=ARTICLES) -> dict:
    return {"version": "1.1", "data": [
        {"title": title, "paragraphs": [
            {"context": ctx, "qas": [
                {"id": f"{title}-{i}-{j}", "question": q,
                 "answers": [{"text": t, "answer_start": s} for t, s in answers]}
                for j, (q, answers) in enumerate(qas)]}
            for i, (ctx, qas) in enumerate(paragraphs)]}
        for title, paragraphs in articles]}


def _hf_rows() -> list[dict]:
    return [
        {"id": f"{title}-{i}-{j}", "title": title, "context": ctx, "question": q,
         "answers": {"text": [t for t, _ in answers], "answer_start": [s for _, s in answers]}}
        for title, paragraphs in ARTICLES
        for i, (ctx, qas) in enumerate(paragraphs)
        for j, (q, answers) in enumerate(qas)
    ]


def _all(source) -> list[Example]:
    return load_examples("squad", split="validation", source=source)  # a local file is one split, used whole


def test_official_and_hf_layouts_load_the_same(tmp_path):
    official = tmp_path / "dev-v1.1.json"
    official.write_text(json.dumps(_official()))
    jsonl = tmp_path / "squad.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _hf_rows()))
    listed = tmp_path / "squad_rows.json"
    listed.write_text(json.dumps(_hf_rows()))
    loaded = [_all(p) for p in (official, jsonl, listed)]
    keys = [sorted((e.prompt, e.target) for e in exs) for exs in loaded]
    assert keys[0] == keys[1] == keys[2]
    assert len(loaded[0]) == 4  # five questions, "Lady Gaga" is not a span of its context
    won = next(e for e in loaded[0] if "won" in e.meta["question"])
    assert won.answers == ["Denver Broncos", "The Denver Broncos"] and won.target == " Denver Broncos"
    report = load_report("squad", source=official)
    assert report["dropped_not_span"] == 1 and report["kept"] == 4
    assert dataset_label("squad", official) == ("SQuAD-format file: dev-v1.1.json, used whole for the split "
                                                "asked for")
    assert all(e.source == str(official.resolve()) for e in loaded[0])


def _broken(mutate) -> dict:
    doc = _official()
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["data"][0]["paragraphs"][1].pop("qas"),
         r"paragraph 2 of article 'Super_Bowl_50' \(data\[0\]\.paragraphs\[1\]\) has no 'qas'"),
        (lambda d: d["data"][1]["paragraphs"][0].pop("context"), r"paragraph 1 of article 'Warsaw'.* has no 'context'"),
        (lambda d: d["data"][1].pop("paragraphs"), r"article 'Warsaw' \(data\[1\]\) has no 'paragraphs'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].pop("text"),
         r"answer 1 of question 2 of paragraph 1 of article 'Super_Bowl_50'.* has no 'text'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("answers"), r"question 1 of .* has no 'answers' list"),
        (lambda d: d.update(data={"x": 1}), r"top-level 'data' must be a list"),
    ],
)
def test_malformed_official_file_names_file_and_part(tmp_path, mutate, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(mutate)))
    with pytest.raises(ValueError, match=f"bad.json: {message}"):
        load_examples("squad", source=path)


def test_malformed_files_other_shapes(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [ {"title": "x", ')
    with pytest.raises(ValueError, match="broken.json: not valid JSON at line 1"):
        load_examples("squad", source=path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"context": "abc", "question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl: row 1: has no 'answers'"):
        load_examples("squad", source=rows)
    rows.write_text(json.dumps({"context": "abc", "answers": {"text": ["a"], "answer_start": [0]}}) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl: row 1 has no 'question' text"):
        load_examples("squad", source=rows)
    rows.write_text(json.dumps({"context": "abc", "question": "q?", "answers": {"text": ["z"], "answer_start": [0]}}))
    with pytest.raises(ValueError, match="no question has an answer that is a span"):
        load_examples("squad", source=rows)
    text = tmp_path / "scalar.json"
    text.write_text("42")
    with pytest.raises(ValueError, match="scalar.json"):
        load_examples("squad", source=text)


# --- arithmetic --------------------------------------------------------------------------------


def test_math_1000_is_deterministic_and_seeded():
    a = load_examples("math", n=1000, seed=0, modules="all")  # the nine modules mixed (the default is one task)
    assert len(a) == 1000
    assert a == load_examples("math", n=1000, seed=0, modules="all")
    b = load_examples("math", n=1000, seed=1, modules="all")
    assert [e.prompt for e in a] != [e.prompt for e in b]
    assert set(Counter(e.meta["module"] for e in a)) == set(ARITHMETIC_MODULES)
    ex = a[0]
    assert ex.prompt == f"Question: {ex.meta['question']}\nAnswer:" and ex.target == " " + ex.answers[0]
    assert len({e.meta["question"] for e in a}) == 1000


def test_math_generation_is_reproducible_without_cache_and_leaves_global_rng_alone():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    fresh = mathgen.generate(60, split="validation", seed=5, use_cache=False)
    assert (random.random(), np.random.random()) == expected
    assert fresh == mathgen.generate(60, split="validation", seed=5, use_cache=False)
    assert mathgen.generate(20, split="validation", seed=5, use_cache=False) == fresh[:20]


def test_math_splits_do_not_overlap_and_modules_select():
    train = mathgen.generate(300, split="train", seed=0, modules=["add_or_sub", "mul"], use_cache=False)
    val = mathgen.generate(300, split="validation", seed=0, modules=["add_or_sub", "mul"], use_cache=False)
    assert not {p["question"] for p in train} & {p["question"] for p in val}
    assert {p["module"] for p in train} == {"arithmetic__add_or_sub", "arithmetic__mul"}
    only = load_examples("math", n=20, modules="arithmetic__div")
    assert {e.meta["module"] for e in only} == {"arithmetic__div"}


def test_hub_math_rows_are_cleaned():
    from core.data.arith import _clean

    assert _clean("b'What is 2 + 3?\\n'") == "What is 2 + 3?"
    assert _clean("b'-28/3\\n'") == "-28/3"
    assert _clean(" 5 ") == "5"


def test_math_local_file(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(30)))
    exs = load_examples("math", split="train", source=path) + load_examples("math", source=path)
    assert sorted(e.answers[0] for e in exs) == sorted(str(i + 1) for i in range(30))
    assert dataset_label("math", path) == "arithmetic file: arith.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?"}))
    with pytest.raises(ValueError, match='arith.jsonl: row 1 lacks "question" or "answer"'):
        load_examples("math", source=path)


def test_math_bad_input():
    with pytest.raises(ValueError, match="unknown arithmetic module 'calculus'; choose from arithmetic__add_or_sub"):
        load_examples("math", n=5, modules=["calculus"])
    with pytest.raises(ValueError, match="modules is empty"):
        load_examples("math", n=5, modules=[])
    with pytest.raises(ValueError, match="unknown difficulty 'extreme'; choose one of easy, medium, hard"):
        load_examples("math", n=5, difficulty="extreme")
    with pytest.raises(ValueError, match="math problems are generated: pass n"):
        load_examples("math")


# --- web text ----------------------------------------------------------------------------------


def test_c4_3000_documents():
    docs = load_examples("c4", n=3000)
    assert len(docs) == 3000
    assert all(d.prompt.strip() and d.target == "" and d.answers == [] for d in docs)
    assert len({d.meta["article_id"] for d in docs}) == 3000
    train_ids = {d.meta["article_id"] for d in load_examples("c4", split="train")}
    assert not train_ids & {d.meta["article_id"] for d in docs}
    report = load_report("c4")
    assert report["documents"] == 3824 and report["dropped_empty"] == 36
    assert sum(report["examples"].values()) == 3824 - 36


def test_c4_local_file(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 3}) for i in range(40)))
    docs = load_examples("c4", split="train", source=path) + load_examples("c4", source=path)
    assert len(docs) == 40
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match='bad.jsonl: row 1 has no "text" field'):
        load_examples("c4", source=bad)


def test_labels_and_texts():
    assert dataset_label("squad") == "QuAC, SQuAD format: offline stand-in for SQuAD"
    assert dataset_label("c4") == "news articles: offline stand-in for C4"
    assert dataset_label("math") == (
        "DeepMind mathematics_dataset generator, arithmetic modules (same generator as MATH); task "
        "add_sub_multiple@easy")
    assert "rajpurkar/squad" in dataset_label("squad", "hub")
    texts = example_texts("math", n=5)
    exs = load_examples("math", n=5)
    assert texts == [e.prompt + e.target for e in exs]
    assert example_texts("c4", n=2) == [e.prompt for e in load_examples("c4", n=2)]


# --- truncation --------------------------------------------------------------------------------


def _n_tokens(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def test_fit_to_length_cuts_context_only(tiny_lm):
    tok = tiny_lm.tokenizer
    examples = [e for e in load_examples("squad", n=300) if e.meta["history"]][:20]
    for ex in examples:
        short = fit_to_length(ex, tok, 160)
        assert _n_tokens(tok, short.prompt + short.target) <= 160
        assert short.target == ex.target and short.answers == ex.answers
        assert short.meta["question"] == ex.meta["question"]
        assert short.prompt.endswith(f"Question: {ex.meta['question']}\nAnswer:")
        assert short.meta["context"] in ex.meta["context"]
        assert len(short.meta["context"]) < len(ex.meta["context"])
        if _n_tokens(tok, ex.answers[0]) < 60:  # a window of the context around the answer keeps it
            assert ex.answers[0] in short.meta["context"]
            assert short.meta["context"][short.meta["answer_start"]:].startswith(ex.answers[0])
        assert short.meta["truncated"] is True


def test_fit_to_length_leaves_short_examples_and_drops_history_last(tiny_lm):
    tok = tiny_lm.tokenizer
    ex = load_examples("math", n=1)[0]
    assert fit_to_length(ex, tok, 512) is ex
    with pytest.raises(ValueError, match="no context to cut"):
        fit_to_length(ex, tok, 3)
    qa = next(e for e in load_examples("squad", n=300) if len(e.meta["history"]) == 2)
    bare = render_qa_prompt("", qa.meta["question"]) + qa.target
    tight = fit_to_length(qa, tok, _n_tokens(tok, bare) + 2)
    assert tight.meta["history"] == []  # the earlier turns go once the context is gone
    with pytest.raises(ValueError, match="question and answer alone need \\d+ tokens, more than max_tokens=5"):
        fit_to_length(qa, tok, 5)
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        fit_to_length(qa, tok, 0)


def test_example_texts_fitted_keep_question_and_answer(tiny_lm):
    tok = tiny_lm.tokenizer
    texts = example_texts("squad", n=10, tokenizer=tok, max_tokens=128)
    examples = load_examples("squad", n=10)
    for text, ex in zip(texts, examples, strict=True):
        assert _n_tokens(tok, text) <= 128
        assert text.endswith(f"Question: {ex.meta['question']}\nAnswer: {ex.answers[0]}")
    again = fit_to_length(fit_to_length(examples[0], tok, 128), tok, 100)  # re-fitting a cut example works
    assert _n_tokens(tok, again.text) <= 100
    with pytest.raises(ValueError, match="pass both tokenizer and max_tokens"):
        example_texts("squad", n=2, tokenizer=tok)


def test_fit_to_length_c4_keeps_the_beginning(tiny_lm):
    tok = tiny_lm.tokenizer
    doc = load_examples("c4", n=1)[0]
    short = fit_to_length(doc, tok, 64)
    assert doc.prompt.startswith(short.prompt) and _n_tokens(tok, short.prompt) <= 64
