"""Bugs of issue 11, each with its test: QA transfer inputs keep question and answer, a deep prompt at layer 0
decodes the same cached and uncached, a second seed is recorded as such, a local SQuAD file is used whole."""

from __future__ import annotations

import json

import pytest
import torch

from core.data import load_examples, load_report
from core.data.example import qa_example

# --------------------------------------------------------------------------- transfer: QA inputs as in training


def test_transfer_encoding_keeps_question_and_answer_of_long_passages(tiny_lm):
    from core.analysis.transfer import encode_as_in_training

    tok = tiny_lm.tokenizer
    passage = "The harbour was built in 1820 by Jane Roe. " + " ".join(f"Filler sentence {i} of history." for i in
                                                                       range(200))
    ex = qa_example(passage, "Who built the harbour?", ["Jane Roe"], answer_start=passage.index("Jane Roe"))
    (item,) = encode_as_in_training(tok, [ex], max_length=96)
    text = tok.decode(item.ids)
    assert len(item.ids) <= 96
    assert "Question: Who built the harbour?" in text
    assert "built in 1820 by Jane Roe" in text  # the answer span survives in the passage, not only as the target


def test_transfer_encoding_of_the_embedded_qa_set_keeps_every_question(tiny_lm):
    from core.analysis.transfer import encode_as_in_training

    tok = tiny_lm.tokenizer
    examples = load_examples("squad", split="validation", n=24, seed=1234)
    items = encode_as_in_training(tok, examples, max_length=320)
    for ex, item in zip(examples, items, strict=True):
        text = tok.decode(item.ids)
        assert f"Question: {ex.meta['question']}" in text
        assert ex.answers[0] in text[: text.rindex("Answer:")]  # the answer is still in the passage


# --------------------------------------------------------------------------- deep prompt at layer 0, cached decoding


def _uncached_greedy(lm, prompt, text: str, steps: int) -> list[int]:  # noqa: ANN001
    """One unpadded sequence, the whole prefix re-run at every step: no cache, no mask."""
    model, decoder = lm.model, lm.model.model
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    out = []
    with torch.no_grad(), prompt.hooks(model):
        for _ in range(steps):
            embeds = decoder.embed_tokens(torch.tensor([ids + out]))
            full = torch.cat([prompt.prefix(1, embeds.dtype), embeds], dim=1)
            hidden = decoder(inputs_embeds=full, use_cache=False).last_hidden_state
            out.append(int(model.lm_head(hidden[:, -1]).argmax(-1)))
    return out


def _as_generated(lm, tokens: list[int], stop: str = "\n") -> str:  # noqa: ANN001
    # What core.evaluation.generate keeps: tokens up to the first stop, decoded, cut at the stop.
    tok, kept = lm.tokenizer, []
    for t in tokens:
        kept.append(t)
        if t == tok.eos_token_id or stop in tok.decode([t]):
            break
    return tok.decode([t for t in kept if t != tok.eos_token_id], skip_special_tokens=True).split(stop)[0].strip()


@pytest.mark.parametrize("layers", [[0], [0, 2]])
def test_deep_prompt_at_layer_zero_generates_the_same_cached_and_uncached(tiny_lm, layers):
    from core.evaluation import generate
    from core.tuning import build_prompt

    prompt = build_prompt("deep", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=4, layers=layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in prompt.named_tensors().values():
            value.copy_(torch.randn(value.shape, generator=gen) * 0.5)
    prompt.eval()
    # different lengths: the batch is left-padded, so the grown mask and shifted positions are exercised
    texts = ["Question: What is 2 + 3?\nAnswer:", "Hi", "Question: What is 12 - 7 + 1?\nAnswer:"]
    steps = 6
    cached = generate(tiny_lm, texts, prompt, max_new_tokens=steps, compute="fp32", stop="\x00")
    uncached = [_as_generated(tiny_lm, _uncached_greedy(tiny_lm, prompt, t, steps), stop="\x00") for t in texts]
    assert cached == uncached
    plain = generate(tiny_lm, texts, None, max_new_tokens=steps, compute="fp32", stop="\x00")
    assert plain != cached  # the deep vectors do change what is generated: the comparison means something


# --------------------------------------------------------------------------- the run's seed is the prior's seed


def test_second_seed_is_recorded_in_prior_params(tiny_lm):
    from core.tuning import TrainConfig, build_prompt
    from core.tuning.trainer import initial_tensors

    prompt = build_prompt("soft", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=4)
    samples = {}
    for seed in (0, 1):
        config = TrainConfig(method="soft", dataset="math", prior="gaussian", seed=seed, n_tokens=4)
        tensors, info = initial_tensors(tiny_lm, config, prompt, None)
        assert info["prior_params"]["seed"] == seed
        samples[seed] = tensors["soft"]
    assert not torch.equal(samples[0], samples[1])
    fixed = TrainConfig(method="soft", dataset="math", prior="gaussian", seed=1, n_tokens=4,
                        prior_params={"seed": 7})
    assert initial_tensors(tiny_lm, fixed, prompt, None)[1]["prior_params"]["seed"] == 7  # an explicit seed wins


# --------------------------------------------------------------------------- a local SQuAD file


def _squad_file(path, n_passages: int = 6, per_passage: int = 2) -> str:
    articles = [{"title": "t", "paragraphs": [{
        "context": f"Passage {p} says that the colour number {p} is blue{p}.",
        "qas": [{"id": f"{p}-{q}", "question": f"What colour is number {p} (ask {q})?",
                 "answers": [{"text": f"blue{p}",
                              "answer_start": len(f"Passage {p} says that the colour number {p} is ")}]}
                for q in range(per_passage)]} for p in range(n_passages)]}]
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return str(path)


def test_local_squad_file_is_used_whole_for_the_split_asked(tmp_path):
    dev = _squad_file(tmp_path / "dev-v1.1.json")
    val = load_examples("squad", split="validation", source=dev)
    assert len(val) == 12  # every question, not the half of the passages a hash would pick
    assert len(load_examples("squad", split="train", source=dev)) == 12
    assert load_report("squad", source=dev)["examples"] == {"file": 12}


def test_split_prefix_divides_one_file_by_passage(tmp_path):
    path = _squad_file(tmp_path / "one.json", n_passages=40)
    src = f"split:{path}"
    train = load_examples("squad", split="train", source=src)
    val = load_examples("squad", split="validation", source=src)
    assert len(train) + len(val) == 80 and train and val
    assert not {e.meta["context"] for e in train} & {e.meta["context"] for e in val}  # passages never shared
    from core.data import dataset_label

    assert dataset_label("squad", src) == "SQuAD-format file: one.json, split by passage"
    assert dataset_label("squad", path).endswith("used whole for the split asked for")
    with pytest.raises(ValueError, match="'split:' and that path"):
        load_examples("squad", source=f"split:{tmp_path / 'missing.json'}")


def test_asking_for_more_examples_than_exist_returns_all_and_says_so(tmp_path):
    dev = _squad_file(tmp_path / "small.json", n_passages=2)
    with pytest.warns(UserWarning, match=r"asked for n=50 .* only 4 exist; returning all 4"):
        got = load_examples("squad", split="validation", n=50, source=dev)
    assert len(got) == 4


def test_training_from_one_plain_squad_file_is_refused(tmp_path, tiny_lm):
    from core.tuning import TrainConfig, train

    dev = _squad_file(tmp_path / "dev.json")
    config = TrainConfig(method="soft", dataset="squad", source=dev, steps=1, batch_size=2, n_train=4, n_val=2,
                         eval_n=0, compute="fp32")
    with pytest.raises(ValueError, match="training and validation would be the same questions.*split:"):
        train(tiny_lm, config, tmp_path / "run", evaluate=False)


# --------------------------------------------------------------------------- a learnable arithmetic task


def test_default_math_task_is_add_sub_multiple_with_small_integer_answers():
    from core.data import dataset_label, dataset_task, math_task

    examples = load_examples("math", split="validation", n=40, seed=0)
    assert {e.meta["module"] for e in examples} == {"arithmetic__add_sub_multiple"}
    assert {e.meta["difficulty"] for e in examples} == {"easy"}
    answers = [int(e.answers[0]) for e in examples]  # integers, every one
    assert max(abs(a) for a in answers) < 1000
    assert math_task() == "add_sub_multiple@easy" and math_task("all") == "all@easy"
    assert dataset_task("math") == "math:add_sub_multiple@easy" and dataset_task("squad") == "squad"
    assert "add_sub_multiple@easy" in dataset_label("math")
    mixed = load_examples("math", split="validation", n=60, seed=0, modules="all")
    assert len({e.meta["module"] for e in mixed}) > 3  # the nine modules stay selectable
    assert load_report("math")["default_task"] == "add_sub_multiple@easy"


def test_caches_keyed_by_dataset_carry_the_math_task(tiny_lm):
    from core.activations import _dataset_key
    from core.priors.fit import fit_key

    key, _ = _dataset_key("acts", tiny_lm, "math", (0,), 4, 0, "auto", 32, 8, "fp32")
    assert "task=math:add_sub_multiple@easy" in key
    assert "math:add_sub_multiple@easy" in fit_key(tiny_lm, "math", 0, 64, 0, "full", None)


def test_a_run_records_its_math_task(tiny_lm, tmp_path):
    from core.runs import read_run_json
    from core.tuning import TrainConfig, train

    config = TrainConfig(method="soft", dataset="math", steps=1, batch_size=2, n_train=4, n_val=2, eval_n=0,
                         compute="fp32", max_length=64, n_tokens=4)
    train(tiny_lm, config, tmp_path / "run", evaluate=False)
    assert read_run_json(tmp_path / "run")["config"]["task"] == "math:add_sub_multiple@easy"
