"""The training forward of a LLaMA-style decoder with prompts, as one loop over its blocks.

`answer_rows` gives the final-normed hidden states the loss reads, with the numbers of the model's own
forward (a soft prompt concatenated before the tokens; deep vectors prepended by core.tuning.deep's hooks)
and less work:
- the soft prompt is the same in every row and causal attention keeps it from seeing the tokens, so its
  rows go through each block once, not once per row; they are stacked with the token rows, so each
  projection is one matrix product over prompt and tokens (the separate 20-row products ran at half the
  rate on CPU). The tokens every row of a batch begins with (a template's "Question:") are the same kind of
  rows: they come after the soft prompt in the prefix and also go through once;
- a block's deep vectors [n, d] only serve as keys and values there (their outputs are cut), and they are
  the same in every row: their keys and values are computed once, not their attention or MLP;
- q/k/v and gate/up are each one product against weights stored side by side (`fuse_projections`), and
  RoPE turns q and k once, on the stacked rows;
- on CPU attention is written out in chunks of queries with its own backward (`CausalAttention`);
  CUDA uses SDPA;
- in the last block only the positions the loss reads need a query, an attention output and the MLP.
Positions follow the hooks: in a block with n deep vectors those take 0..n-1 and the sequence (soft
prompt, then tokens) n.. onwards. Training pads on the right and passes no mask: attention is causal.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.tuning.packed import linear, module_linear

_FUSE_LOCK = threading.Lock()  # two jobs on one model (the dashboard) must not both restack its weights


def llama_block(layer: nn.Module) -> bool:
    """Is `layer` a LLaMA-style block (pre-norm attention with q/k/v/o projections and RoPE, then an MLP),
    run by its own `forward` (a block whose forward was replaced, e.g. compiled, runs as the model runs it)?"""
    attn = getattr(layer, "self_attn", None)
    return (attn is not None and all(hasattr(attn, x) for x in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
            and not hasattr(attn, "q_norm") and not hasattr(attn, "sliding_window")
            and all(hasattr(layer, x) for x in ("input_layernorm", "post_attention_layernorm", "mlp"))
            and "forward" not in vars(layer))


# model -> (its blocks' identities and forward overrides, `supported`'s answer for them): asked every training step,
# and the ~30 `llama_block` checks of a 30-block model took 0.9 ms of a 160 ms cached deep step (2 Zen 1 threads)
_SUPPORTED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, bool]] = weakref.WeakKeyDictionary()


def supported(model: nn.Module) -> bool:
    """Can `answer_rows` run this model's blocks (else the model's own forward, with the prompt's hooks)? LLaMA
    models only: other decoders with LLaMA-shaped blocks may do more in their own forward (Gemma scales the
    embeddings and adds one to its norms' weights). Remembered per model until a block is replaced or gets a
    forward of its own (compiled)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return False
    layers = model.model.layers
    shape = tuple((id(layer), "forward" in vars(layer)) for layer in layers)
    known = _SUPPORTED.get(model)
    if known is not None and known[0] == shape:
        return known[1]
    answer = all(llama_block(layer) for layer in layers)
    _SUPPORTED[model] = (shape, answer)
    return answer


# Norms whose forward is exactly `weight * rms_norm(x in fp32).to(x.dtype)`. `_norm` computes that with a backward
# of its own where the weight is frozen (`FrozenRMSNorm`; bf16 on 2 Zen 1 threads, forward and backward: 5280 rows
# 25.4 -> 20.1 ms, 148 rows 1.27 -> 0.83), else as F.rms_norm's one op (11 vs 30 ms for the module, bit-identical).
_PLAIN_RMS_NORMS = ("LlamaRMSNorm",)


# torch's one-op RMS norm that also returns 1/rms (for the backward); absent from older torch builds
_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`weight * rms_norm(x in fp32).to(x.dtype)`, rstd [..., 1] in fp32 or float64) for `weight` in x's dtype. Fp32
    and float64 on CPU through `_fused_rms_norm`, one op with the same numbers (20 rows of 576 on 2 Zen 1 threads: 58
    against 119 us for the three below; CUDA, where it was never measured, keeps the three); bf16 rounds `x * rstd`
    to bf16 before the weight, as the model does."""
    if _FUSED_RMS_NORM is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _FUSED_RMS_NORM(x, [x.shape[-1]], weight, eps)
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(torch.linalg.vecdot(x32, x32).unsqueeze(-1) / x.shape[-1] + eps)  # [..., 1]
    return torch.mul(x32, rstd).to(x.dtype).mul_(weight), rstd


class FrozenRMSNorm(torch.autograd.Function):
    """`weight * rms_norm(x in fp32).to(x.dtype)` for a frozen `weight` [d] over x [..., d], with a backward of four
    passes over x (the gradient of `F.rms_norm` is its composite ops' chain, ~10 passes): grad_x = rstd * (g w -
    x * rstd^2 * mean(g w x)), in fp32 (float64 stays float64). Fp32, 2 AVX2 threads (Zen 1), forward and backward:
    4286 rows of 576 21.1 -> 12.7 ms, 148 rows 0.70 -> 0.54 ms. `weight` has x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        out, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(rstd.dtype)
        grad_w = (grad * weight).to(rstd.dtype)  # rounded in x's dtype first, as the product's gradient is
        coef = torch.linalg.vecdot(grad_w, x32).unsqueeze_(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        return torch.addcmul(grad_w.mul_(rstd), x32, coef, value=-1).to(x.dtype), None, None


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(norm).__name__ not in _PLAIN_RMS_NORMS:
        return norm(x)
    if not norm.weight.requires_grad and norm.weight.dtype == x.dtype:
        if not (x.requires_grad and torch.is_grad_enabled()):  # nothing to keep for a backward (frozen layers)
            return _rms_forward(x, norm.weight, norm.variance_epsilon)[0]
        return FrozenRMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


def _plain(*modules: nn.Module) -> bool:
    return all(type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters()) for m in modules)


def _side_by_side(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the row-blocks `parts` are consecutive views of (one storage), or None."""
    base = parts[0]
    storage = base.untyped_storage().data_ptr()
    offset = base.storage_offset()
    for p in parts:
        if (not p.is_contiguous() or p.dtype != base.dtype or p.device != base.device
                or p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset):
            return None  # tensors that merely sit next to each other in memory are not one tensor
        offset += p.numel()
    return base.as_strided((sum(p.shape[0] for p in parts), *base.shape[1:]), base.stride(), base.storage_offset())


def _stack(modules: list[nn.Module | None]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias or None) of plain frozen `nn.Linear`s as if they were one, their outputs side by side; None
    where they are not (e.g. int8, or only some biased). The first call stores the weights (and biases) side by
    side and makes the modules' own tensors views into them: the model computes as before, with no second copy."""
    if any(m is None for m in modules) or not _plain(*modules) or len({m.bias is None for m in modules}) > 1:
        return None
    stacked = []
    for name in ("weight", "bias"):
        if getattr(modules[0], name) is None:
            stacked.append(None)
            continue
        tensor = _side_by_side([getattr(m, name) for m in modules])
        if tensor is None:  # first use (or the model moved)
            tensor = torch.cat([getattr(m, name).detach() for m in modules])
            start = 0
            for m in modules:
                size = getattr(m, name).shape[0]
                setattr(m, name, nn.Parameter(tensor[start: start + size], requires_grad=False))
                start += size
        stacked.append(tensor)
    return stacked[0], stacked[1]


# block -> (what its fused products were made from, the fused products): the checks of `_stack` took 135 us per
# block per step (2 Zen 1 threads), 4 ms of an uncached 30-block step
_FUSED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple]] = weakref.WeakKeyDictionary()


def _projection_state(modules: list[nn.Module | None]) -> tuple:
    """What `_stack`'s answer depends on: each module and its class, and each of its tensors (identity, storage,
    trainable). Not their values: the fused products are views of the modules' own storage."""
    state = []
    for m in modules:
        if m is None:
            state.append(None)
            continue
        weight, bias = (getattr(m, name, None) for name in ("weight", "bias"))
        state.append((id(m), type(m), *(None if t is None else (id(t), t.data_ptr(), t.requires_grad)
                                        for t in (weight, bias))))
    return tuple(state)


def fuse_projections(layer: nn.Module) -> tuple[tuple | None, tuple | None]:
    """((weight, bias) of q|k|v, (weight, bias) of gate|up) of a frozen block, each pair one product (`_stack`);
    None for a group whose modules are called one by one. Remembered per block until one of its projections or
    their tensors changes (moved, cast, replaced, set to train)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)])
    state = _projection_state([*groups[0], *groups[1]])
    with _FUSE_LOCK:
        known = _FUSED.get(layer)
        if known is not None and known[0] == state:
            return known[1]
        fused = (_stack(groups[0]), _stack(groups[1]))
        # the first `_stack` makes the modules' tensors views of the stacked ones: remember their state after it
        _FUSED[layer] = (_projection_state([*groups[0], *groups[1]]), fused)
        return fused


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, heads, dh] rotated at each row's position (cos and signed sin [R, 1, dh] from `_row_rotary`):
    transformers' x * cos + rotate_half(x) * sin, with rotate_half's signs folded into sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _project(attn: nn.Module, x: torch.Tensor, qkv: tuple | None, cos: torch.Tensor, sin: torch.Tensor,
             query_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked rows x [R, d] -> q [R, H, dh] and k [R, KV, dh] with RoPE at each row's position (cos and signed
    sin [R, 1, dh] from `_row_rotary`; q and k rotated as one tensor), and v [R, KV, dh]. With `query_rows` [R']
    (the last block's reads) q is taken at those rows only, [R', H, dh]."""
    rows, head_dim = x.shape[0], attn.head_dim
    if query_rows is not None:
        heads = attn.q_proj.out_features // head_dim  # not -1 in the view: no query rows is allowed
        q = module_linear(attn.q_proj, x.index_select(0, query_rows)).view(len(query_rows), heads, head_dim)
        if qkv is None:
            k, v = module_linear(attn.k_proj, x), module_linear(attn.v_proj, x)
        else:  # k|v rows of the stacked weight: one product
            weight, bias = (None if t is None else t[attn.q_proj.out_features:] for t in qkv)
            kv = linear(attn, "kv", x, weight, bias)
            k, v = kv.split([attn.k_proj.out_features, attn.v_proj.out_features], dim=1)
        k, v = k.view(rows, -1, head_dim), v.view(rows, -1, head_dim)
        q = _rope(q, cos.index_select(0, query_rows), sin.index_select(0, query_rows))
        return q, _rope(k, cos, sin), v
    if qkv is None:
        qk = torch.cat([module_linear(attn.q_proj, x), module_linear(attn.k_proj, x)], dim=-1).view(rows, -1, head_dim)
        v = module_linear(attn.v_proj, x).view(rows, -1, head_dim)
    else:
        out = linear(attn, "qkv", x, *qkv)  # [R, (H + 2 KV) dh]
        split = attn.q_proj.out_features + attn.k_proj.out_features
        # split, not two slices: its backward is one cat, where each slice's fills a zero tensor of the whole
        qk, v = (part.view(rows, -1, head_dim) for part in out.split([split, out.shape[1] - split], dim=1))
    qk = _rope(qk, cos, sin)
    heads = attn.q_proj.out_features // head_dim
    q, k = qk.split([heads, qk.shape[1] - heads], dim=1)
    return q, k, v


def _row_rotary(decoder: nn.Module, h: torch.Tensor, n: int, shared: int,
                token_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin [R, 1, dh] for stacked rows [n deep, S prompt, P tokens] at positions 0..n+S-1, then n+S+t
    for a token at column t (token_pos [P])."""
    positions = torch.cat([torch.arange(n + shared, device=h.device), n + shared + token_pos])
    cos, sin = decoder.rotary_emb(h, position_ids=positions.unsqueeze(0))  # [1, R, dh]
    half = sin.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's signs, folded in once
    return cos[0, :, None], signed_sin[0, :, None]


class GatedSiLU(torch.autograd.Function):
    """silu(gate) * up of the side-by-side gate|up product [..., 2f] -> [..., f], the numbers of the two ops, with a
    backward that writes both halves of the gradient in place (autograd's is two products, silu's backward, then a
    cat of the halves). Fp32, 2 AVX2 threads (Zen 1), forward and backward at 4286 rows of 1536: 55.8 -> 37.6 ms."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


def _mlp(mlp: nn.Module, x: torch.Tensor, gate_up: tuple | None) -> torch.Tensor:
    if gate_up is None:
        return mlp(x)
    both = linear(mlp, "gate_up", x, *gate_up)
    if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"):
        return module_linear(mlp.down_proj, GatedSiLU.apply(both))
    gate, up = both.chunk(2, dim=-1)
    return module_linear(mlp.down_proj, mlp.act_fn(gate) * up)


class _Layout:
    """Where each token row lives. Attention is causal, so a row's tokens after its last read position (the
    padding, and the final token) feed nothing the loss reads: every per-token step (norms, projections, MLP)
    runs on the P kept tokens only, stacked after the S shared prompt rows, and attention gathers them into
    rows of S + W positions (W the longest kept span; a row's slots past its span repeat its last token,
    whose outputs are dropped, so no gradient reaches them). On the QA batches of bench_tuning this leaves out
    ~16% of the positions. The per-row slots hold the rows longest first (`lengths`, non-increasing: S + each
    row's kept span), so a chunk of queries past the shorter rows' spans multiplies only the rows still in it
    (`CausalAttention`).

    hidden rows [B*T] -> kept tokens: `source` [P]; each kept token's column: `column` [P];
    stacked rows [S + P] -> per-row slots [B*(S+W)]: `gather`; per-row slots -> stacked rows: `scatter` [S + P];
    the reads, in the per-row slots' order of rows: `read_rows` [B, A] (stacked token index minus S), `read_at`
    [B, A] columns; read (rows[i], cols[i]) is at [`read_row`[i], `slot`[i]] of those.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, batch: int, length: int, shared: int) -> None:
        device = cols.device
        read_at, self.slot = _read_positions(rows, cols, batch)
        kept = read_at.max(dim=1).values + 1  # [B] each row's positions up to its last read
        first = torch.cumsum(kept, 0) - kept  # [B] each row's first kept token among the P
        row_of = torch.repeat_interleave(torch.arange(batch, device=device), kept)  # [P]
        self.column = torch.arange(len(row_of), device=device) - first[row_of]  # [P]
        self.source = row_of * length + self.column
        order = torch.argsort(kept, descending=True, stable=True)  # per-row slot row i holds batch row order[i]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(batch, device=device)
        self.read_at = read_at[order]  # [B, A]
        self.read_rows = (first[:, None] + read_at)[order]  # [B, A]
        self.read_row = rank[rows]  # [N]
        self.lengths = tuple(int(n) for n in (shared + kept[order]).tolist())
        slots = torch.arange(self.lengths[0] - shared, device=device)  # W
        token_slot = shared + first[:, None] + torch.minimum(slots[None, :], kept[:, None] - 1)  # [B, W]
        prompt_slot = torch.arange(shared, device=device).expand(batch, -1)  # [B, S]
        self.gather = torch.cat([prompt_slot, token_slot[order]], dim=1).reshape(-1)  # [B*(S+W)]
        seq = shared + len(slots)
        self.scatter = torch.cat([torch.arange(shared, device=device),  # the prompt's rows: the first row's
                                  rank[row_of] * seq + shared + self.column])
        self.batch, self.seq = batch, seq

    def per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked rows [S + P, heads, dh] -> [B, heads, S+W, dh]."""
        return x.index_select(0, self.gather).view(self.batch, self.seq, *x.shape[1:]).transpose(1, 2)

    def stacked(self, out: torch.Tensor) -> torch.Tensor:
        """Per-row [B, S+W, ...] -> stacked rows [S + P, ...]."""
        return out.reshape(self.batch * self.seq, *out.shape[2:]).index_select(0, self.scatter)


# Query rows per chunk of the CPU attention: 64 was fastest among 32-256 at 46-660 positions (SmolLM2's heads, bf16,
# 2 threads); a sequence of at most 64 positions is one chunk.
ATTENTION_CHUNK = 64


class CausalAttention(torch.autograd.Function):
    """Grouped-head causal attention on CPU, written out in chunks of query rows, with its own backward.

    q [B, H, Lq, dh], k and v [B, KV, Lk, dh] (H a multiple of KV; query head h reads key-value head h // (H/KV),
    as repeat_kv lays them out), Lk >= Lq: query i sees keys j <= i + Lk - Lq (keys before the sequence, such as
    deep vectors, are seen by every query). Each chunk multiplies only the keys its queries can see, takes the
    softmax in fp32 (stored in the input dtype, as eager attention rounds it) and keeps it for the backward, which
    is then matrix products and one elementwise pass. Forward and backward for 8 rows of 660 positions (9 query /
    3 key-value heads of 64, bf16, 2 threads) take 49 ms against 123 for SDPA's fused kernel, and 1.1 ms against
    4.7 at 46 positions; the price is memory for the probabilities (~30 MB per block at 8 x 660).

    lengths: each row's queries whose outputs are used (its positions up to its last read), non-increasing ([B]
    ints: rows longest first, as `_Layout` orders them), or None for all. A chunk multiplies only the rows that
    reach it: the chunks past a row's length give it zeros and pass no gradient (the keys past length + Lk - Lq,
    seen by those queries alone, get none from them). The QA step of bench_tuning on 2 AVX2 cores (Zen 1): 3.6%
    less on its batch of rows of 406-569 positions, 1.8% over its batches.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,  # noqa: ANN001
                lengths: tuple[int, ...] | None = None) -> torch.Tensor:
        batch, heads, lq, head_dim = q.shape
        kv, lk = k.shape[1], k.shape[2]
        group, offset = heads // kv, lk - lq
        # each chunk's queries i0:i1 and its rows: those whose used queries reach it (a prefix, rows longest first),
        # kept for the backward
        chunks = [(i0, min(i0 + ATTENTION_CHUNK, lq), batch if lengths is None else sum(n > i0 for n in lengths))
                  for i0 in range(0, lq, ATTENTION_CHUNK)]
        with torch.autocast(q.device.type, enabled=False):  # the inputs are already in the compute dtype
            # one copy of each into [B, KV, Lk, dh] rows: the keys and values arrive as views of [B, Lk, KV, dh], and
            # each chunk's product would otherwise copy its slice of them (5 of 38 ms per block at 8 x 588)
            k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
            qs = (q * scale).view(batch, kv, group, lq, head_dim)
            out = torch.empty_like(qs)
            keys_t = k.transpose(-1, -2)
            probs = []
            for i0, i1, rows_in in chunks:
                rows, seen = i1 - i0, i1 + offset
                if rows_in < batch:
                    out[rows_in:, :, :, i0:i1] = 0
                if not rows_in:
                    probs.append(None)
                    continue
                scores = torch.matmul(qs[:rows_in, :, :, i0:i1].reshape(rows_in, kv, group * rows, head_dim),
                                      keys_t[:rows_in, ..., :seen]).view(rows_in, kv, group, rows, seen)
                # only the chunk's last `rows` keys can lie after one of its queries
                future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)
                scores[..., seen - rows:].masked_fill_(future, float("-inf"))
                p = torch.softmax(scores, dim=-1)  # accumulates in fp32 for bf16 too, rounds once
                probs.append(p)
                out[:rows_in, :, :, i0:i1] = torch.matmul(p.view(rows_in, kv, group * rows, seen),
                                                          v[:rows_in, :, :seen]).view(rows_in, kv, group, rows,
                                                                                      head_dim)
        out = out.view(batch, heads, lq, head_dim)
        ctx.save_for_backward(qs, k, v, *probs)
        ctx.scale, ctx.chunks = scale, chunks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # noqa: ANN001
        qs, k, v, *probs = ctx.saved_tensors
        batch, kv, group, lq, head_dim = qs.shape
        lk = k.shape[2]
        offset = lk - lq
        acc = torch.promote_types(qs.dtype, torch.float32)  # accumulate key/value gradients over chunks in fp32
        with torch.autocast(qs.device.type, enabled=False):
            grad_out = grad_out.to(qs.dtype).contiguous()
            grad_g = grad_out.view(batch, kv, group, lq, head_dim)
            want_q = ctx.needs_input_grad[0]
            grad_q = torch.empty_like(qs) if want_q else None
            grad_k = torch.zeros(batch, kv, lk, head_dim, dtype=acc, device=qs.device)
            grad_v = torch.zeros_like(grad_k)
            values_t = v.transpose(-1, -2)
            for n, (i0, i1, rows_in) in enumerate(ctx.chunks):
                rows, seen = i1 - i0, i1 + offset
                if want_q and rows_in < batch:
                    grad_q[rows_in:, :, :, i0:i1] = 0
                if not rows_in:
                    continue
                p = probs[n]
                d_out = grad_g[:rows_in, :, :, i0:i1].reshape(rows_in, kv, group * rows, head_dim)
                grad_v[:rows_in, :, :seen] += torch.matmul(p.view(rows_in, kv, group * rows, seen).transpose(-1, -2),
                                                           d_out)
                d_p = torch.matmul(d_out, values_t[:rows_in, ..., :seen]).view(rows_in, kv, group, rows, seen)
                # dS = P * (dP - rowsum(dP * P)) in one fused pass, in fp32 inside for bf16 (as the model's fp32
                # softmax backward): 32 vs 38 ms per block at 8 x 588 positions against the three passes written out
                d_s = torch.ops.aten._softmax_backward_data(d_p, p, -1, qs.dtype).view(rows_in, kv, group * rows, seen)
                if want_q:
                    grad_q[:rows_in, :, :, i0:i1] = torch.matmul(d_s, k[:rows_in, :, :seen]).view(
                        rows_in, kv, group, rows, head_dim)
                q_chunk = qs[:rows_in, :, :, i0:i1].reshape(rows_in, kv, group * rows, head_dim)
                grad_k[:rows_in, :, :seen] += torch.matmul(d_s.transpose(-1, -2), q_chunk)
            if want_q:
                grad_q = (grad_q * ctx.scale).view(batch, kv * group, lq, head_dim)
            # the scale sits in qs already, so grad_k needs none
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def _sdpa_attention(device: torch.device) -> bool:
    """Attention through SDPA (CUDA's fused kernels) rather than written out (CPU: CausalAttention, and the last
    block's few read positions)."""
    return device.type != "cpu"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
            scale: float, lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """Attention of q [B, H, Lq, dh] over k, v [B, KV, Lk, dh] (H a multiple of KV, grouped heads), returning
    [B, H, Lq, dh]. allowed: bool, broadcastable to [B, 1, Lq, Lk] (True = attend), or None for causal with the
    last query at the last key (query i sees keys j <= i + Lk - Lq). lengths: with None, each row's queries whose
    outputs are used, non-increasing (the CPU's `CausalAttention` skips the rest; SDPA computes them)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    batch, heads, lq, head_dim = q.shape
    kv, lk = k.shape[1], k.shape[2]
    if allowed is None and not _sdpa_attention(q.device):
        return CausalAttention.apply(q, k, v, scale, lengths)
    if allowed is None and lq == lk:
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if allowed is None:
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    if _sdpa_attention(q.device):
        return sdpa(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    # written out as transformers' eager attention (two grouped-head matmuls, fp32 softmax): the last block's
    # few read positions, where a chunked pass has nothing to skip
    allowed = allowed.expand(batch, 1, lq, lk).unsqueeze(2)  # [B, 1, 1, Lq, Lk]
    group = heads // kv
    scores = torch.matmul(q.reshape(batch, kv, group * lq, head_dim), k.transpose(-1, -2))  # [B, KV, g*Lq, Lk]
    scores = scores.view(batch, kv, group, lq, lk).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).view(batch, kv, group * lq, lk)
    return torch.matmul(probs, v).view(batch, heads, lq, head_dim)


@dataclass
class TokenAttention:
    """A block's attention among the tokens alone, per token: what a prompted block adds to it is only its deep
    keys and values, so on a cached stream (core.tuning.cached) this part is fixed per example and computed once.

    query: [..., H, dh] the tokens' queries before RoPE; attended: [..., H, dh] their causal attention over the
    tokens only (before o_proj); lse: [..., H] fp32, the log-sum-exp of those (scaled) scores. Leading dims are
    [B, T] per example or [R] stacked rows.
    """

    query: torch.Tensor
    attended: torch.Tensor
    lse: torch.Tensor

    def take(self, index: torch.Tensor) -> TokenAttention:
        """Stacked rows [R, ...] -> the rows `index` [R']."""
        return TokenAttention(*(t.index_select(0, index) for t in (self.query, self.attended, self.lse)))

    def rows(self, index: torch.Tensor) -> TokenAttention:
        """[B, T, ...] -> the stacked rows [R, ...] at flat positions `index` [R]."""
        return TokenAttention(*(t.flatten(0, 1) for t in (self.query, self.attended, self.lse))).take(index)

    def cat(self, other: TokenAttention) -> TokenAttention:
        return TokenAttention(*(torch.cat([a, b]) for a, b in zip(
            (self.query, self.attended, self.lse), (other.query, other.attended, other.lse), strict=True)))

    def to(self, device: torch.device) -> TokenAttention:
        return TokenAttention(self.query.to(device), self.attended.to(device), self.lse.to(device))

    def slice(self, start: int, stop: int | None = None) -> TokenAttention:
        """Positions start..stop of every example ([B, T, ...] -> [B, T', ...])."""
        return TokenAttention(self.query[:, start:stop], self.attended[:, start:stop], self.lse[:, start:stop])


@torch.no_grad()
def token_attention(model: nn.Module, hidden: torch.Tensor, index: int) -> TokenAttention:
    """Block `index`'s `TokenAttention` [B, T, ...] for the right-padded residual stream `hidden` [B, T, d] entering
    it (the tokens at positions 0..T-1; scores depend on relative positions only, so they hold wherever the
    tokens sit after deep vectors). Padding rows get numbers that nothing reads."""
    decoder = model.model
    layer = decoder.layers[index]
    attn = layer.self_attn
    batch, length, width = hidden.shape
    x = _norm(layer.input_layernorm, hidden.reshape(batch * length, width))
    positions = torch.arange(length, device=hidden.device)
    cos, sin = _row_rotary(decoder, x, 0, 0, positions.repeat(batch))
    head_dim = attn.head_dim
    # kept before RoPE: the loop rotates it where it sits
    query = module_linear(attn.q_proj, x).view(batch * length, -1, head_dim)
    # keys and values from the k|v rows of the stacked weight (no query rows): the queries are projected once
    _, k, v = _project(attn, x, fuse_projections(layer)[0], cos, sin, query_rows=positions[:0])
    q = _rope(query, cos, sin)  # [B*T, H, dh]
    heads, kv = q.shape[1], k.shape[1]
    group = heads // kv
    q, k, v = (t.view(batch, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))  # [B, ., T, dh]
    scores = torch.matmul(q.reshape(batch, kv, group * length, head_dim), k.transpose(-1, -2))
    scores = scores.view(batch, kv, group, length, length).float() * attn.scaling
    scores.masked_fill_(torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, KV, g, T]
    probs = torch.exp(scores - lse[..., None]).to(v.dtype).view(batch, kv, group * length, length)
    attended = torch.matmul(probs, v).view(batch, heads, length, head_dim).transpose(1, 2)  # [B, T, H, dh]
    lse = lse.view(batch, heads, length).transpose(1, 2).contiguous()  # [B, T, H]
    return TokenAttention(query.view(batch, length, heads, head_dim), attended.contiguous(), lse)


def _attend_merged(q: torch.Tensor, tokens: TokenAttention, kd: torch.Tensor, vd: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention of stacked rows over [deep keys; their tokens] from the tokens-only part: q [R, H, dh] (RoPE'd),
    `tokens` [R, ...], kd and vd [n, KV, dh]. The two softmax parts are joined by their log-sum-exps (as flash
    attention joins blocks of keys), so only the n deep keys are multiplied, and the gradient reaches kd and vd
    alone. Returns [R, H*dh]."""
    rows, heads, head_dim = q.shape
    kv = kd.shape[1]
    group = heads // kv

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [R, H, ...] -> [KV, R*g, ...]
        return t.reshape(rows, kv, group, *t.shape[2:]).transpose(0, 1).reshape(kv, rows * group, *t.shape[2:])

    scores = torch.matmul(grouped(q), kd.permute(1, 2, 0)).float() * scale  # [KV, R*g, n]
    lse = grouped(tokens.lse)  # [KV, R*g]
    top = torch.maximum(lse, scores.amax(dim=-1)).detach()  # any shift gives the same softmax
    probs = torch.exp(scores - top[..., None])
    weight = torch.exp(lse - top)  # the tokens' share, before normalising
    deep = torch.matmul(probs.to(vd.dtype), vd.transpose(0, 1)).float()  # [KV, R*g, dh]
    out = (weight[..., None] * grouped(tokens.attended).float() + deep) / (weight + probs.sum(dim=-1))[..., None]
    return out.to(q.dtype).view(kv, rows, group, head_dim).transpose(0, 1).reshape(rows, heads * head_dim)


def _read_positions(rows: torch.Tensor, cols: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row read positions [B, A] (A = most reads in a row; short rows repeat their last one, a row with none
    reads position 0) and each read's slot in its row [N]; (rows, cols) are grouped by row, as `collate` makes them."""
    counts = torch.bincount(rows, minlength=batch)  # [B]
    first = torch.cumsum(counts, 0) - counts  # [B] index of each row's first read
    slot = torch.arange(len(rows), device=rows.device) - first[rows]  # [N]
    width = max(int(counts.max()), 1)
    read_at = torch.zeros(batch, width, dtype=cols.dtype, device=cols.device)
    read_at[rows, slot] = cols
    last = read_at.gather(1, (counts - 1).clamp(min=0)[:, None])  # [B, 1]
    pad = torch.arange(width, device=rows.device)[None, :] >= counts[:, None]
    return torch.where(pad, last, read_at), slot


def shared_leading_tokens(input_ids: torch.Tensor, limit: int) -> int:
    """How many leading tokens every row of `input_ids` [B, T] has in common, at most `limit` (at least 0); 0 for a
    single row. The rows the block loop runs once for the whole batch."""
    if input_ids.shape[0] < 2:
        return 0
    differs = (input_ids != input_ids[:1]).any(dim=0)  # [T]
    length = int(differs.nonzero()[0]) if bool(differs.any()) else input_ids.shape[1]
    return max(0, min(length, limit))


@torch.no_grad()
def residual_before(model: nn.Module, input_ids: torch.Tensor, kept: list[int], stop: int) -> torch.Tensor:
    """The residual stream entering block `stop` (>= 1), [B, T, d], at the first `kept` positions of each row of
    the right-padded `input_ids` [B, T] (later positions are zeros): blocks 0..stop-1 run as the training loop
    runs them (`answer_rows`, no prompt: the tokens every row begins with go through once, and nothing after a
    row's kept positions), so a cached deep-prompt fill costs what the uncached step's blocks below `stop` cost.
    The model's own forward's numbers up to float rounding."""
    batch = input_ids.shape[0]
    device = input_ids.device
    common = shared_leading_tokens(input_ids, min(kept) - 1)  # every row keeps a token of its own
    embeds = model.model.embed_tokens(input_ids)  # [B, T, d]
    counts = torch.tensor(kept, device=device) - common
    rows = torch.repeat_interleave(torch.arange(batch, device=device), counts)  # every kept position is "read"
    cols = torch.cat([torch.arange(int(n), device=device) for n in counts])
    prefix = embeds[0, :common] if common else None
    h = answer_rows(model, embeds[:, common:], 0, prefix, {}, rows, cols, stop=stop)  # [common + P, d]
    out = torch.zeros_like(embeds)
    out[:, :common] = h[:common]
    out[rows, cols + common] = h[common:]
    return out


def answer_rows(model: nn.Module, hidden: torch.Tensor, start: int, prefix: torch.Tensor | None,
                deep: dict[int, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                first: TokenAttention | None = None, first_prefix: TokenAttention | None = None,
                stop: int | None = None) -> torch.Tensor:
    """Final-normed hidden states [N, d] at token positions (rows, cols) after blocks `start..L-1`.

    hidden: [B, T, d] the tokens' residual stream entering block `start` (the embeddings when 0), right-padded.
    prefix: [S, d] rows entering block `start` before every row's tokens, or None: the soft prompt (start 0
        only), and after it the tokens all rows begin with (core.tuning.loss.common_token_prefix).
    deep: {block: [n, d]} vectors prepended at those blocks.
    cols: token columns (0..T-1) whose hidden state is read, grouped by row as `collate` makes them.
    first, first_prefix: block `start`'s `TokenAttention` for `hidden` [B, T, ...] and `prefix` [S, ...] (a cached
        stream with no soft prompt): that block then multiplies only its deep keys (`_attend_merged`).
    stop: a block after `start` (at most L-1): return instead the stacked rows entering it, [S + P, d] (the prefix
        rows, then each row's tokens up to its last read, row after row; see `residual_before`).
    """
    decoder = model.model
    layers = decoder.layers
    last = len(layers) - 1
    if not 0 <= start <= last:
        raise ValueError(f"start block {start} is outside the model's blocks 0..{last}")
    if stop is not None and not start < stop <= last:
        raise ValueError(f"stop block {stop} must be after the start block {start} and at most {last}")
    outside = sorted(i for i in deep if not start <= i <= last)
    if outside:
        raise ValueError(f"deep vectors at blocks {outside} are outside blocks {start}..{last}, the ones this pass "
                         f"runs: prompt layers must be below the model's depth and at or above the cached start block")
    batch, length, width = hidden.shape
    device, dtype = hidden.device, hidden.dtype
    shared = 0 if prefix is None else prefix.shape[0]
    if first is not None and (first_prefix is None) != (shared == 0):
        raise ValueError("the first block's token attention must cover the prefix rows exactly when there are some")
    layout = _Layout(rows, cols, batch, length, shared)
    h = hidden.reshape(batch * length, width).index_select(0, layout.source)  # [P, d]
    if shared:
        h = torch.cat([prefix.to(dtype), h])  # [S + P, d]
    if first is not None:  # stacked like h
        first = first.rows(layout.source) if first_prefix is None else first_prefix.cat(first.rows(layout.source))
    rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # deep count -> cos, sin [n + S + P, 1, dh]
    no_rows = torch.zeros(0, dtype=torch.long, device=device)  # deep vectors alone need no query: their k|v rows
    for index in range(start, last + 1):
        if index == stop:
            return h
        layer = layers[index]
        attn = layer.self_attn
        qkv, gate_up = fuse_projections(layer)
        vectors = deep.get(index)
        n = 0 if vectors is None else vectors.shape[0]
        if n not in rotary:
            rotary[n] = _row_rotary(decoder, h, n, shared, layout.column)
        x_deep = _norm(layer.input_layernorm, vectors.to(dtype)) if n else None
        cos, sin = rotary[n]
        # the last block's queries only where the loss reads (stacked token rows, after the S prompt rows)
        reads = None if index < last else shared + layout.read_rows.reshape(-1)  # [B*A]
        if first is not None and index == start:  # the tokens' part is cached: only the deep keys to add
            tokens = first if reads is None else first.take(reads)
            q_cos, q_sin = (cos[n:], sin[n:]) if reads is None else (cos[n:].index_select(0, reads),
                                                                   sin[n:].index_select(0, reads))
            q = _rope(tokens.query.to(dtype), q_cos, q_sin)
            if n:
                _, kd, vd = _project(attn, x_deep, qkv, cos[:n], sin[:n], no_rows)
                out = _attend_merged(q, tokens, kd, vd, attn.scaling)  # [S + P or B*A, H*dh]
            else:
                out = tokens.attended.to(dtype).flatten(1)
        else:
            x = _norm(layer.input_layernorm, h)
            if n and not h.requires_grad:  # the first prompted block: the tokens' projections need no gradient
                _, kd, vd = _project(attn, x_deep, qkv, cos[:n], sin[:n], no_rows)
                q, k, v = _project(attn, x, qkv, cos[n:], sin[n:], reads)
            else:  # the deep vectors ride along in the projection; only their keys and values are used
                if n:
                    x = torch.cat([x_deep, x])
                q, k, v = _project(attn, x, qkv, cos, sin, None if reads is None else n + reads)  # [n + S + P, ., dh]
                (kd, k), (vd, v) = (t.split([n, t.shape[0] - n]) for t in (k, v))
                if reads is None:
                    q = q[n:]
            k, v = layout.per_row(k), layout.per_row(v)  # [B, KV, S+W, dh]
            if n:  # [n, KV, dh] -> [B, KV, n, dh] before the sequence's keys and values
                k = torch.cat([kd.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([vd.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
            if index < last:
                # [B, H, S+W, dh]: causal, deep keys seen
                out = _attend(layout.per_row(q), k, v, None, attn.scaling, layout.lengths)
                out = layout.stacked(out.transpose(1, 2)).flatten(1)  # [S + P, H*dh]
            else:  # queries only where the loss reads, A per row (padded with the row's last one)
                q = q.view(batch, layout.read_at.shape[1], *q.shape[1:]).transpose(1, 2)  # [B, H, A, dh]
                key_at = torch.arange(n + layout.seq, device=device) - n  # deep keys at < 0: every query sees them
                allowed = key_at <= (shared + layout.read_at)[:, None, :, None]  # [B, 1, A, n+S+W]
                out = _attend(q, k, v, allowed, attn.scaling).transpose(1, 2).flatten(0, 1)  # [B*A, H, dh]
                out = out.flatten(1)  # [B*A, H*dh]
        if index < last:
            h = h + module_linear(attn.o_proj, out)
            h = h + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, h), gate_up)
        else:  # the last block: the read positions only
            h_read = h[shared:][layout.read_rows]  # [B, A, d]
            h_read = h_read + module_linear(attn.o_proj, out.view(batch, layout.read_at.shape[1], -1))
            h_read = h_read[layout.read_row, layout.slot]  # [N, d], in the order of (rows, cols)
            h_read = h_read + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, h_read), gate_up)
            return _norm(decoder.norm, h_read)
    raise AssertionError("unreachable")
