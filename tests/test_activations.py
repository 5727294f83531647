"""core.activations: exact, padding-free, early-exit extraction and its disk cache (tiny random LLaMA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import core.activations as act
from core.activations import Activations, collect_activations, collect_document_means, dataset_activations

TEXTS = [
    "The cat sat on the mat.",
    "A much longer sentence that needs padding for the short one to share its batch with it, surely.",
    "2 + 3 = 5",
]


def _hooks(lm) -> int:
    mods = [lm.model.get_input_embeddings(), *lm.decoder_layers]
    return sum(len(m._forward_hooks) for m in mods)


@pytest.mark.parametrize("compute, tol", [("native", 2e-3), ("bf16", 3e-2)])
def test_alone_equals_inside_padded_batch(tiny_lm, compute, tol):
    alone = collect_activations(tiny_lm, [TEXTS[0]], [0, 2, 4], compute=compute)
    batch = collect_activations(tiny_lm, TEXTS, [0, 2, 4], batch_size=3, compute=compute)
    for layer in (0, 2, 4):
        a = alone.layer(layer)
        b = batch.layer(layer)[batch.doc_index == 0]
        assert a.shape == b.shape
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < tol


def test_early_exit_matches_full_forward(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS[:1], [0, 2, 4], compute="native").with_first_token()
    enc = tiny_lm.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = tiny_lm.model(**enc, output_hidden_states=True).hidden_states
        final = tiny_lm.model.model.norm(torch.from_numpy(acts.layer(4)))
    np.testing.assert_allclose(acts.layer(0), ref[0][0].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(acts.layer(2), ref[2][0].numpy(), rtol=1e-3, atol=1e-3)
    # transformers 5 applies the final norm to the last hidden state; ours is the block output before it.
    np.testing.assert_allclose(final.numpy(), ref[4][0].numpy(), rtol=1e-2, atol=1e-2)


def test_stops_after_deepest_layer(tiny_lm):
    before = _hooks(tiny_lm)  # transformers keeps its own output-recording hooks; count ours only
    calls = []
    handle = tiny_lm.decoder_layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        collect_activations(tiny_lm, TEXTS[:1], [1])
    finally:
        handle.remove()
    assert calls == []  # block 2 (layer 3) never ran
    assert _hooks(tiny_lm) == before


def test_hooks_removed_after_an_error(tiny_lm, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("forward failed")

    before = _hooks(tiny_lm)
    monkeypatch.setattr(tiny_lm.model, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        collect_activations(tiny_lm, TEXTS[:1], [1, 3])
    monkeypatch.undo()
    assert _hooks(tiny_lm) == before


def test_rows_padding_and_first_token(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, [1])
    ids = tiny_lm.tokenizer(TEXTS)["input_ids"]
    total = sum(len(r) for r in ids)
    assert acts.n_rows == total - len(TEXTS)
    assert acts.n_excluded == len(TEXTS)
    assert acts.layer(1).shape == (acts.n_rows, tiny_lm.hidden_size)
    assert acts.layer(1).dtype == np.float32
    assert acts._hidden[1].dtype == np.float16
    np.testing.assert_array_equal(acts.token_ids[acts.doc_index == 1], ids[1][1:])
    np.testing.assert_array_equal(acts.positions[acts.doc_index == 1], np.arange(1, len(ids[1])))
    assert acts.token_texts[acts.doc_index == 2][0] == tiny_lm.tokenizer.decode([ids[2][1]])
    full = acts.with_first_token()
    assert full.n_excluded == 0 and full.n_rows == total
    assert full.first_token_rows(1).shape == (len(TEXTS), tiny_lm.hidden_size)


def test_max_length_truncates(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, [0], max_length=4).with_first_token()
    assert acts.n_rows == sum(min(4, len(r)) for r in tiny_lm.tokenizer(TEXTS)["input_ids"])


def test_document_means_agree(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, [0, 3], compute="native")
    pooled = collect_document_means(tiny_lm, TEXTS, [0, 3], compute="native")
    for layer in (0, 3):
        manual = np.stack([acts.layer(layer)[acts.doc_index == d].mean(0) for d in range(len(TEXTS))])
        np.testing.assert_allclose(acts.document_means(layer), manual, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pooled[layer], manual, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("layers", [5, [0, 7], -1])
def test_bad_layer_names_the_depth(tiny_lm, layers):
    with pytest.raises(ValueError, match=r"outside 0\.\.4: .* has 4 decoder layers"):
        collect_activations(tiny_lm, TEXTS, layers)


def test_bad_inputs(tiny_lm):
    with pytest.raises(ValueError, match="not one string"):
        collect_activations(tiny_lm, "one text", [0])
    with pytest.raises(ValueError, match="empty after tokenisation"):
        collect_activations(tiny_lm, ["fine", ""], [0])
    with pytest.raises(ValueError, match="no texts given"):
        collect_activations(tiny_lm, [], [0])
    with pytest.raises(ValueError, match="no layers asked for"):
        collect_activations(tiny_lm, TEXTS, [])
    with pytest.raises(ValueError, match="compute must be one of"):
        collect_activations(tiny_lm, TEXTS, [0], compute="fp8")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        collect_activations(tiny_lm, TEXTS, [0], batch_size=0)
    with pytest.raises(ValueError, match="was not collected"):
        collect_activations(tiny_lm, TEXTS, [0]).layer(2)


def test_bytes_round_trip(tiny_lm):
    acts = collect_activations(tiny_lm, TEXTS, [0, 2])
    back = Activations.from_bytes(acts.to_bytes())
    for layer in (0, 2):
        np.testing.assert_array_equal(back.layer(layer), acts.layer(layer))
    np.testing.assert_array_equal(back.token_texts, acts.token_texts)
    assert back.texts == acts.texts and back.fingerprint == tiny_lm.fingerprint


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    def sub(name: str) -> Path:
        path = tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr(act, "cache_subdir", sub)
    calls = []

    def texts(dataset, n, seed, source):
        calls.append((dataset, n, seed, source))
        return (TEXTS * n)[:n]

    # The text source is core.data's job; here only the caching around it is tested.
    monkeypatch.setattr(act, "_dataset_texts", texts)
    return tmp_path, calls


def test_cache_hit_identical_and_keyed(tiny_lm, tmp_cache):
    root, calls = tmp_cache
    first = dataset_activations(tiny_lm, "c4", [1, 2], n=3)
    second = dataset_activations(tiny_lm, "c4", [2, 1], n=3)
    assert len(calls) == 1  # the second call was served from disk
    for layer in (1, 2):
        np.testing.assert_array_equal(first.layer(layer), second.layer(layer))
    dataset_activations(tiny_lm, "c4", [1, 2], n=3, seed=1)
    dataset_activations(tiny_lm, "c4", [1, 2], n=3, max_length=8)
    assert len(calls) == 3  # seed and max_length are part of the key


def test_corrupt_entry_is_recomputed(tiny_lm, tmp_cache):
    root, calls = tmp_cache
    first = dataset_activations(tiny_lm, "math", [1], n=2)
    with act._cache() as cache:  # damage every stored entry: truncated bytes, as after a crash mid-write
        for key in list(cache.iterkeys()):
            cache.set(key, cache.get(key)[:100])
    again = dataset_activations(tiny_lm, "math", [1], n=2)
    assert len(calls) == 2
    np.testing.assert_array_equal(first.layer(1), again.layer(1))
    dataset_activations(tiny_lm, "math", [1], n=2)
    assert len(calls) == 2  # the repaired entry is used again


def test_damaged_value_file_is_recomputed(tiny_lm, tmp_cache, monkeypatch):
    root, calls = tmp_cache
    real = act._cache
    monkeypatch.setattr(act, "_cache", lambda name="activations": real(name, disk_min_file_size=0))  # values as files
    first = dataset_activations(tiny_lm, "c4", [2], n=2)
    files = list((root / "activations").rglob("*.val"))
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[:50])
    again = dataset_activations(tiny_lm, "c4", [2], n=2)
    assert len(calls) == 2
    np.testing.assert_array_equal(first.layer(2), again.layer(2))


def test_damaged_index_database_starts_afresh(tiny_lm, tmp_cache):
    root, calls = tmp_cache
    dataset_activations(tiny_lm, "c4", [1], n=2)
    (root / "activations" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    dataset_activations(tiny_lm, "c4", [1], n=2)
    assert len(calls) == 2 and list(root.glob("activations.damaged-*"))


def test_cache_is_bounded(tiny_lm, tmp_cache):
    with act._cache() as cache:
        assert cache.size_limit == act.CACHE_SIZE_LIMIT
        assert cache.eviction_policy == "least-recently-used"


def test_keep_end_and_rows_frame(tiny_lm):
    ids = tiny_lm.tokenizer(TEXTS[1])["input_ids"]
    acts = collect_activations(tiny_lm, [TEXTS[1]], [0], max_length=5, keep="end").with_first_token()
    np.testing.assert_array_equal(acts.token_ids, ids[-5:])
    frame = acts.rows_frame()
    assert list(frame.columns) == ["token", "token_id", "doc", "position", "text"] and len(frame) == 5
    with pytest.raises(ValueError, match="keep must be 'start' or 'end'"):
        collect_activations(tiny_lm, TEXTS, [0], keep="middle")
    assert act.keep_side("squad") == "end" and act.keep_side("c4") == "start"


def test_dataset_errors(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(act, "cache_subdir", lambda name: (tmp_path / name).mkdir(exist_ok=True) or tmp_path / name)
    with pytest.raises(ValueError, match="n must be at least 1"):
        dataset_activations(tiny_lm, "c4", [1], n=0)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        dataset_activations(tiny_lm, "imagenet", [1], n=2)
    with pytest.raises(ValueError, match="outside 0..4"):
        act.dataset_document_means(tiny_lm, "c4", [9], n=2)
