"""Prompt-tuning engine on the tiny random LLaMA (and one short real run, marked integration)."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.evaluation import generate
from core.runs import load_run
from core.tuning import (
    METHODS,
    DeepPrompt,
    DeepPromptConfig,
    TrainConfig,
    answer_loss,
    build_prompt,
    collate,
    encode_examples,
    train,
)


def _examples(n: int, offset: int = 0) -> list:
    out = []
    for k in range(offset, offset + n):
        a, b = k % 13, (k * 7) % 11
        out.append(SimpleNamespace(prompt=f"Question: What is {a} plus {b}?\nAnswer:", target=f" {a + b}",
                                   answers=[str(a + b)], meta={}))
    return out


DATA = (_examples(24), _examples(8, offset=100), _examples(4, offset=200))


def _init(method: str, lm, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompt = build_prompt(method, lm.hidden_size, lm.num_layers)
    return {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in prompt.named_tensors().items()}


def _config(**kw) -> TrainConfig:
    base = dict(dataset="math", steps=4, batch_size=4, val_every=2, snapshot_every=2, eval_n=0, n_val=8,
                compute="fp32", n_tokens=4)
    return TrainConfig(**{**base, **kw})


def _batch(lm, examples, n=4):
    return collate(encode_examples(lm.tokenizer, examples[:n]), lm.tokenizer.pad_token_id)


def test_methods_registered():
    assert set(METHODS) >= {"soft", "deep"}


@pytest.mark.parametrize("method", ["soft", "deep"])
def test_only_prompts_train_and_base_is_bit_identical(tiny_lm, tmp_path, method):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    init = {k: v[:4] for k, v in _init(method, tiny_lm).items()}
    result = train(tiny_lm, _config(method=method), tmp_path / "run", init=init, examples=DATA)
    assert result.status == "done"
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed during training"
    assert all(p.grad is None and not p.requires_grad for p in tiny_lm.model.parameters())
    moved = [k for k in result.prompt if not torch.equal(result.prompt[k], init[k])]
    assert sorted(moved) == sorted(init), "every prompt tensor should have been updated"


def test_deep_keeps_length_and_grads_reach_every_layer(tiny_lm):
    prompt = build_prompt("deep", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=3, layers=[0, 2, 3])
    prompt.load_tensors({k: v[:3] for k, v in _init("deep", tiny_lm).items() if k in prompt.named_tensors()}
                        | {k: torch.randn(3, tiny_lm.hidden_size) for k in ("deep.0", "deep.2")})
    batch = _batch(tiny_lm, DATA[0])
    decoder = tiny_lm.model.model
    embeds = torch.cat([prompt.prefix(4, torch.float32), decoder.embed_tokens(batch.input_ids)], dim=1)
    plain = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    with prompt.hooks(tiny_lm.model):
        deep = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    assert deep.shape == plain.shape  # [B, n+T, d]: the cut restores the length
    assert not torch.allclose(deep, plain)
    loss = answer_loss(tiny_lm.model, prompt, batch)
    loss.backward()
    for name, param in prompt.named_tensors().items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert not tiny_lm.model.model.layers[1]._forward_pre_hooks, "hooks must be removed after the pass"


def test_deep_default_layers_and_bad_layer(tiny_lm):
    prompt = build_prompt("deep", tiny_lm.hidden_size, tiny_lm.num_layers)
    assert prompt.config.layers == [1, 2, 3]
    with pytest.raises(ValueError, match="out of range: this model has 4 decoder layers"):
        DeepPrompt(DeepPromptConfig(layers=[7]), tiny_lm.hidden_size, tiny_lm.num_layers)


def test_loss_counts_answer_tokens_only(tiny_lm):
    prompt = build_prompt("soft", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=4)
    prompt.load_tensors({"soft": _init("soft", tiny_lm)["soft"][:4]})
    batch = _batch(tiny_lm, DATA[0])
    ours = answer_loss(tiny_lm.model, prompt, batch) / batch.n_answer
    # reference: full logits [B, n+T, V] and labels -100 everywhere except answer tokens
    n = 4
    embeds = torch.cat([prompt.prefix(4, torch.float32), tiny_lm.model.model.embed_tokens(batch.input_ids)], 1)
    logits = tiny_lm.model(inputs_embeds=embeds).logits
    labels = torch.full(batch.input_ids.shape, -100)
    labels[batch.rows, batch.cols] = batch.labels
    labels = torch.cat([torch.full((4, n), -100), labels], 1)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the prompt text is not scored: changing a prompt token leaves the count of scored tokens alone
    encoded = encode_examples(tiny_lm.tokenizer, DATA[0][:1])[0]
    assert encoded.n_answer == len(tiny_lm.tokenizer(DATA[0][0].target + "\n", add_special_tokens=False).input_ids)
    # padding is never read: the same example alone or padded in a batch gives the same loss
    alone = collate(encode_examples(tiny_lm.tokenizer, [DATA[0][0]]), tiny_lm.tokenizer.pad_token_id)
    long = SimpleNamespace(prompt="Question: " + "very " * 30 + "long?\nAnswer:", target=" 1", answers=["1"])
    padded = collate(encode_examples(tiny_lm.tokenizer, [DATA[0][0], long]), tiny_lm.tokenizer.pad_token_id)
    with torch.no_grad():
        single = answer_loss(tiny_lm.model, prompt, alone)
        first_only = padded
        keep = first_only.rows == 0
        first_only.rows, first_only.cols, first_only.labels = (first_only.rows[keep], first_only.cols[keep],
                                                               first_only.labels[keep])
        torch.testing.assert_close(answer_loss(tiny_lm.model, prompt, first_only), single, rtol=1e-5, atol=1e-5)


def test_shared_prefix_gives_the_concatenated_loss_and_gradient(tiny_lm):
    """Through the model's own forward (models the block loop does not run), the soft prompt's keys/values are
    computed once per batch and shared by its rows through the KV cache: same loss, same gradient."""
    from core.tuning.loss import hooked_answer_loss

    batch = _batch(tiny_lm, DATA[0])
    results = []
    for shared in (True, False):
        prompt = build_prompt("soft", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=4)
        prompt.load_tensors({"soft": _init("soft", tiny_lm)["soft"][:4]})
        prompt.prefix_only = shared  # False: the prompt is concatenated to every row
        loss = hooked_answer_loss(tiny_lm.model, prompt, batch)
        loss.backward()
        results.append((loss.detach(), prompt.soft.grad.clone()))
    (loss_shared, grad_shared), (loss_concat, grad_concat) = results
    torch.testing.assert_close(loss_shared, loss_concat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_shared, grad_concat, rtol=1e-4, atol=1e-6)
    assert grad_shared.abs().sum() > 0
    # shared where the prompt is a large share of each row (MATH), not on long passages (QA) or a single row
    from core.tuning.loss import shares_prefix

    assert shares_prefix(4, 4, batch.input_ids.shape[1]) and shares_prefix(20, 8, 26)
    assert not shares_prefix(20, 8, 600) and not shares_prefix(20, 1, 26)


def _varied(n: int) -> list:
    """Rows of different lengths with answers of one to several tokens (padding and several reads per row)."""
    words = ["seven", "forty two", "a hundred and nine", "3", "twelve thousand and one"]
    return [SimpleNamespace(prompt=f"Question: {'Now ' * (k % 4)}what is number {k}?\nAnswer:",
                            target=f" {words[k % len(words)]}", answers=[words[k % len(words)]], meta={})
            for k in range(n)]


@pytest.mark.parametrize("common_start", [True, False])
@pytest.mark.parametrize("attention", ["one chunk", "chunks of 4", "sdpa"])
@pytest.mark.parametrize(("method", "params"), [
    ("soft", {}), ("deep", {"layers": [0, 2]}), ("deep", {"layers": [1, 3], "soft": False}),
    ("deep", {"layers": [3], "soft": False}), (None, {})])
def test_block_loop_gives_the_models_own_loss_and_gradient(tiny_lm, monkeypatch, method, params, attention,
                                                            common_start):
    """answer_loss runs LLaMA blocks as one loop (prompt rows, and the tokens every row begins with, once per
    batch; q/k/v and gate/up as one product each, the last block at the read positions only); the model's own
    forward with the prompt's hooks gives the same loss and the same gradient on every prompt tensor, on padded
    rows with several answer tokens, with the CPU's chunked attention (one chunk, and several with a partial last
    one) and with SDPA (CUDA's), whether or not the rows begin with the same tokens."""
    from core.tuning import blocks
    from core.tuning.loss import common_token_prefix, hooked_answer_loss

    assert blocks.supported(tiny_lm.model)
    if attention == "chunks of 4":
        monkeypatch.setattr(blocks, "ATTENTION_CHUNK", 4)
    if attention == "sdpa":
        monkeypatch.setattr(blocks, "_sdpa_attention", lambda device: True)
    examples = _varied(6)
    if not common_start:
        examples[3].prompt = "Tell me: " + examples[3].prompt
    batch = collate(encode_examples(tiny_lm.tokenizer, examples), tiny_lm.tokenizer.pad_token_id)
    assert len(set(batch.rows.tolist())) == 6 and len(batch.rows) > 6
    assert (common_token_prefix(batch) == 2) == common_start  # every row begins with "Question:"
    prompt = None
    if method is not None:
        prompt = build_prompt(method, tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=3, **params)
        gen = torch.Generator().manual_seed(1)
        prompt.load_tensors({k: torch.randn(v.shape, generator=gen) for k, v in prompt.named_tensors().items()})
    results = []
    for loss_fn in (answer_loss, hooked_answer_loss):
        loss = loss_fn(tiny_lm.model, prompt, batch)
        grads = {}
        if prompt is not None:
            loss.backward()
            grads = {k: p.grad.clone() for k, p in prompt.named_tensors().items()}
            prompt.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads))
    (loop, loop_grads), (hooked, hooked_grads) = results
    torch.testing.assert_close(loop, hooked, rtol=1e-5, atol=1e-5)
    for name, grad in hooked_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(loop_grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_gives_the_cross_entropy_of_the_logits_and_its_gradient(monkeypatch, dtype, packed):
    """The block loop's loss on CPU: the head and the summed cross-entropy in one pass over vocabulary chunks, the
    gradient computed in the forward and the chunks joined by their log-sum-exps. Loss and gradient equal
    logits-then-cross_entropy's, with labels in several chunks (a partial last one), logits large enough that a
    chunk's maximum moves, and a label whose probability underflows fp32; under no_grad it computes the same loss
    and keeps nothing for a backward. The chunks are packed for oneDNN once per weight where torch has it (a
    weight changed in place is packed again), else batched products of plain ones."""
    from core.tuning import loss as loss_module
    from core.tuning import packed as packing

    if packed and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: the head runs unpacked")
    if not packed:
        monkeypatch.setattr(loss_module, "_packed_head", lambda head: None)
    monkeypatch.setattr(loss_module, "PACKED_HEAD_CHUNK", 7)  # five chunks of 7, then 5 rows
    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 7)
    monkeypatch.setattr(loss_module, "HEAD_GROUP", 2)  # with 2 threads: two full groups of 2 chunks, then 12 rows
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).requires_grad_(False).to(dtype)
    weight = head.weight
    with torch.no_grad():
        weight.copy_(torch.randn(40, 16, generator=gen) * 3)
    if packed and packing.pack(weight) is None:  # bf16 on a CPU without AVX512-BF16-class support
        pytest.skip(f"this CPU cannot pack {dtype} weights: the head runs unpacked (the other case)")
    rows = (torch.randn(5, 16, generator=gen) * 2).to(dtype).requires_grad_()
    labels = torch.tensor([0, 39, 13, 13, 27])
    assert loss_module.fused_head(head, rows, labels)
    expected = F.cross_entropy(F.linear(rows, weight).float(), labels, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, rows)
    fused = loss_module.LinearCrossEntropy.apply(rows, head, labels, True)
    (fused_grad,) = torch.autograd.grad(fused, rows)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fused, expected, **tol)
    torch.testing.assert_close(fused_grad.float(), expected_grad.float(), **tol)
    with torch.no_grad():
        plain = loss_module.LinearCrossEntropy.apply(rows, head, labels, False)
    torch.testing.assert_close(plain, expected.detach(), **tol)
    assert not plain.requires_grad
    if packed:
        assert len(loss_module._packed_head(head)) == 6  # the path above ran on packed chunks
    far = (rows.detach() * 8).requires_grad_()  # logits hundreds of nats apart: p(argmin) underflows fp32
    far_labels = F.linear(far, weight).argmin(dim=1)
    assert (torch.softmax(F.linear(far, weight).float(), dim=-1).gather(1, far_labels[:, None]) == 0).any()
    expected_far = F.cross_entropy(F.linear(far, weight).float(), far_labels, reduction="sum")
    fused_far = loss_module.LinearCrossEntropy.apply(far, head, far_labels, True)
    torch.testing.assert_close(fused_far, expected_far, **tol)
    torch.testing.assert_close(torch.autograd.grad(fused_far, far)[0].float(),
                               torch.autograd.grad(expected_far, far)[0].float(), **tol)
    with torch.no_grad():
        weight[13] = rows[2]  # row 2's largest logit: a stale packing would miss it
    expected = F.cross_entropy(F.linear(rows, weight).float(), labels, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, rows)
    fused = loss_module.LinearCrossEntropy.apply(rows, head, labels, True)
    torch.testing.assert_close(fused, expected, **tol)
    torch.testing.assert_close(torch.autograd.grad(fused, rows)[0].float(), expected_grad.float(), **tol)


@pytest.mark.parametrize(("lq", "lk", "chunk"), [(9, 9, 4), (7, 12, 3), (5, 5, 64)])
def test_chunked_causal_attention_matches_sdpa_and_its_gradient_checks(monkeypatch, lq, lk, chunk):
    """The CPU attention of the block loop: grouped heads, causal with the last query at the last key (earlier keys,
    such as deep vectors, seen by every query), computed in chunks of queries with its own backward. Its output
    equals SDPA's with the same mask, and its backward passes gradcheck (float64), also when q needs no gradient."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from core.tuning import blocks

    monkeypatch.setattr(blocks, "ATTENTION_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, lq, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, lk, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    expected = sdpa(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(blocks.CausalAttention.apply(q, k, v, 0.3), expected)
    assert torch.autograd.gradcheck(lambda *t: blocks.CausalAttention.apply(*t, 0.3), (q, k, v))
    frozen_q = q.detach()
    assert torch.autograd.gradcheck(lambda *t: blocks.CausalAttention.apply(frozen_q, *t, 0.3), (k, v))


@pytest.mark.parametrize("offset", [0, 3], ids=["no deep keys", "3 deep keys"])
def test_causal_attention_skips_the_queries_past_each_rows_length(monkeypatch, offset):
    """Rows of a batch use different lengths (the block loop's rows, longest first): the chunks multiply only the
    rows that reach them. Each row's used queries get exactly the attention of the whole computation (whose backward
    passes gradcheck above), the chunks past its length zeros, and the gradient through the used queries is the
    whole computation's (the keys seen only past a row's length get none)."""
    from core.tuning import blocks

    monkeypatch.setattr(blocks, "ATTENTION_CHUNK", 3)
    lengths = (10, 7, 3, 1)  # the first row reaches every chunk, the last only the first
    gen = torch.Generator().manual_seed(0)
    lq = lengths[0]
    q = torch.randn(4, 6, lq, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(4, 2, lq + offset, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    position = torch.arange(lq)[None, None, :, None]
    used = position < torch.tensor(lengths)[:, None, None, None]  # [B, 1, Lq, 1]
    unreached = position >= (torch.tensor(lengths)[:, None, None, None] + 2) // 3 * 3  # chunks past each row's
    skipped = blocks.CausalAttention.apply(q, k, v, 0.3, lengths)
    whole = blocks.CausalAttention.apply(q, k, v, 0.3)
    torch.testing.assert_close(skipped[used.expand_as(whole)], whole[used.expand_as(whole)])
    assert unreached.sum() == 15 and (skipped[unreached.expand_as(whole)] == 0).all()
    weights = torch.randn(whole.shape, generator=gen, dtype=torch.float64) * used
    expected = torch.autograd.grad((whole * weights).sum(), (q, k, v))
    for got, want in zip(torch.autograd.grad((skipped * weights).sum(), (q, k, v)), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_frozen_norm_and_gated_silu_match_the_models_ops_and_their_gradients(dtype):
    """The block loop's RMSNorm and silu(gate) * up with backwards of their own: the forward of LlamaRMSNorm and of
    the two ops, the same gradient (float64: gradcheck), on rows of several leading dims."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from core.tuning import blocks

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(8, eps=1e-5).to(dtype).requires_grad_(False)
    norm.weight.copy_(torch.rand(8, generator=gen) + 0.5)
    x = (3 * torch.randn(2, 5, 8, generator=gen)).to(dtype).requires_grad_(True)
    gate_up = torch.randn(2, 5, 12, generator=gen).to(dtype).requires_grad_(True)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    ours = blocks._norm(norm, x)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, norm(x), **tol)
    torch.testing.assert_close(blocks._norm(norm, x.detach()), ours.detach(), rtol=0, atol=0)  # frozen rows: no graph
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(blocks.GatedSiLU.apply(gate_up), F.silu(gate) * up, **tol)
    grad = torch.randn(2, 5, 8, generator=gen).to(dtype)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(norm(x), x, grad)[0], **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: blocks.FrozenRMSNorm.apply(t, norm.weight, 1e-5), (x,))
        assert torch.autograd.gradcheck(blocks.GatedSiLU.apply, (gate_up,))


def test_block_loop_with_biased_projections_gives_the_models_own_loss(tiny_lm):
    """LLaMA configs may put biases on q/k/v and the MLP: stacked as the weights are, same loss and gradient."""
    import copy

    from transformers import LlamaForCausalLM

    from core.tuning.loss import hooked_answer_loss

    config = copy.deepcopy(tiny_lm.model.config)
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.normal_(std=0.1)
    batch = collate(encode_examples(tiny_lm.tokenizer, _varied(4)), tiny_lm.tokenizer.pad_token_id)
    prompt = build_prompt("deep", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=3, layers=[1])
    prompt.load_tensors({k: torch.randn(v.shape) for k, v in prompt.named_tensors().items()})
    results = []
    for loss_fn in (answer_loss, hooked_answer_loss):
        loss = loss_fn(model, prompt, batch)
        loss.backward()
        results.append((loss.detach(), prompt.soft.grad.clone()))
        prompt.zero_grad(set_to_none=True)
    assert model.model.layers[0].self_attn.k_proj.bias.untyped_storage().data_ptr() == \
        model.model.layers[0].self_attn.q_proj.bias.untyped_storage().data_ptr()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_a_deep_prompt_for_another_depth_is_refused_by_both_forwards(tiny_lm):
    """A deep prompt built for a deeper model must not silently lose the vectors past this model's last block."""
    from core.tuning.loss import hooked_answer_loss

    prompt = build_prompt("deep", tiny_lm.hidden_size, tiny_lm.num_layers + 2, n_tokens=3)
    batch = _batch(tiny_lm, DATA[0])
    for loss_fn in (answer_loss, hooked_answer_loss):
        with pytest.raises(ValueError, match=f"built for {tiny_lm.num_layers + 2} layers; the model has"):
            loss_fn(tiny_lm.model, prompt, batch)


def test_fused_projections_are_views_and_leave_the_model_unchanged():
    """q|k|v and gate|up stored side by side: the modules' weights become views (no second copy), the model's
    output is bit-identical, and a later call finds the same tensors instead of copying again."""
    from core.models import tiny_llama
    from core.tuning.blocks import fuse_projections

    lm = tiny_llama()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        before = lm.model(ids).logits
    layer = lm.model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    (qkv, bias), (gate_up, gate_up_bias) = fuse_projections(layer)
    assert bias is None and gate_up_bias is None
    assert qkv.shape[0] == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert attn.k_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
    torch.testing.assert_close(qkv[: attn.q_proj.out_features], attn.q_proj.weight, rtol=0, atol=0)
    again = fuse_projections(layer)
    assert again[0][0].data_ptr() == qkv.data_ptr() and again[1][0].data_ptr() == gate_up.data_ptr()
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)


def test_remembered_block_checks_follow_a_changed_model():
    """`supported` and `fuse_projections` are remembered per model and block, and answer again when the blocks
    change: a cast model gets stacked weights of its new dtype (views of its own), a block with a forward of its
    own (compiled) sends the model to its own forward, and a projection set to train is no longer stacked."""
    from core.models import tiny_llama
    from core.tuning.blocks import fuse_projections, supported

    model = tiny_llama().model
    layer = model.model.layers[0]
    assert supported(model) and fuse_projections(layer)[0][0].dtype == torch.float32
    model.to(torch.bfloat16)
    (qkv, _), (gate_up, _) = fuse_projections(layer)
    assert qkv.dtype == gate_up.dtype == torch.bfloat16
    assert layer.self_attn.k_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    layer.forward = layer.forward  # what torch.compile(layer) in place leaves
    assert not supported(model)
    del layer.forward
    assert supported(model)
    layer.mlp.up_proj.weight.requires_grad_(True)
    assert fuse_projections(layer)[1] is None and fuse_projections(layer)[0] is not None


@pytest.mark.parametrize("method", ["soft", "deep"])
def test_resume_equals_uninterrupted(tiny_lm, tmp_path, method):
    init = {k: v[:4] for k, v in _init(method, tiny_lm).items()}
    straight = train(tiny_lm, _config(method=method, steps=6), tmp_path / "a", init=init, examples=DATA)
    cancel = threading.Event()

    def stop_at_3(progress) -> None:
        if progress.step == 3:
            cancel.set()

    part = train(tiny_lm, _config(method=method, steps=6), tmp_path / "b", init=init, examples=DATA,
                 on_progress=stop_at_3, cancel=cancel)
    assert part.status == "cancelled" and part.history[-1]["step"] == 3
    resumed = train(tiny_lm, _config(method=method, steps=6), tmp_path / "b", examples=DATA, resume=True)
    assert resumed.status == "done"
    for name in straight.prompt:
        assert torch.equal(straight.prompt[name], resumed.prompt[name]), name
    assert straight.history == resumed.history


def test_resume_with_other_config_is_refused(tiny_lm, tmp_path):
    init = {"soft": _init("soft", tiny_lm)["soft"][:4]}
    train(tiny_lm, _config(steps=2), tmp_path / "r", init=init, examples=DATA)
    with pytest.raises(ValueError, match="cannot resume .* its config differs in .*lr"):
        train(tiny_lm, _config(steps=2, lr=0.5), tmp_path / "r", examples=DATA, resume=True)


def test_nonfinite_loss_stops_and_keeps_run(tiny_lm, tmp_path):
    bad = torch.full((4, tiny_lm.hidden_size), float("inf"))
    result = train(tiny_lm, _config(steps=3), tmp_path / "nan", init={"soft": bad}, examples=DATA)
    assert result.status == "diverged" and "diverged at step 1" in result.message
    assert "non-finite training loss" in result.message and "Lower the learning rate" in result.message
    assert (tmp_path / "nan" / "prompt.safetensors").exists()


def test_bf16_compute_trains(tiny_lm, tmp_path):
    init = {"soft": _init("soft", tiny_lm)["soft"][:4]}
    result = train(tiny_lm, _config(steps=2, compute="bf16"), tmp_path / "bf", init=init, examples=DATA)
    assert result.status == "done" and all(torch.isfinite(v).all() for v in result.prompt.values())
    shadow = tiny_lm.extra["bf16_shadow"]
    assert next(shadow.parameters()).dtype == torch.bfloat16
    assert shadow.lm_head.weight is shadow.model.embed_tokens.weight  # ties survive the copy


def test_config_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="lora")
    with pytest.raises(ValueError, match=r"dataset must be one of .* \(c4 is plain text"):
        TrainConfig(dataset="c4")
    with pytest.raises(ValueError, match="layers only apply to --method deep"):
        TrainConfig(method="soft", layers=[1])
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="compute must be one of"):
        TrainConfig(compute="fp16")


def test_bad_init_shape_and_mismatched_tensors(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match=r"initial sample 'soft' has shape \(3, 64\); this prompt needs \(4, 64\)"):
        train(tiny_lm, _config(), tmp_path / "x", init=torch.zeros(3, 64), examples=DATA)
    prompt = build_prompt("soft", 64, 4, n_tokens=4)
    with pytest.raises(ValueError, match="do not match this soft prompt"):
        prompt.load_tensors({"soft": torch.zeros(4, 64), "deep.3": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="unknown method"):
        build_prompt("prefix", 64, 4)


def _manual_greedy(lm, prompt, text: str, n_new: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache, no padding): the reference for `generate`."""
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    out = []
    with torch.no_grad(), (prompt.hooks(lm.model) if prompt else torch.no_grad()):
        for _ in range(n_new):
            embeds = lm.model.model.embed_tokens(torch.tensor([ids + out]))
            if prompt is not None:
                embeds = torch.cat([prompt.prefix(1, embeds.dtype), embeds], 1)
            hidden = lm.model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            out.append(int(lm.model.lm_head(hidden[:, -1]).argmax(-1)))
    return out


@pytest.mark.parametrize("method", [None, "soft", "deep"])
def test_generate_matches_uncached_unpadded_decoding(tiny_lm, method):
    prompt = None
    if method:
        prompt = build_prompt(method, tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=4)
        prompt.load_tensors({k: v[:4] for k, v in _init(method, tiny_lm, seed=3).items()})
    texts = ["Question: What is 2 plus 2?\nAnswer:", "Q: " + "a long one " * 6 + "?\nAnswer:"]
    got = generate(tiny_lm, texts, prompt, max_new_tokens=5, compute="fp32", stop="\x00")
    for text, pred in zip(texts, got, strict=True):
        want = tiny_lm.tokenizer.decode(_manual_greedy(tiny_lm, prompt, text, 5), skip_special_tokens=True)
        assert pred == want.split("\x00")[0].strip()


def test_generate_rejects_zero_tokens(tiny_lm):
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(tiny_lm, ["x"], max_new_tokens=0)


def test_evaluation_metrics_keys(tiny_lm):
    from core.evaluation import evaluate

    exact = evaluate(tiny_lm, "math", DATA[2], max_new_tokens=3, compute="fp32")
    assert exact["n"] == 4 and 0.0 <= exact["accuracy"] <= 1.0 and len(exact["shown"]) == 4
    qa = [SimpleNamespace(prompt="Paris is in France.\nQuestion: Where is Paris?\nAnswer:", target=" France",
                          answers=["France", "in France"], meta={})]
    scores = evaluate(tiny_lm, "squad", qa, max_new_tokens=3, compute="fp32")
    assert set(scores) >= {"n", "exact_match", "f1"}


@pytest.mark.integration
def test_short_real_run_lowers_validation_loss(real_lm, tmp_path):
    config = TrainConfig(method="soft", dataset="math", prior="gaussian", lr=3e-2, steps=8, batch_size=8,
                         n_train=64, n_val=16, val_every=8, eval_n=0)  # compute "auto", as a user gets
    result = train(real_lm, config, tmp_path / "real")
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert result.status == "done" and last < first, (first, last)


def test_deep_layers_draw_from_the_prior_fitted_at_their_own_layer(tiny_lm, tmp_path):
    config = _config(method="deep", steps=1, prior="fitted", prior_params={"source": "math", "n_docs": 8},
                     layers=[1, 3])
    result = train(tiny_lm, config, tmp_path / "fit", examples=DATA)
    saved = json.loads((tmp_path / "fit" / "run.json").read_text())["config"]
    assert saved["deep_prior_layers"] == {"deep.1": 1, "deep.3": 3}
    snaps = load_run(tmp_path / "fit").snapshots
    norms = {k: float(v[0].norm(dim=-1).mean()) for k, v in snaps.items()}
    assert norms["deep.3"] != pytest.approx(norms["deep.1"], rel=1e-3)  # different clouds, different scales
    assert result.status == "done"


def test_int8_base_model_trains_and_stays_identical(tiny_lm, tmp_path):
    pytest.importorskip("bitsandbytes")
    from core.models import load_model

    tiny_lm.model.save_pretrained(tmp_path / "base")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "base")
    lm = load_model(str(tmp_path / "base"), precision="int8", device="cpu")
    assert type(lm.model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = train(lm, _config(method="deep", steps=2, compute="bf16"), tmp_path / "int8", examples=DATA,
                   init={k: v[:4] for k, v in _init("deep", lm).items()})
    assert result.status == "done" and result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


@pytest.mark.integration  # not the real model, but compiling takes about a minute on 2 shared cores
def test_compiled_training_matches_eager(tiny_lm, tmp_path):
    init = {k: v[:4] for k, v in _init("deep", tiny_lm).items()}
    runs = [train(tiny_lm, _config(method="deep", steps=2, compute="bf16", compile=flag), tmp_path / str(flag),
                  init=init, examples=DATA) for flag in (False, True)]
    eager, compiled = ([h["train_loss"] for h in r.history[1:]] for r in runs)
    assert compiled == pytest.approx(eager, rel=2e-2)  # bf16 kernels differ in rounding only


def test_compile_needs_bf16():
    with pytest.raises(ValueError, match="compile needs compute 'bf16'"):
        TrainConfig(compile=True, compute="fp32")


def test_resume_a_run_drawn_from_a_named_prior(tiny_lm, tmp_path):
    config = _config(steps=4, prior="gaussian", prior_params={"sigma": 0.1})
    straight = train(tiny_lm, config, tmp_path / "a", examples=DATA)
    cancel = threading.Event()
    train(tiny_lm, _config(steps=4, prior="gaussian", prior_params={"sigma": 0.1}), tmp_path / "b", examples=DATA,
          cancel=cancel, on_progress=lambda p: cancel.set() if p.step == 2 else None)
    resumed = train(tiny_lm, _config(steps=4, prior="gaussian", prior_params={"sigma": 0.1}), tmp_path / "b",
                    examples=DATA, resume=True)
    assert torch.equal(straight.prompt["soft"], resumed.prompt["soft"])
    saved = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert saved["prior"] == "gaussian" and saved["prior_params"]["name"] == "gaussian"


def test_bf16_base_model_trains(tiny_lm, tmp_path):
    import copy
    import dataclasses

    lm = dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).to(torch.bfloat16), precision="bf16",
                             fingerprint=tiny_lm.fingerprint.replace(":fp32", ":bf16"), extra={})
    result = train(lm, _config(steps=2, compute="bf16"), tmp_path / "bf16", examples=DATA,
                   init={"soft": _init("soft", lm)["soft"][:4]})
    assert result.status == "done" and "bf16_shadow" not in lm.extra  # a bf16 model is used as it is
    assert result.prompt["soft"].dtype == torch.float32  # the trained prompt stays an fp32 master copy
    with pytest.raises(ValueError, match="compute 'fp32' needs an fp32 or int8 model"):
        train(lm, _config(steps=1, compute="fp32"), tmp_path / "bad", examples=DATA)
