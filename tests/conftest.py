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
