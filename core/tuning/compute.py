"""Which module runs the forward pass and in what dtype (the dtype itself is chosen by `core.compute.decide`).

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

from core.compute import COMPUTE_CHOICES, decide, keep_freed_memory

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_LOCK = threading.Lock()


def bf16_shadow(model: nn.Module) -> nn.Module:
    """A bf16 copy of a frozen model; tied weights stay tied, buffers (rotary tables) keep their dtype."""
    # Pre-seeding deepcopy's memo with bf16 copies of each parameter means the fp32 model is never copied whole.
    memo = {id(p): nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False) for p in model.parameters()}
    shadow = copy.deepcopy(model, memo)
    shadow.eval()
    return shadow


def _compiled_shadow(model: nn.Module) -> nn.Module:
    """A second bf16 shadow whose decoder layers' `forward` is compiled (dynamic shapes: one graph for all lengths).

    Only `forward` is compiled, not the module call, so deep-prompt hooks still run eagerly around it and can
    change the sequence length; a separate copy keeps generation (KV cache) and no-grad passes off the compiled path.
    """
    shadow = bf16_shadow(model)
    for layer in shadow.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    return shadow


def compute_model(lm, compute: str = "auto", compiled: bool = False) -> tuple[nn.Module, torch.dtype | None]:
    """(module to run, autocast dtype or None) for a LoadedModel and a compute name ("auto", "bf16", "fp32").

    compiled: a bf16 shadow with torch.compile'd decoder layers, for training steps (bf16 compute on an fp32
    model only; the first step pays the compilation, about a minute for SmolLM2 on 2 CPU cores).
    On CPU this also asks malloc to keep freed memory for the next step (`core.compute.keep_freed_memory`).
    """
    if lm.device.type == "cpu":
        keep_freed_memory()
    if compute not in COMPUTE_CHOICES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}; got {compute!r}")
    compute = decide(lm, compute).dtype
    if compiled:
        if compute != "bf16" or lm.precision != "fp32":
            raise ValueError(f"compile works with compute 'bf16' on an fp32 model (a compiled bf16 copy); got compute "
                             f"{compute!r} on a {lm.precision} model: drop --compile or load the model in fp32")
        with _LOCK:
            if "bf16_shadow_compiled" not in lm.extra:
                lm.extra["bf16_shadow_compiled"] = _compiled_shadow(lm.model)
        return lm.extra["bf16_shadow_compiled"], None
    if compute == "fp32":
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
