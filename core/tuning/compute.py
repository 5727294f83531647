"""Which module runs the forward pass and in what dtype.

bf16 compute on an fp32 model uses a bf16 shadow copy of the frozen weights,
made once per loaded model and kept in `lm.extra`: autocast would re-cast every
weight on every step (for SmolLM2-135M that is ~0.5 GB of reads and writes per
step). A bf16 or int8 model is used as it is (int8 under bf16 autocast).
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_LOCK = threading.Lock()


def bf16_shadow(model: nn.Module) -> nn.Module:
    """A bf16 copy of a frozen model; tied weights stay tied, buffers (rotary tables) keep their dtype."""
    # Pre-seeding deepcopy's memo with bf16 copies of each parameter means the fp32 model is never copied whole.
    memo = {id(p): nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False) for p in model.parameters()}
    shadow = copy.deepcopy(model, memo)
    shadow.eval()
    return shadow


def compute_model(lm, compute: str = "bf16") -> tuple[nn.Module, torch.dtype | None]:
    """(module to run, autocast dtype or None) for a LoadedModel and a compute dtype name."""
    if compute not in COMPUTE_DTYPES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_DTYPES)}; got {compute!r}")
    if compute == "fp32":
        if lm.precision == "bf16":
            raise ValueError("compute 'fp32' needs an fp32 or int8 model; this one is bf16: use compute 'bf16'")
        return lm.model, None
    if lm.precision == "bf16":
        return lm.model, None
    if lm.precision == "int8":
        return lm.model, torch.bfloat16
    with _LOCK:  # the page may start two jobs at once; build the shadow once
        shadow = lm.extra.get("bf16_shadow")
        if shadow is None:
            shadow = bf16_shadow(lm.model)
            lm.extra["bf16_shadow"] = shadow
    return shadow, None
