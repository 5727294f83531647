"""What every prompt method shares: the registry, the tensor naming, the hook context.

A method is one module with a config dataclass and one `nn.Module` subclass of
`PromptModule`, registered by name (`@register("soft")`); the UI lists `METHODS`.
Tensor names are the run-file keys: "soft" [n, d] for the token-level prompt and
"deep.{layer}" [n, d] for the vectors prepended at decoder layer `layer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

METHODS: dict[str, type[PromptModule]] = {}


def register(name: str):  # noqa: ANN201 - class decorator
    """Register a `PromptModule` subclass under `name` (the `--method` value)."""

    def wrap(cls: type[PromptModule]) -> type[PromptModule]:
        cls.method = name
        METHODS[name] = cls
        return cls

    return wrap


@dataclass
class PromptConfig:
    """Fields every method has."""

    n_tokens: int = 20  # the paper's 20 virtual tokens

    def __post_init__(self) -> None:
        if not isinstance(self.n_tokens, int) or self.n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive integer; got {self.n_tokens!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class PromptModule(nn.Module):
    """Trainable prompt vectors for a frozen causal LM.

    Subclasses hold fp32 `nn.Parameter`s (the master copy, whatever the model's
    precision) and say how they enter the model: `prefix(batch)` gives the
    token-level vectors to prepend to the input embeddings, and `hooks(model)`
    installs whatever else the method needs for the duration of a forward pass.
    """

    method = "base"
    config: PromptConfig
    # True when the prompt enters the model only through `prefix()` (no hooks): the loss may then compute the
    # prefix's keys and values once per batch and share them across rows (core.tuning.loss)
    prefix_only = False

    @property
    def n_prefix(self) -> int:
        """Number of positions prepended to the token sequence."""
        return self.config.n_tokens

    def prefix(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Token-level prompt for a batch, [B, n, d]."""
        raise NotImplementedError

    def block_vectors(self, model: nn.Module) -> dict[int, torch.Tensor] | None:
        """{block: [n, d]} vectors this prompt's hooks would prepend at `model`'s decoder blocks, when that is all
        its hooks do (the loss can then run its own block loop, core.tuning.blocks); None when they do anything
        else. Raises, as `hooks` does, where the prompt does not fit the model."""
        return None

    @contextlib.contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        """Install forward hooks on `model` (a causal LM); removed on exit, even on error."""
        yield

    def tensors(self) -> dict[str, torch.Tensor]:
        """Run-file tensors: {"soft": [n, d], "deep.{layer}": [n, d]}, detached fp32 CPU."""
        return {name: p.detach().float().cpu().clone() for name, p in self.named_tensors().items()}

    def named_tensors(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy run-file tensors in; names and shapes must match this module's."""
        own = self.named_tensors()
        if set(tensors) != set(own):
            raise ValueError(
                f"prompt tensors {sorted(tensors)} do not match this {self.method} prompt's {sorted(own)}: "
                "load a run of the same method, layers and size"
            )
        with torch.no_grad():
            for name, param in own.items():
                value = tensors[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value.to(param.device, param.dtype))


def build_prompt(method: str, hidden_size: int, num_layers: int, init: dict[str, torch.Tensor] | None = None,
                 **params) -> PromptModule:
    """Build a registered prompt module by name; `params` go to its config dataclass."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[method]
    module = cls(cls.config_class(**params), hidden_size=hidden_size, num_layers=num_layers)
    if init is not None:
        module.load_tensors(init)
    return module
