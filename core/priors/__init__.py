"""Priors: samplers of initial prompt vectors, one module each, registered by name.

    >>> prior = make_prior("exclusion", lm=lm, c=5.0)     # fitted to lm's token embeddings
    >>> x = prior.sample(20, torch.Generator().manual_seed(0))   # float32 [20, d]
    >>> prior.describe(), prior.params, prior.last_stats["acceptance_rate"]
    >>> make_prior("fitted", lm=lm, source="squad", layer=30)    # a dataset's activations at a layer
    >>> fitted_gaussian(lm).mahalanobis(x)                 # [20], the cached fit other pages use

Names (PRIOR_NAMES): gaussian, xavier, fitted, exclusion, interpolation, vae
(the paper's section 3.3), and beyond it gaussian_tokens (the isotropic Gaussian at the token
embeddings' scale), vocab, text, knn_low_density.
"""

from __future__ import annotations

import dataclasses
import inspect

from core.models import LoadedModel
from core.priors import (  # noqa: F401 - importing registers each prior
    exclusion,
    fitted,
    gaussian,
    interpolation,
    knn_low_density,
    text,
    vae,
    vocab,
    xavier,
)
from core.priors.base import REGISTRY, SOURCES, Prior, PriorConfig, SamplingError
from core.priors.exclusion import c_dim, expected_acceptance
from core.priors.fit import FittedGaussian, ProgressFn, fit_gaussian, fitted_gaussian, reference_cloud

# The paper's priors in its order, then the ones beyond it; the UI lists them like this.
PRIOR_NAMES: list[str] = [
    "gaussian", "xavier", "fitted", "exclusion", "interpolation", "vae", "gaussian_tokens", "vocab", "text",
    "knn_low_density",
]
assert set(PRIOR_NAMES) == set(REGISTRY), "every registered prior must be listed in PRIOR_NAMES"
_OBJECT_PARAMS = ("reference", "reference_a", "reference_b")  # tensors, not config options


def prior_options(name: str) -> list[dataclasses.Field]:
    """Config fields of a prior, each with metadata help (and choices/min/max/step): the UI builds widgets from them."""
    return [f for f in dataclasses.fields(_prior_class(name).Config) if f.name != "seed"] + [
        f for f in dataclasses.fields(_prior_class(name).Config) if f.name == "seed"
    ]


def _prior_class(name: str) -> type[Prior]:
    if name not in REGISTRY:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIOR_NAMES)}")
    return REGISTRY[name]


def make_prior(
    name: str, lm: LoadedModel | None = None, dim: int | None = None, progress: ProgressFn | None = None, **params
) -> Prior:
    """Build prior `name` with its options as keywords.

    lm gives the width d and the default reference cloud (token embeddings);
    dim alone is enough for gaussian and xavier. Fitting priors take
    source= ("tokens", "c4", "squad", "math") and layer=, or reference= a
    [N, d] tensor (interpolation: reference_a=, reference_b=). progress, when
    given, hears the fraction done while dataset activations are computed
    (priors that need none ignore it).
    Unknown names or options raise ValueError listing what is allowed.
    """
    cls = _prior_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    objects = {k: params.pop(k) for k in _OBJECT_PARAMS if k in params}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"prior {name!r} has no option {', '.join(unknown)}; its options are {', '.join(sorted(fields))}"
        )
    params.pop("name", None)
    types = {f.name: str(f.type) for f in dataclasses.fields(cls.Config)}
    config = cls.Config(**{k: _coerce(k, v, types[k]) for k, v in params.items()})
    objects = {k: v for k, v in objects.items() if v is not None}
    if progress is not None and "progress" in inspect.signature(cls.__init__).parameters:
        objects["progress"] = progress
    try:
        return cls(config, lm=lm, dim=dim, **objects)
    except TypeError as exc:
        if objects and "unexpected keyword" in str(exc):
            raise ValueError(f"prior {name!r} takes no {', '.join(objects)}: it is not fitted to a cloud") from exc
        raise


def _coerce(key: str, value: object, kind: str) -> object:
    """Options typed on a command line arrive as strings: turn them into the option's type."""
    if not isinstance(value, str) or kind == "str":
        return value
    raw = value.strip()
    if "None" in kind and raw.lower() in ("", "none", "null"):
        return None
    try:
        if kind.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"option {key} expects {kind}; got {value!r}") from None
    return value


def prior_from_params(params: dict, lm: LoadedModel | None = None) -> Prior:
    """Rebuild a prior from its `.params` (as stored in a run config)."""
    params = dict(params)
    name = params.pop("name")
    dim = params.pop("dim", None)
    return make_prior(name, lm=lm, dim=None if lm is not None else dim, **params)


__all__ = [
    "PRIOR_NAMES", "SOURCES", "FittedGaussian", "Prior", "PriorConfig", "SamplingError", "c_dim",
    "expected_acceptance", "fit_gaussian", "fitted_gaussian", "make_prior", "prior_from_params",
    "prior_options", "reference_cloud",
]
