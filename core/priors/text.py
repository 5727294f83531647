"""Text init: the token embeddings of a text, tiled or cut to n vectors (PEFT's TEXT init)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.models import LoadedModel
from core.priors.base import Prior, PriorConfig, option, register

DEFAULT_TEXT = "Read the question and answer it with a short, exact answer."


@dataclass
class TextConfig(PriorConfig):
    text: str = option(DEFAULT_TEXT, "Text whose token embeddings start the prompt (repeated or cut to n).")

    def validate(self, lm) -> None:  # noqa: ANN001
        super().validate(lm)
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("text must be a non-empty string")


@register
class TextPrior(Prior):
    name = "text"
    Config = TextConfig
    summary = "token embeddings of a text, tiled or cut to n (PEFT's text init)"

    def __init__(self, config: TextConfig, lm: LoadedModel | None = None, dim: int | None = None) -> None:
        if lm is None:
            raise ValueError("the text prior embeds a text with the model's tokenizer: pass lm= (a loaded model)")
        super().__init__(config, lm, dim)
        self.token_ids = torch.tensor(lm.tokenizer(config.text, add_special_tokens=False)["input_ids"])
        if len(self.token_ids) == 0:
            raise ValueError(f"text {config.text!r} gives no tokens")
        self.embeddings = lm.input_embeddings()[self.token_ids]  # [t, d]

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        reps = -(-n // len(self.token_ids))  # ceil: tile, then cut to n
        return self.embeddings.repeat(reps, 1)[:n]

    def describe(self) -> str:
        text = self.config.text if len(self.config.text) <= 40 else self.config.text[:37] + "..."
        return f"text init from {text!r} ({len(self.token_ids)} tokens, tiled or cut to n)"
