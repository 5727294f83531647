"""Prompt-tuning on a frozen causal LM: soft and deep prompts, one training engine.

    >>> from core.tuning import TrainConfig, train
    >>> train(lm, TrainConfig(method="deep", dataset="math", prior="fitted", steps=40), "runs/deep-demo")

Methods are registered by name in `METHODS` ("soft", "deep"); each is one module
with a config dataclass and one `nn.Module`.
"""

from core.tuning.base import METHODS, PromptConfig, PromptModule, build_prompt, register
from core.tuning.batches import Batch, collate, encode_examples
from core.tuning.compute import compute_model
from core.tuning.deep import DeepPrompt, DeepPromptConfig
from core.tuning.loss import answer_loss
from core.tuning.soft import SoftPrompt, SoftPromptConfig
from core.tuning.trainer import Progress, TrainConfig, TrainResult, initial_tensors, train

__all__ = [
    "METHODS", "PromptConfig", "PromptModule", "build_prompt", "register", "Batch", "collate", "encode_examples",
    "compute_model", "DeepPrompt", "DeepPromptConfig", "answer_loss", "SoftPrompt", "SoftPromptConfig",
    "Progress", "TrainConfig", "TrainResult", "initial_tensors", "train",
]
