"""Deep prompt-tuning from cached activations: skip the blocks that nothing trained can change.

With deep prompts only (`soft=False`: no token-level prompt), every block below the first prompted
one, `start = min(layers)`, sees only the input tokens, so the residual stream entering block
`start` is a fixed function of each example. It is computed once per example (no grad, stopping at
block `start`; for LLaMA models through the training loop's own blocks, `blocks.residual_before`, so
the fill costs what the uncached step's lower blocks cost: in fp32 on 2 Zen 4 threads 245 against 300 ms
for the model's forward on a MATH batch, 155 against 161 in bf16), kept on disk in the activation
cache, and every training or validation step runs blocks `start..L-1`, the final norm and the head on
answer rows only. For the last k of L blocks the step costs about k/L of a full one (the first epoch
also pays one partial forward per example: its steps cost 1.1-1.2x an uncached step on MATH).

The numbers are the full path's: training pads on the right with no mask, so attention is causal
and an example's residual does not depend on what it is batched with (beyond float rounding), and
`forward_from_layer` calls the blocks exactly as `LlamaModel.forward` does (rotary tables from the
positions, no mask, then the final norm).

For LLaMA models (`core.tuning.blocks.supported`) block `start`'s attention among the tokens alone is fixed too
(`blocks.TokenAttention`: its queries, the tokens-only attention and its log-sum-exp), and is cached beside the
residual: that block then only adds its deep keys and values to it (measured in bench/bench_deep_cached.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator

import torch
from torch import nn

from core.tuning import blocks
from core.tuning.batches import Batch, Encoded

# bump when the stored layout changes (2: block `start`'s token attention beside the residual; 3: LLaMA fills run the
# training loop's blocks, and a row's last position, never read, is zeros)
FORMAT_VERSION = 3
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
    """Residual streams entering block `start` for encoded examples (and, for LLaMA models, that block's
    `TokenAttention`), computed on first use, kept on disk.

    Keys hold everything that changes the numbers: the model's fingerprint, the compute module's
    dtype, the start block and the example's token ids.
    """

    def __init__(self, lm, model: nn.Module, autocast: torch.dtype | None, start: int) -> None:  # noqa: ANN001
        self.lm, self.model, self.autocast, self.start = lm, model, autocast, start
        self.dtype = next(model.parameters()).dtype
        self.with_attention = blocks.supported(model)
        # key -> {"residual": [T_i, d], and with_attention: "query", "attended" [T_i, H, dh], "lse" [T_i, H]}
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def _key(self, item: Encoded) -> str:
        text = f"{FORMAT_VERSION}|{self.lm.fingerprint}|{self.dtype}|{self.autocast}|{self.start}|{item.ids}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _compute(self, items: list[Encoded]) -> list[dict[str, torch.Tensor]]:
        width = max(len(x.ids) for x in items)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item.ids)] = torch.tensor(item.ids)
        amp = (torch.autocast(self.lm.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with amp:
            ids = ids.to(self.lm.device)
            if self.with_attention and self.start > 0:  # LLaMA: the uncached training step's own blocks
                # a row's last token is never read (its reads predict answer tokens, up to the last one)
                kept = [len(x.ids) - 1 if x.n_answer else len(x.ids) for x in items]
                hidden = blocks.residual_before(self.model, ids, kept, self.start)
            else:
                hidden = residual_stream(self.model, ids, self.start)  # [B, T, d]
            fields = {"residual": hidden}
            if self.with_attention:
                attention = blocks.token_attention(self.model, hidden, self.start)
                fields.update(query=attention.query, attended=attention.attended, lse=attention.lse)
        return [{name: t[row, : len(item.ids)].clone() for name, t in fields.items()}
                for row, item in enumerate(items)]

    def get(self, items: list[Encoded]) -> list[dict[str, torch.Tensor]]:
        """Cached fields of `items` (see `memory`), in order; missing ones computed in one batch and stored."""
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
                        entry = torch.load(io.BytesIO(blob))
                        self.memory[keys[i]] = {name: t.to(self.lm.device) for name, t in entry.items()}
                    except Exception:  # noqa: BLE001 - a damaged entry is a miss
                        todo.append(i)
                if todo:
                    for i, entry in zip(todo, self._compute([items[i] for i in todo]), strict=True):
                        self.memory[keys[i]] = entry
                        buffer = io.BytesIO()
                        torch.save({name: t.cpu() for name, t in entry.items()}, buffer)
                        store.set(keys[i], buffer.getvalue(), retry=True)
        return [self.memory[k] for k in keys]

    def forget(self, items: list[Encoded]) -> None:
        """Drop the entries of `items` from memory and disk: the next `get` computes them again (a benchmark's
        first epoch measures the fill, not a read of an earlier run's entries)."""
        from core.activations import disk_cache

        keys = [self._key(item) for item in items]
        with disk_cache(CACHE_NAME) as store:
            for key in keys:
                self.memory.pop(key, None)
                store.delete(key, retry=True)

    def attach(self, batch: Batch, items: list[Encoded]) -> Batch:
        """`batch` (collated from `items`) set to run from block `start` on the cached fields, right-padded with
        zeros (causal attention never reads past a row's end). Returns `batch`."""
        entries = self.get(items)
        width = max(e["residual"].shape[0] for e in entries)

        def padded(name: str) -> torch.Tensor:
            first = entries[0][name]
            out = torch.zeros((len(entries), width, *first.shape[1:]), dtype=first.dtype, device=first.device)
            for row, entry in enumerate(entries):
                out[row, : entry[name].shape[0]] = entry[name]
            return out

        batch.residual, batch.start_layer = padded("residual"), self.start
        if self.with_attention:
            batch.first_attention = blocks.TokenAttention(padded("query"), padded("attended"), padded("lse"))
        return batch
