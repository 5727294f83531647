"""What every prior shares: the config base, the registry, the `Prior` class, reference clouds.

A prior is one module holding a config dataclass and one `Prior` subclass,
registered by name with `@register`. Config fields carry UI metadata
(`help`, and where useful `choices`, `min`, `max`, `step`) so the Prior lab
page builds its widgets from the config instead of repeating them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from core.models import LoadedModel

SOURCES = ("tokens", "c4", "squad", "math")  # "tokens": the token-embedding matrix; else a dataset's activations
COVARIANCES = ("full", "diagonal")
MIN_FIT_POINTS = 8  # fewer rows than this give a mean and spread that mean nothing


class SamplingError(RuntimeError):
    """A rejection sampler used up its candidate budget before producing n samples."""


def option(default: Any, help: str, **ui: Any) -> Any:  # noqa: A002 - matches dataclass metadata naming
    """A config field with help text and optional UI hints (choices, min, max, step)."""
    return field(default=default, metadata={"help": help, **ui})


@dataclass
class PriorConfig:
    """Base of every prior's config; `seed` makes `sample(n)` reproducible without a generator."""

    seed: int = option(0, "Seed of the sampler when no generator is passed.", min=0)

    def validate(self, lm: LoadedModel | None) -> None:
        """Raise ValueError naming the option and what is allowed; subclasses extend."""
        if int(self.seed) < 0:
            raise ValueError(f"seed must be a non-negative integer; got {self.seed}")


@dataclass
class ReferenceConfig(PriorConfig):
    """Options of priors fitted to a reference cloud: token embeddings, or a dataset's activations at a layer."""

    source: str = option(
        "tokens", "Reference cloud: the token-embedding matrix, or a dataset's activations at `layer`.",
        choices=SOURCES,
    )
    layer: int | None = option(
        None, "Layer of the activations (0 = embedding output, L = last block); empty = last layer. "
        "Only with a dataset source.", min=0,
    )
    n_docs: int = option(64, "Number of dataset texts whose activations form the cloud.", min=2, max=512)
    data_seed: int = option(0, "Seed choosing the dataset texts.", min=0)

    def validate(self, lm: LoadedModel | None) -> None:
        super().validate(lm)
        check_source(self.source, self.layer, lm)
        if int(self.n_docs) < 1:
            raise ValueError(f"n_docs must be at least 1; got {self.n_docs}")


def check_source(source: str, layer: int | None, lm: LoadedModel | None) -> None:
    """Validate a (source, layer) pair against the model's depth."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "tokens":
        if layer is not None:
            raise ValueError(
                "layer applies only to a dataset source (c4, squad, math); the token cloud is the embedding "
                f"matrix itself. Leave layer empty or pick a dataset; got layer={layer}"
            )
        return
    if layer is not None and lm is not None and not 0 <= int(layer) <= lm.num_layers:
        raise ValueError(
            f"layer {layer} is past the depth of {lm.name}: allowed 0..{lm.num_layers} "
            f"(0 = embedding output, {lm.num_layers} = last block)"
        )
    if layer is not None and int(layer) < 0:
        raise ValueError(f"layer must be between 0 and the model's depth; got {layer}")


def resolve_layer(source: str, layer: int | None, lm: LoadedModel | None) -> int | None:
    """The layer actually used: None for tokens, the last layer when a dataset source leaves it empty."""
    if source == "tokens":
        return None
    if layer is None:
        if lm is None:
            raise ValueError(f"source {source!r} needs lm= (a loaded model) to compute activations")
        return lm.num_layers
    return int(layer)


REGISTRY: dict[str, type[Prior]] = {}


def register(cls: type[Prior]) -> type[Prior]:
    """Class decorator: make the prior available to `make_prior(cls.name)` and the UI."""
    REGISTRY[cls.name] = cls
    return cls


class Prior:
    """A sampler of initial prompt vectors.

    Subclasses set `name`, `Config`, `summary` and implement `_sample(n, generator) -> [n, d]`.
    `last_stats` holds what the last `sample` call measured (for rejection
    samplers: candidates, accepted, acceptance_rate).
    """

    name: ClassVar[str]
    Config: ClassVar[type[PriorConfig]]
    summary: ClassVar[str] = ""  # one line for the UI's prior picker

    def __init__(self, config: PriorConfig, lm: LoadedModel | None = None, dim: int | None = None) -> None:
        config.validate(lm)
        self.config = config
        self.lm = lm
        if lm is not None and dim is not None and dim != lm.hidden_size:
            raise ValueError(f"dim={dim} disagrees with the model's width {lm.hidden_size}; pass one or the other")
        self._dim = dim if dim is not None else (lm.hidden_size if lm is not None else None)
        self.last_stats: dict = {}

    # ---- subclasses override
    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the UI."""
        return self.name

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of rows of x [m, d] -> [m]; only where the prior's density is analytic."""
        raise NotImplementedError(f"prior {self.name!r} has no analytic density")

    @property
    def has_log_prob(self) -> bool:
        return type(self).log_prob is not Prior.log_prob

    # ---- shared
    @property
    def dim(self) -> int:
        if self._dim is None:
            raise ValueError(f"prior {self.name!r} needs lm= (a loaded model) or dim= (the embedding width)")
        return int(self._dim)

    @property
    def params(self) -> dict:
        """JSON-serialisable config for run records: name, dim and every option."""
        out = {"name": self.name, "dim": self._dim}
        out.update({f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)})
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n prompt vectors, float32 [n, d] on the CPU; `generator` (or config.seed) fixes them."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer number of vectors; got {n!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(self.config.seed))
        self.last_stats = {}
        out = self._sample(n, generator).to(torch.float32).contiguous()
        if out.shape != (n, self.dim):
            raise RuntimeError(f"prior {self.name!r} returned shape {tuple(out.shape)}, expected ({n}, {self.dim})")
        if not torch.isfinite(out).all():
            raise RuntimeError(f"prior {self.name!r} produced non-finite values; check its parameters")
        return out

    def __repr__(self) -> str:
        return f"<Prior {self.describe()}>"


def acceptance_stats(candidates: int, accepted: int) -> dict:
    return {
        "candidates": int(candidates),
        "accepted": int(accepted),
        "acceptance_rate": accepted / candidates if candidates else math.nan,
    }
