"""Shared fixtures: a tiny random LLaMA for unit tests, the embedded model for integration tests."""

from __future__ import annotations

import pytest

from core.models import LoadedModel, load_model, tiny_llama


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    """4 layers, width 64, the real SmolLM2 tokenizer; random weights."""
    return tiny_llama()


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct in fp32 on the CPU."""
    return load_model("smollm2-135m", precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def real_prior_options():
    """prior name -> the options tests give it on the embedded model: the priors fitted to last-layer activations
    (interpolation, VAE) on 16 texts per cloud, where their default 64 is a full forward of 64-128 texts per cloud,
    ~35 s on 2 AVX2 Zen 1 cores (the same code path); the others at their defaults."""
    return lambda name: {"n_docs": 16} if name in ("interpolation", "vae") else {}


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on 127.0.0.1, shared by the tests that use one (its start and its workers'
    imports cost seconds), shut down after the last test."""
    from core.sweep.backends.ray import init_ray

    ray = pytest.importorskip("ray")
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
