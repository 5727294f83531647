"""Token batches for training: right-padded, answer positions precomputed, bucketed by length.

Right padding with no attention mask keeps attention purely causal (the fast
SDPA path): padding sits after every real token, so no real token sees it,
and the loss only reads positions before the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from core.tuning.blocks import TokenAttention

ANSWER_END = "\n"  # appended to each target so the prompt also learns where an answer stops (generation stops there)


@dataclass
class Encoded:
    """One example as token ids: `ids` = prompt + target, the last `n_answer` of them are scored."""

    ids: list[int]
    n_answer: int


@dataclass
class Batch:
    """A right-padded batch.

    input_ids: [B, T] token ids (padding = the pad id, never scored).
    rows, cols: [N] batch row and token column of each scored token (answer tokens).
    labels: [N] the token ids at (rows, cols).
    n_tokens: real (non-pad) tokens in the batch, for tokens/s.
    residual: optional [B, T, d], the residual stream entering block `start_layer`, cached (core.tuning.cached):
        the loss then runs from that block on instead of from the token embeddings.
    first_attention: optional `core.tuning.blocks.TokenAttention` [B, T, ...] of block `start_layer` on `residual`
        (cached with it): that block then adds only its deep keys and values to it.
    """

    input_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    n_tokens: int
    residual: torch.Tensor | None = None
    start_layer: int = 0
    first_attention: TokenAttention | None = None

    @property
    def n_answer(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.rows.to(device), self.cols.to(device),
                     self.labels.to(device), self.n_tokens,
                     None if self.residual is None else self.residual.to(device), self.start_layer,
                     None if self.first_attention is None else self.first_attention.to(device))


def encode_examples(tokenizer, examples: list, max_length: int = 320, answer_end: str = ANSWER_END) -> list[Encoded]:
    """Tokenise examples (objects with `.prompt`, `.target`) into prompt+target ids.

    The target (with its leading space) is tokenised on its own and followed by
    `answer_end`; if the whole is longer than `max_length`, tokens are cut from
    the start of the prompt (the data loader already trims long passages; this
    is the last guard and keeps the question and answer, which sit at the end).
    """
    if max_length < 8:
        raise ValueError(f"max_length must be at least 8 tokens; got {max_length}")
    out = []
    for example in examples:
        if not example.target:
            raise ValueError("an example has an empty target: prompt-tuning needs answer tokens to score "
                             "(c4 examples have no target; train on 'math' or 'squad')")
        prompt = tokenizer(example.prompt, add_special_tokens=False).input_ids
        if not prompt:
            raise ValueError("an example has an empty prompt: the first answer token needs a position before it")
        answer = tokenizer(example.target + answer_end, add_special_tokens=False).input_ids
        answer = answer[: max_length // 2]
        prompt = prompt[max(0, len(prompt) + len(answer) - max_length):]
        out.append(Encoded(prompt + answer, len(answer)))
    return out


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Right-pad encoded examples into a `Batch`."""
    width = max(len(x.ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    rows, cols = [], []
    for i, item in enumerate(items):
        ids[i, : len(item.ids)] = torch.tensor(item.ids)
        start = len(item.ids) - item.n_answer
        rows.extend([i] * item.n_answer)
        cols.extend(range(start, len(item.ids)))
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    return Batch(ids, rows_t, cols_t, ids[rows_t, cols_t], sum(len(x.ids) for x in items))


def epoch_batches(items: list[Encoded], batch_size: int, seed: int, epoch: int, bucket: int = 8) -> list[list[int]]:
    """Indices of each batch for one epoch: shuffled, then sorted by length within chunks of `bucket` batches.

    Sorting inside a chunk puts similar lengths together (little padding) while
    the chunk and batch order stay random. A pure function of (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(items), generator=gen).tolist()
    batches: list[list[int]] = []
    chunk = batch_size * max(1, bucket)
    for start in range(0, len(order), chunk):
        part = sorted(order[start: start + chunk], key=lambda i: len(items[i].ids))
        batches.extend(part[j: j + batch_size] for j in range(0, len(part), batch_size))
    batches = [b for b in batches if len(b) == batch_size] or batches  # drop a ragged tail when we can
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def fixed_batches(items: list[Encoded], batch_size: int) -> list[list[int]]:
    """Deterministic length-sorted batches (validation: order does not matter, padding does)."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
