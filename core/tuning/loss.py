"""The forward pass that scores answer tokens only, with logits only where the loss needs them."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.tuning import blocks
from core.tuning import packed as packing
from core.tuning.base import PromptModule
from core.tuning.batches import Batch

# On CPU, the fused (flash) SDPA kernel's backward costs ~10x its forward on short sequences, where the plain
# math kernel is ~1.4x faster per step (8 x 46 positions, bf16); from ~300 positions on, the fused one wins (~2x).
# This is the hooked forward's choice; the block loop (core.tuning.blocks) runs its own CPU attention, faster at
# every length (blocks.CausalAttention).
CPU_MATH_ATTENTION_MAX_LEN = 128


def attention_backend(device: torch.device, length: int):  # noqa: ANN201 - a context manager
    """The SDPA kernel choice for a training forward of `length` positions (measured, see above)."""
    if device.type == "cpu" and length <= CPU_MATH_ATTENTION_MAX_LEN:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


# Sharing the prompt's keys/values saves its positions' work in B-1 of B rows, but the token pass then needs an
# explicit mask (its queries start after the cached prompt), which is slower than the purely causal kernel on long
# sequences: QA at ~600 tokens (prompt 3%) was no faster shared, MATH at ~26 (prompt 43%) was 1.4x faster.
MIN_SHARED_PREFIX_SHARE = 0.15


def _autocast(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN202 - a context manager
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def shares_prefix(n_prefix: int, batch_size: int, length: int) -> bool:
    """Is a prefix of `n_prefix` vectors before `length` tokens in `batch_size` rows worth computing once per batch?"""
    return batch_size > 1 and n_prefix >= MIN_SHARED_PREFIX_SHARE * (n_prefix + length)


def answer_loss(model: nn.Module, prompt: PromptModule | None, batch: Batch,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's answer tokens (a scalar; divide by `batch.n_answer` for the mean).

    model: a LLaMA-style causal LM (`model.model` the decoder, `model.lm_head` the head).
    Only the N rows that predict an answer token go through the head, [N, V]: never [B, T, V]. LLaMA-style
    blocks with a soft or deep prompt (or none) run as one loop over the blocks (core.tuning.blocks: the
    prompt's rows once per batch, fused projections); other models and prompts run the model's own forward
    with the prompt's hooks (`hooked_answer_loss`, the same numbers).
    """
    vectors = {} if prompt is None else prompt.block_vectors(model)
    if batch.residual is not None and prompt is not None and prompt.n_prefix:
        raise ValueError("a cached residual stream cannot take a token-level prompt: train deep prompts with "
                         "soft=False (--no-soft), or drop the cached residuals")
    if vectors is None or not blocks.supported(model):
        return hooked_answer_loss(model, prompt, batch, autocast_dtype)
    device = batch.input_ids.device
    amp = _autocast(device, autocast_dtype)
    with amp:
        if batch.residual is not None:  # the cached stream entering block `start_layer` (core.tuning.cached)
            hidden = batch.residual
        else:
            hidden = model.model.embed_tokens(batch.input_ids)  # [B, T, d]
        dtype = hidden.dtype
        prefix = prompt.prefix(1, dtype)[0] if prompt is not None and prompt.n_prefix else None  # [S, d]
        deep = {index: v.to(dtype) for index, v in vectors.items()}
        # the tokens every row begins with are rows the block loop runs once, like the soft prompt after which
        # they come (row 0's: in a cached residual stream the rows of equal tokens differ by rounding at most)
        common = common_token_prefix(batch)
        first, first_prefix = batch.first_attention, None  # block start's token attention, cached with `residual`
        if common:
            prefix = hidden[0, :common] if prefix is None else torch.cat([prefix, hidden[0, :common]])
            hidden = hidden[:, common:]
            if first is not None:
                first_prefix = first.slice(0, common).rows(torch.arange(common, device=device))  # row 0's [common]
                first = first.slice(common)
        # position p predicts token p+1: the answer token at column c is read from column c-1
        rows = blocks.answer_rows(model, hidden, batch.start_layer, prefix, deep, batch.rows,
                                  batch.cols - 1 - common, first, first_prefix)
        if not fused_head(model.lm_head, rows, batch.labels):
            logits = model.lm_head(rows)  # [N, V]
            return F.cross_entropy(logits.float(), batch.labels, reduction="sum")
    want_grad = torch.is_grad_enabled() and rows.requires_grad
    return LinearCrossEntropy.apply(rows, model.lm_head, batch.labels, want_grad)


def common_token_prefix(batch: Batch) -> int:
    """How many leading tokens every row of the batch has in common, up to its first read position (a row's
    first answer token is read from the column before it). 0 for a single row."""
    if batch.cols.numel() == 0:
        return 0
    return blocks.shared_leading_tokens(batch.input_ids, int(batch.cols.min()) - 1)


# Vocabulary rows per chunk of `LinearCrossEntropy` where the head is packed for oneDNN (`_packed_head`: fp32 and
# bf16 on CPU builds with oneDNN). SmolLM2's head, loss and gradient, bf16, 2 threads of a Zen 4, interleaved in one
# process: 24 rows 11.9 ms at 8192, 10.9 at 12288, 10.7 at 16384; 240 rows 76.4, 76.6, 75.4. One pass over the whole
# vocabulary (softmax of all logits, then one product) took 10.1-10.5 ms on 24 rows but 113-119 on 240.
PACKED_HEAD_CHUNK = 16384
# Unpacked (no oneDNN): rows per chunk (256 x 576 fp32 weights, 590 KB, stay in a core's L2 between the chunk's two
# products) and chunks per batched product (at least one per thread). SmolLM2's head on 24 answer rows, loss and
# gradient (fp32, 2 AVX2 threads): 256 x 8 26.7 ms, 1024 x 2 27.5, 1024 one chunk at a time 32.3.
HEAD_CHUNK = 256
HEAD_GROUP = 8


def _packed_head(head: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The frozen head's weight in chunks of `PACKED_HEAD_CHUNK` vocabulary rows, as (chunk, its transpose) packed
    for oneDNN's linear (`core.tuning.packed`, kept with `head`), or None where this torch build, CPU or dtype
    cannot. The same numbers as the plain products (bit for bit in bf16 here, within fp32 rounding in fp32)
    at a higher rate on the thin [N, d] x [d, C] products of a step's few answer rows: SmolLM2's head on 24 rows in
    bf16, logits 3.9 -> 2.9 ms and the gradient's `probs @ W` 4.5 -> 2.4 ms (Zen 5). Costs twice the weight's memory
    (113 MB for SmolLM2 in bf16, 226 in fp32) for as long as the model lives; a changed or moved weight is packed
    again."""
    if not packing.ENABLED:
        return None
    chunks = []
    for index, chunk in enumerate(head.weight.detach().split(PACKED_HEAD_CHUNK)):
        entry = packing.packed(head, f"head_chunk{PACKED_HEAD_CHUNK}_{index}", chunk)
        transposed = None if entry is None else entry.transposed()
        if transposed is None:
            return None  # this CPU or dtype cannot (remembered by `packing.packed`, not tried every step)
        chunks.append((entry.forward, transposed))
    return chunks


def fused_head(head: nn.Module, rows: torch.Tensor, labels: torch.Tensor) -> bool:
    """Does the loss on `rows` go through `LinearCrossEntropy` (CPU, a plain frozen bias-free head in the rows'
    dtype, every label a token), rather than logits then cross-entropy (CUDA, and every other head)?"""
    return (rows.device.type == "cpu" and type(head) is nn.Linear and head.bias is None
            and not head.weight.requires_grad and head.weight.dtype == rows.dtype and bool((labels >= 0).all()))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `head(rows)` = `rows @ weight.T` [N, V] (a frozen bias-free nn.Linear,
    see `fused_head`) against `labels` [N], and its gradient with respect to `rows`, in one pass over the vocabulary
    in chunks of the weight: the gradient is ready at the end of the forward (the weight gets none, a frozen head),
    and the backward only scales it. `want_grad` False (validation, no grad) skips the gradient's products. Numbers
    are those of `cross_entropy(rows @ weight.T, labels, "sum")` (logits in the rows' dtype, softmax in fp32) up to
    float rounding.

    On the few answer rows a step scores (~24 on MATH) the head's two products, logits forward and `dlogits @ W`
    backward, each read the whole 49,152 x 576 weight and ran at half the matmul rate (27 and 23 ms in a 110 ms
    cached deep step in fp32 on 2 AVX2 cores). Here each chunk's share of the gradient, `softmax @ W`, is taken
    while the chunk is still in cache, and the chunks are joined by their log-sum-exps (as flash attention joins
    blocks of keys): packed for oneDNN (`_packed_chunks`) or, without oneDNN, batched products of plain
    chunks folded into a running log-sum-exp (`_plain_chunks`).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, head: nn.Linear, labels: torch.Tensor,  # noqa: ANN001
                want_grad: bool) -> torch.Tensor:
        weight = head.weight.detach()
        if rows.shape[0] == 0:  # no answer rows: nothing to score
            lse, mixed = rows.new_zeros(0, dtype=torch.float32), rows.new_zeros(rows.shape, dtype=torch.float32)
        else:
            packed = _packed_head(head)
            lse, mixed = (_packed_chunks(rows, packed, want_grad) if packed is not None
                          else _plain_chunks(rows, weight, want_grad))
        target = weight[labels]  # [N, d]
        target_logits = (rows.float() * target.float()).sum(dim=1).to(rows.dtype).float()  # [N], rounded as logits are
        loss = (lse - target_logits).sum()
        if want_grad:
            ctx.save_for_backward((mixed - target.float()).to(rows.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple:  # noqa: ANN001
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_loss.to(grad_rows.dtype), None, None, None


def _packed_chunks(rows: torch.Tensor, packed: list[tuple[torch.Tensor, torch.Tensor]],
                   want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits' log-sum-exp [N] and `softmax(logits) @ W` [N, d] (fp32; None without `want_grad`) over the packed
    chunks of `_packed_head`: each chunk's softmax in one fused op, its share of the product, then the chunks
    weighted by their share of the total."""
    lses, shares = [], []
    for forward, transposed in packed:
        logits = packing.product(rows, forward)  # [N, C] in the rows' dtype, rounded as the head's logits are
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        # the chunk's log-sum-exp: its top logit's probability is 1 / sum(exp(logit - top)), at least 1 / C
        lses.append(logits.amax(dim=1, keepdim=True).float() - probs.amax(dim=1, keepdim=True).log())
        if want_grad:
            shares.append(packing.product(probs.to(rows.dtype), transposed))  # [N, d]
    chunk_lse = torch.cat(lses, dim=1)  # [N, chunks]
    lse = torch.logsumexp(chunk_lse, dim=1)
    if not want_grad:
        return lse, None
    weights = torch.exp(chunk_lse - lse[:, None])  # [N, chunks], each chunk's share of the softmax
    mixed = weights[:, :1] * shares[0].float()
    for index in range(1, len(shares)):
        mixed = mixed + weights[:, index: index + 1] * shares[index].float()
    return lse, mixed


def _plain_chunks(rows: torch.Tensor, weight: torch.Tensor,
                  want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_packed_chunks` without oneDNN: `HEAD_GROUP` chunks of `HEAD_CHUNK` rows at a time, one batched product
    each way, every thread taking chunks of its own (a thin [N, C] product split across threads is slower), folded
    into a running log-sum-exp."""
    n, vocab = rows.shape[0], weight.shape[0]
    running_max = torch.full((n, 1), float("-inf"), device=rows.device)
    total = torch.zeros(n, 1, device=rows.device)  # sum of exp(logit - running_max)
    mixed = torch.zeros(n, rows.shape[1], device=rows.device) if want_grad else None  # sum of exp(...) * w_v
    size, group = HEAD_CHUNK, max(HEAD_GROUP, torch.get_num_threads())
    step = group * size
    for start in range(0, vocab, step):
        chunk = weight[start: start + step]
        if chunk.shape[0] == step:
            chunk = chunk.view(group, size, -1)  # [G, C, d]
        else:  # the vocabulary's last, partial group: one chunk
            chunk = chunk.unsqueeze(0)  # [1, C', d]
        logits = torch.bmm(rows.expand(chunk.shape[0], -1, -1), chunk.transpose(1, 2))  # [G, N, C]
        logits = logits.float()  # rounded as the head's logits are
        new_max = torch.maximum(running_max, logits.amax(dim=(0, 2))[:, None])
        rescale = torch.exp(running_max - new_max)
        probs = torch.exp(logits - new_max)
        total = total * rescale + probs.sum(dim=(0, 2))[:, None]
        if want_grad:
            share = torch.bmm(probs.to(chunk.dtype), chunk).sum(dim=0, dtype=torch.float32)  # [N, d]
            mixed = mixed * rescale + share
        running_max = new_max
    lse = running_max.squeeze(1) + torch.log(total.squeeze(1))
    return lse, (mixed / total if want_grad else None)


def hooked_answer_loss(model: nn.Module, prompt: PromptModule | None, batch: Batch,
                       autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`answer_loss` through the model's own forward, with the prompt's hooks: any causal LM and prompt."""
    decoder = model.model
    device = batch.input_ids.device
    amp = _autocast(device, autocast_dtype)
    hooks = prompt.hooks(model) if prompt is not None else contextlib.nullcontext()
    if batch.residual is not None:  # deep prompts only, from the cached stream entering block `start_layer`
        from core.tuning.cached import forward_from_layer

        with hooks, amp, attention_backend(device, batch.residual.shape[1]):
            hidden = forward_from_layer(model, batch.residual, batch.start_layer)  # [B, T, d]
            logits = model.lm_head(hidden[batch.rows, batch.cols - 1])  # [N, V]
        return F.cross_entropy(logits.float(), batch.labels, reduction="sum")
    embeds = decoder.embed_tokens(batch.input_ids)  # [B, T, d]
    if prompt is not None and prompt.prefix_only and shares_prefix(prompt.n_prefix, embeds.shape[0], embeds.shape[1]):
        with amp:
            hidden = _shared_prefix_forward(decoder, prompt, embeds)
            if hidden is not None:  # [B, T, d]: column c predicts token c+1, as without a prompt
                logits = model.lm_head(hidden[batch.rows, batch.cols - 1])  # [N, V]
                return F.cross_entropy(logits.float(), batch.labels, reduction="sum")
    n = 0
    if prompt is not None:
        n = prompt.n_prefix
        embeds = torch.cat([prompt.prefix(embeds.shape[0], embeds.dtype), embeds], dim=1)  # [B, n+T, d]
    with hooks, amp, attention_backend(device, embeds.shape[1]):
        hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, n+T, d], final norm applied
        # position p predicts token p+1: the answer token at column c is read from column n+c-1
        rows = hidden[batch.rows, batch.cols + n - 1]  # [N, d]
        logits = model.lm_head(rows)  # [N, V]
    return F.cross_entropy(logits.float(), batch.labels, reduction="sum")


def _shared_prefix_forward(decoder: nn.Module, prompt: PromptModule, embeds: torch.Tensor) -> torch.Tensor | None:
    """The decoder's last hidden states [B, T, d] of the tokens after a prompt that enters only as a prefix.

    Every row's prefix is the same vectors, and causal attention keeps the prefix from seeing the tokens after
    it, so its keys and values at every layer are the same in every row: they are computed once, with
    gradients, and shared by the B rows through the model's own KV cache (B-fold less work on the prompt's
    positions; a 20-vector prompt is ~40% of an 8 x 46-token MATH batch). Positions, masks and the result
    are those of the concatenated sequence. None where this transformers version's cache cannot be shared
    this way (the caller then runs the concatenated sequence).
    """
    batch_size, length = embeds.shape[:2]
    prefix = prompt.prefix(1, embeds.dtype)  # [1, n, d]
    cache = decoder(inputs_embeds=prefix, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers):
        return None
    for layer in layers:  # [1, heads, n, head_dim] -> a view of B rows (each layer's update concatenates a copy)
        layer.keys = layer.keys.expand(batch_size, -1, -1, -1)
        layer.values = layer.values.expand(batch_size, -1, -1, -1)
    with attention_backend(embeds.device, prefix.shape[1] + length):
        return decoder(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
