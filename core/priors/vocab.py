"""Vocabulary sample: real token embeddings drawn at random (PEFT's SAMPLE_VOCAB init)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.models import LoadedModel
from core.priors.base import Prior, PriorConfig, option, register


@dataclass
class VocabConfig(PriorConfig):
    exclude_special: bool = option(True, "Leave out special tokens (<|im_start|>, <|endoftext|>, ...).")


@register
class VocabPrior(Prior):
    name = "vocab"
    Config = VocabConfig
    summary = "embeddings of random real tokens (PEFT's sample-vocab init)"

    def __init__(self, config: VocabConfig, lm: LoadedModel | None = None, dim: int | None = None) -> None:
        if lm is None:
            raise ValueError("the vocab prior samples the model's token embeddings: pass lm= (a loaded model)")
        super().__init__(config, lm, dim)
        self.embeddings = lm.input_embeddings()  # [V, d]
        ids = torch.arange(len(self.embeddings))
        if config.exclude_special:
            special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)), dtype=torch.long)
            ids = ids[~torch.isin(ids, special)]
        self.ids = ids
        self.last_token_ids: torch.Tensor | None = None

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if n <= len(self.ids):  # distinct tokens when there are enough
            pick = torch.randperm(len(self.ids), generator=generator)[:n]
        else:
            pick = torch.randint(len(self.ids), (n,), generator=generator)
        self.last_token_ids = self.ids[pick]
        self.last_stats = {"tokens": [self.lm.tokenizer.decode([int(i)]) for i in self.last_token_ids[:50]]}
        return self.embeddings[self.last_token_ids]

    def describe(self) -> str:
        special = "special tokens excluded" if self.config.exclude_special else "special tokens included"
        return f"random token embeddings from {len(self.ids):,} tokens ({special})"
