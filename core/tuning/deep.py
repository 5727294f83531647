"""Deep prompt-tuning as the paper defines it (section 3.2).

At each selected decoder layer, n trainable vectors are prepended to that
layer's input and the first n positions are cut from its output, so every
other layer sees the original length; a token-level soft prompt is trained too.

Position scheme. Inside a hooked layer the sequence is
`[deep_1..deep_n, x_1..x_T]` and positions are renumbered `0..n+T-1` (the deep
vectors take 0..n-1, every real position p becomes p+n). RoPE only sees
position differences between a query and a key, so attention among the real
tokens is exactly what it was, and every real token sees the deep vectors at
the same distance pattern, whatever the padding.

Masks and padding. Training pads on the right and passes no mask: attention is
causal, the deep vectors sit first so every real token attends to all of them,
and padded positions come after every real one so no real token can see them.
Generation pads on the left; the layer then receives a 4D bool mask
[B, 1, T, T] (True = attend), which the hook grows to [B, 1, n+T, n+T]: real
rows attend to all n deep columns plus what they attended before, deep rows
attend causally among themselves only (their outputs are cut anyway). During
cached decoding the deep keys and values are already in that layer's cache, so
the hook only shifts positions by n and adds n True columns to the mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from core.tuning.base import PromptConfig, PromptModule, register


@dataclass
class DeepPromptConfig(PromptConfig):
    """Deep prompt: `n_tokens` token-level vectors plus `n_tokens` vectors at each of `layers`.

    layers: decoder-layer indices (0-based block index) that get prepended vectors;
    empty means the last 3, as in the paper.
    soft: also train the token-level soft prompt (the paper's method). Without it nothing trained
    enters below the first prompted block, so training can start there from cached activations
    (core.tuning.cached): about L/k times faster per step for the last k of L blocks.
    """

    layers: list[int] = field(default_factory=list)
    soft: bool = True
    num_layers: int = 0  # the model's depth, filled in by the module; used to check `layers`

    def resolve(self, num_layers: int) -> None:
        self.num_layers = num_layers
        if not self.layers:
            self.layers = list(range(max(0, num_layers - 3), num_layers))
        self.layers = sorted({int(x) for x in self.layers})
        bad = [x for x in self.layers if not 0 <= x < num_layers]
        if bad:
            raise ValueError(
                f"deep-prompt layers {bad} are out of range: this model has {num_layers} decoder layers, "
                f"use indices 0..{num_layers - 1} (default: the last 3)"
            )


def _grow_mask(mask: torch.Tensor | None, n: int, decoding: bool) -> torch.Tensor | None:
    """[B, 1, Tq, Tk] -> with n deep key columns (and n deep query rows unless decoding)."""
    if mask is None:
        return None  # causal with the deep vectors first (prefill) or attend-all (one-token decode)
    b, h, tq, tk = mask.shape
    if mask.dtype == torch.bool:
        yes, no = True, False
    else:  # additive float mask (eager attention)
        yes, no = 0.0, torch.finfo(mask.dtype).min
    cols = torch.full((b, h, tq, n), yes, dtype=mask.dtype, device=mask.device)
    grown = torch.cat([cols, mask], dim=-1)  # real rows see every deep vector
    if decoding:
        return grown
    deep_rows = torch.full((b, h, n, n + tk), no, dtype=mask.dtype, device=mask.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    deep_rows[:, :, :, :n] = torch.where(causal, torch.tensor(yes, dtype=mask.dtype, device=mask.device),
                                         torch.tensor(no, dtype=mask.dtype, device=mask.device))
    return torch.cat([deep_rows, grown], dim=-2)


def _causal_mask_4d(mask: torch.Tensor, q: int) -> torch.Tensor:
    """2D padding mask [B, K] (1 = real) of keys -> causal bool mask [B, 1, q, K] for the last q of them.
    A query with nothing to attend (a left-padding row) attends to itself: finite outputs no real token reads."""
    k = mask.shape[1]
    query_at = torch.arange(k - q, k, device=mask.device)  # [q] each query's index among the keys
    keys = torch.arange(k, device=mask.device)
    out = mask.bool()[:, None, None, :] & (keys[None, :] <= query_at[:, None])[None, None]  # [B, 1, q, K]
    alone = ~out.any(-1, keepdim=True)
    return out | (alone & (keys[None, :] == query_at[:, None])[None, None])


@register("deep")
class DeepPrompt(PromptModule):
    """`soft` [n, d] at the input plus `deep.{layer}` [n, d] prepended at each selected layer."""

    config_class = DeepPromptConfig

    def __init__(self, config: DeepPromptConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        config.resolve(num_layers)
        self.config = config
        self.hidden_size = hidden_size
        self.soft = nn.Parameter(torch.zeros(config.n_tokens, hidden_size)) if config.soft else None
        self.deep = nn.ParameterDict({str(x): nn.Parameter(torch.zeros(config.n_tokens, hidden_size))
                                      for x in config.layers})

    @property
    def n_prefix(self) -> int:
        return self.config.n_tokens if self.soft is not None else 0

    def prefix(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        if self.soft is None:  # deep vectors only: nothing is prepended to the tokens
            return torch.zeros(batch_size, 0, self.hidden_size, dtype=dtype, device=self.deep_device)
        return self.soft.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)  # [B, n, d]

    @property
    def deep_device(self) -> torch.device:
        return next(iter(self.deep.values())).device

    @property
    def first_layer(self) -> int:
        """The lowest prompted block: without a soft prompt, nothing trained enters below it."""
        return min(self.config.layers)

    def named_tensors(self) -> dict[str, nn.Parameter]:
        soft = {"soft": self.soft} if self.soft is not None else {}
        return {**soft, **{f"deep.{k}": v for k, v in self.deep.items()}}

    def _check_depth(self, model: nn.Module) -> None:
        if len(model.model.layers) != self.config.num_layers:
            raise ValueError(f"this deep prompt was built for {self.config.num_layers} layers; "
                             f"the model has {len(model.model.layers)}")

    def block_vectors(self, model: nn.Module) -> dict[int, torch.Tensor]:
        self._check_depth(model)
        return {int(index): vectors for index, vectors in self.deep.items()}

    @contextlib.contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        self._check_depth(model)
        layers = model.model.layers
        rotary = model.model.rotary_emb
        handles = []
        if 0 in self.config.layers:
            handles.append(model.model.register_forward_pre_hook(self._own_mask_hook(), with_kwargs=True))
        for index in self.config.layers:
            pre, post = self._layer_hooks(index, rotary)
            handles.append(layers[index].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layers[index].register_forward_hook(post, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _own_mask_hook(self):  # noqa: ANN202 - a forward pre-hook of the decoder
        """With layer 0 prompted, its cache also holds the n deep keys, and LLaMA sizes every layer's mask from
        layer 0's cache length: n columns too many in each cached decoding step. Build the 4D mask here from the
        caller's 2D padding mask instead (the model uses a 4D mask as given); the layer hooks widen it where
        deep vectors sit."""
        n = self.config.n_tokens

        def pre(module: nn.Module, args: tuple, kwargs: dict):  # noqa: ANN202
            cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
            embeds = kwargs.get("inputs_embeds")
            if cache is None or embeds is None or (mask is not None and mask.ndim != 2):
                return None
            q = embeds.shape[1]
            if mask is None:
                past = cache.get_seq_length(0)
                mask = torch.ones(embeds.shape[0], (past - n if past > 0 else 0) + q, dtype=torch.bool,
                                  device=embeds.device)
            kwargs["attention_mask"] = _causal_mask_4d(mask, q)
            return args, kwargs

        return pre

    def _layer_hooks(self, index: int, rotary: nn.Module):  # noqa: ANN202 - pair of hook callables
        n = self.config.n_tokens
        vectors = self.deep[str(index)]
        state = {"prepended": False}

        def pre(module: nn.Module, args: tuple, kwargs: dict):  # noqa: ANN202
            hidden = args[0] if args else kwargs.pop("hidden_states")
            args = args[1:]
            cache = kwargs.get("past_key_values")
            decoding = cache is not None and cache.get_seq_length(index) > 0
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            if decoding:
                new_positions = positions + n
            else:
                hidden = torch.cat([vectors.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1),
                                    hidden], dim=1)  # [B, n+T, d]
                deep_positions = torch.arange(n, device=positions.device).expand(positions.shape[0], -1)
                new_positions = torch.cat([deep_positions, positions + n], dim=1)
            kwargs["position_ids"] = new_positions
            kwargs["position_embeddings"] = rotary(hidden, position_ids=new_positions)
            kwargs["attention_mask"] = _grow_mask(kwargs.get("attention_mask"), n, decoding)
            state["prepended"] = not decoding
            return (hidden, *args), kwargs

        def post(module: nn.Module, args: tuple, kwargs: dict, output):  # noqa: ANN001, ANN202
            if not state["prepended"]:
                return output
            state["prepended"] = False
            if isinstance(output, tuple):
                return (output[0][:, n:], *output[1:])
            return output[:, n:]  # [B, T, d]: later layers see the original length

        return pre, post
