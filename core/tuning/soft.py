"""Soft prompt-tuning (paper section 3.1): n trainable vectors prepended to the input embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.tuning.base import PromptConfig, PromptModule, register


@dataclass
class SoftPromptConfig(PromptConfig):
    """Soft prompt: only `n_tokens` (20 by default, as in the paper)."""


@register("soft")
class SoftPrompt(PromptModule):
    """`soft` [n, d]: prepended to every sequence's input embeddings; the model is untouched."""

    config_class = SoftPromptConfig
    prefix_only = True

    def __init__(self, config: SoftPromptConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.soft = nn.Parameter(torch.zeros(config.n_tokens, hidden_size))

    def prefix(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        return self.soft.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)  # [B, n, d]

    def named_tensors(self) -> dict[str, nn.Parameter]:
        return {"soft": self.soft}

    def block_vectors(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return {}  # no hooks
