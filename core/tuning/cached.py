"""Deep prompt-tuning from cached activations: skip the blocks that nothing trained can change.

With deep prompts only (`soft=False`: no token-level prompt), every block below the first prompted
one, `start = min(layers)`, sees only the input tokens, so the residual stream entering block
`start` is a fixed function of each example. It is computed once per example (no grad, stopping at
block `start`), kept on disk in the activation cache, and every training or validation step runs
blocks `start..L-1`, the final norm and the head on answer rows only. For the last k of L blocks
the step costs about k/L of a full one (the first epoch also pays one partial forward per example).

The numbers are the full path's: training pads on the right with no mask, so attention is causal
and an example's residual does not depend on what it is batched with (beyond float rounding), and
`forward_from_layer` calls the blocks exactly as `LlamaModel.forward` does (rotary tables from the
positions, no mask, then the final norm).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator

import torch
from torch import nn

from core.tuning.batches import Encoded

FORMAT_VERSION = 1  # bump when the stored residual layout changes
CACHE_NAME = "residuals"


class _StopForward(Exception):
    """Raised by the pre-hook on block `start` once its input is captured."""


@contextlib.contextmanager
def _capture_input(layer: nn.Module, store: dict) -> Iterator[None]:
    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        store["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def residual_stream(model: nn.Module, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """The residual stream entering decoder block `start`, [B, T, d] (right-padded ids [B, T], no mask)."""
    decoder = model.model
    if start == 0:
        return decoder.embed_tokens(input_ids)
    store: dict = {}
    with _capture_input(decoder.layers[start], store):
        try:
            decoder(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    return store["hidden"]


def forward_from_layer(model: nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks `start..L-1` and the final norm on the residual stream `hidden` [B, T, d]; returns [B, T, d].

    Forward hooks on the blocks (deep prompts) run as in the full pass.
    """
    decoder = model.model
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in decoder.layers[start:]:
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                       past_key_values=None, use_cache=False)
    return decoder.norm(hidden)


class ResidualCache:
    """Residual streams entering block `start` for encoded examples, computed on first use, kept on disk.

    Keys hold everything that changes the numbers: the model's fingerprint, the compute module's
    dtype, the start block and the example's token ids.
    """

    def __init__(self, lm, model: nn.Module, autocast: torch.dtype | None, start: int) -> None:  # noqa: ANN001
        self.lm, self.model, self.autocast, self.start = lm, model, autocast, start
        self.dtype = next(model.parameters()).dtype
        self.memory: dict[str, torch.Tensor] = {}  # key -> [T_i, d] on the model's device

    def _key(self, item: Encoded) -> str:
        text = f"{FORMAT_VERSION}|{self.lm.fingerprint}|{self.dtype}|{self.autocast}|{self.start}|{item.ids}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _compute(self, items: list[Encoded]) -> list[torch.Tensor]:
        width = max(len(x.ids) for x in items)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item.ids)] = torch.tensor(item.ids)
        amp = (torch.autocast(self.lm.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with amp:
            hidden = residual_stream(self.model, ids.to(self.lm.device), self.start)  # [B, T, d]
        return [hidden[row, : len(item.ids)].clone() for row, item in enumerate(items)]

    def get(self, items: list[Encoded]) -> list[torch.Tensor]:
        """Residuals [T_i, d] of `items`, in order; missing ones computed in one batch and stored."""
        from core.activations import disk_cache

        keys = [self._key(item) for item in items]
        missing = [i for i, k in enumerate(keys) if k not in self.memory]
        if missing:
            with disk_cache(CACHE_NAME) as store:
                todo = []
                for i in missing:
                    blob = store.get(keys[i], default=None, retry=True)
                    if blob is None:
                        todo.append(i)
                        continue
                    try:
                        self.memory[keys[i]] = torch.load(io.BytesIO(blob)).to(self.lm.device)
                    except Exception:  # noqa: BLE001 - a damaged entry is a miss
                        todo.append(i)
                if todo:
                    for i, tensor in zip(todo, self._compute([items[i] for i in todo]), strict=True):
                        self.memory[keys[i]] = tensor
                        buffer = io.BytesIO()
                        torch.save(tensor.cpu(), buffer)
                        store.set(keys[i], buffer.getvalue(), retry=True)
        return [self.memory[k] for k in keys]

    def batch(self, items: list[Encoded]) -> torch.Tensor:
        """Right-padded residuals [B, T, d] of `items` (zeros after each example: causal attention never reads them)."""
        rows = self.get(items)
        width = max(r.shape[0] for r in rows)
        out = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=rows[0].dtype, device=rows[0].device)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out


def _llama_block(layer: nn.Module) -> bool:
    """Is `layer` a LLaMA-style block (pre-norm attention with q/k/v/o projections and RoPE, then an MLP)?"""
    attn = getattr(layer, "self_attn", None)
    return (attn is not None and all(hasattr(attn, x) for x in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
            and not hasattr(attn, "q_norm") and not hasattr(attn, "sliding_window")
            and all(hasattr(layer, x) for x in ("input_layernorm", "post_attention_layernorm", "mlp")))


def answer_rows_supported(model: nn.Module) -> bool:
    """Can `answer_rows_from_layer` run this model's blocks (else: `forward_from_layer` with the prompt's hooks)?"""
    return all(_llama_block(layer) for layer in model.model.layers)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """SDPA of q [B, H, Tq, dh] over k, v [B, KV, Tk, dh] (grouped heads) with a bool mask [B or 1, 1, Tq, Tk]."""
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = q.shape[1] // k.shape[1]
    return scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=allowed,
                                        scale=attn.scaling)


def answer_rows_from_layer(model: nn.Module, hidden: torch.Tensor, start: int, deep: dict[int, torch.Tensor],
                           rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states [N, d] at positions (rows, cols) after blocks `start..L-1`, with deep vectors.

    The numbers of the hooked full pass (core.tuning.deep) for what the loss reads, with less work:
    - a deep prompt [n, d] at block l only serves as keys and values there (its outputs are cut), and it is the
      same in every row: its keys and values are computed once, not its attention or MLP;
    - in the last block only the N positions the loss reads need a query, an attention output and the MLP
      (every position still gives its key and value).
    Positions follow the hooks: in a prompted block the deep vectors take 0..n-1 and the tokens n..n+T-1.
    hidden: [B, T, d] residual stream entering block `start` (right-padded, no mask: causal).
    deep: {block: [n, d]} in the model's dtype.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    decoder = model.model
    batch, length = hidden.shape[:2]
    device = hidden.device
    layers = decoder.layers
    last = len(layers) - 1
    token_pos = torch.arange(length, device=device)
    for index in range(start, last + 1):
        layer, attn = layers[index], layers[index].self_attn
        vectors = deep.get(index)
        n = 0 if vectors is None else vectors.shape[0]
        positions = (token_pos + n).unsqueeze(0)  # [1, T]
        x = layer.input_layernorm(hidden)  # [B, T, d]
        shape = (batch, length, -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # [B, KV, T, dh]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if index < last:
            q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, dh]
            cos, sin = decoder.rotary_emb(x, position_ids=positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            query_at = token_pos  # [T]
        else:  # the last block: queries only where the loss reads, A per row (padded with the row's last one)
            read_at, slot = _read_positions(rows, cols, batch)  # [B, A] positions, [N] each read's slot
            every = torch.arange(batch, device=device)[:, None]
            q = attn.q_proj(x[every, read_at]).view(batch, read_at.shape[1], -1, attn.head_dim).transpose(1, 2)
            cos, sin = decoder.rotary_emb(x, position_ids=positions)  # [1, T, dh]
            k = _rotate(k, cos, sin)
            q = _rotate(q, cos[0, read_at], sin[0, read_at])  # [B, H, A, dh]
            query_at = read_at[:, None, :]  # [B, 1, A]
        if n:  # the deep vectors' keys and values, once for every row
            d_in = layer.input_layernorm(vectors.unsqueeze(0))  # [1, n, d]
            deep_pos = torch.arange(n, device=device).unsqueeze(0)
            dk = attn.k_proj(d_in).view(1, n, -1, attn.head_dim).transpose(1, 2)  # [1, KV, n, dh]
            dv = attn.v_proj(d_in).view(1, n, -1, attn.head_dim).transpose(1, 2)
            dcos, dsin = decoder.rotary_emb(d_in, position_ids=deep_pos)
            dk = _rotate(dk, dcos, dsin)
            k = torch.cat([dk.expand(k.shape[0], -1, -1, -1), k], dim=2)  # [B or N, KV, n+T, dh]
            v = torch.cat([dv.expand(v.shape[0], -1, -1, -1), v], dim=2)
        key_at = torch.arange(n + length, device=device) - n  # deep keys at < 0: every query sees them
        allowed = key_at <= query_at[..., None]  # [T, n+T] or [B, 1, A, n+T]
        if index < last:
            out = _attend(attn, q, k, v, allowed[None, None])  # [B, H, T, dh]
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        else:
            out = _attend(attn, q, k, v, allowed)  # [B, H, A, dh]
            h_read = hidden[every, read_at] + attn.o_proj(out.transpose(1, 2).reshape(batch, read_at.shape[1], -1))
            h_read = h_read[rows, slot]  # [N, d], in the order of (rows, cols)
            h_read = h_read + layer.mlp(layer.post_attention_layernorm(h_read))
            return decoder.norm(h_read)
    raise ValueError(f"start block {start} is past the model's last block {last}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one tensor [B, heads, T, dh] with cos/sin [B or 1, T, dh] (apply_rotary_pos_emb rotates two)."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


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
