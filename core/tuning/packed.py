"""Frozen weights reordered once into oneDNN's blocked layout, for the matrix products of CPU training steps.

torch multiplies fp32 matrices on CPU through MKL, which on AMD CPUs runs its AVX2 code even where the CPU has
AVX512; oneDNN's linear on a weight packed beforehand (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's
weight freezing uses) runs at the CPU's own rate and, in bf16 too, handles thin products (few rows) better. Measured
on 2 threads of an AVX512-BF16 Zen 5, [200, 576] x [576, 3072] (a MATH batch through SmolLM2's gate|up): fp32 4.8 ->
1.6 ms, bf16 0.96 -> 0.76 ms; the same fp32 product with oneDNN and MKL held to AVX2 4.6 -> 3.0 ms. The numbers are
the plain product's up to float rounding (bit for bit in bf16 here).

Whether packing pays is measured, not assumed (`core.compute.packing_probe`, once per machine and thread count):
on 1 thread of an AVX2-only Zen 3 MKL's own fp32 product was 8-15% faster at a block's shapes, and `linear` then
multiplies plainly. The head's thin products (core.tuning.loss) are packed regardless: there the packed ones ran
1.4-2x faster on every CPU and thread count measured.

A packing costs the weight's memory once more, and once more again for its transpose, made at the first backward
through it (the gradient with respect to the input); both are kept with the module that owns the weight, for as long
as it lives, and made again if the weight changes or moves. `PRIOR_LAB_PACKED_WEIGHTS=0` turns packing off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ENABLED = os.environ.get("PRIOR_LAB_PACKED_WEIGHTS", "1") != "0"
_DTYPES = (torch.float32, torch.bfloat16)
# The dtypes `linear` packs. bf16 products at a block's row counts gained nothing end to end (cached deep MATH step
# 25.1 vs 24.5 ms; bench_tuning MATH 841 vs 885 tokens/s), so bf16 keeps the plain ones and their memory (its thin
# head products do gain: core.tuning.loss packs those).
LINEAR_DTYPES = (torch.float32,)
_ROWS_HINT = 32  # the row count oneDNN lays the packing out for; any count works (measured: no loss at 1-300 rows)
_LOCK = threading.Lock()
# owner module -> {name: PackedWeight}; weak, so the packings go with the model (and deepcopy does not copy them)
_STORE: weakref.WeakKeyDictionary[nn.Module, dict[str, PackedWeight]] = weakref.WeakKeyDictionary()


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] reordered for `product`, or None where this torch, CPU or dtype cannot (no oneDNN; bf16
    without AVX512-BF16-class support raises)."""
    if (weight.device.type != "cpu" or weight.dtype not in _DTYPES or not torch.backends.mkldnn.is_available()
            or weight.numel() == 0):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
    except (AttributeError, RuntimeError):  # a torch without the op, or a CPU the kernel refuses
        return None


def product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) for W packed by `pack`: [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedWeight:
    """A frozen weight's packing, and its transpose's (for the input's gradient), made on first use."""

    def __init__(self, key: tuple, weight: torch.Tensor, forward: torch.Tensor | None) -> None:
        self.key, self.weight, self.forward = key, weight, forward
        self._transposed: torch.Tensor | None = None

    def transposed(self) -> torch.Tensor | None:
        with _LOCK:
            if self._transposed is None:
                self._transposed = pack(self.weight.t())
            return self._transposed


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), tuple(weight.stride())


def packed(owner: nn.Module, name: str, weight: torch.Tensor) -> PackedWeight | None:
    """The packing of `weight` kept with `owner` under `name` (made on first use, or again when the weight changed),
    or None where it cannot be packed."""
    key = _key(weight)
    with _LOCK:
        entries = _STORE.setdefault(owner, {})
        entry = entries.get(name)
    if entry is None or entry.key != key:
        entry = PackedWeight(key, weight, pack(weight))  # a failed packing is kept too: not tried every step
        with _LOCK:
            entries[name] = entry
    return entry if entry.forward is not None else None


class _PackedLinear(torch.autograd.Function):
    """F.linear with a frozen packed weight: the input's gradient through the packed transpose, none for the weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.weight = weight
        return product(x, weight.forward, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        transposed = ctx.weight.transposed()
        if transposed is None:  # cannot happen where the forward packed; kept correct regardless
            return grad @ ctx.weight.weight, None, None
        return product(grad, transposed), None, None


def pays() -> bool:
    """Is a packed fp32 product faster than F.linear on this CPU at the current thread count (measured once per
    machine and thread count by `core.compute.packing_probe`)? False with packing off."""
    return ENABLED and _pays_at(torch.get_num_threads())


@functools.cache
def _pays_at(threads: int) -> bool:  # noqa: ARG001 - the probe reads the thread count itself; this keys the cache
    from core.compute import packing_probe

    probe = packing_probe()
    return probe["packed_gflops"] > probe["plain_gflops"]


def linear(owner: nn.Module, name: str, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen `weight` owned by `owner` (its packing kept there under `name`):
    through oneDNN's packed weight on CPU in `LINEAR_DTYPES` where it can and `pays`, else F.linear itself (CUDA,
    autocast, other dtypes, a weight or bias that trains)."""
    usable = (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in LINEAR_DTYPES
              and x.numel() > 0
              and not weight.requires_grad and (bias is None or not bias.requires_grad)
              and not torch.is_autocast_enabled("cpu") and pays())
    entry = packed(owner, name, weight) if usable else None
    if entry is None:
        return F.linear(x, weight, bias)
    return _PackedLinear.apply(x, entry, bias)


def module_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a projection of a frozen model: packed where it is a plain nn.Linear, else the module itself
    (int8 layers, adapters)."""
    if type(module) is not nn.Linear:
        return module(x)
    return linear(module, "weight", x, module.weight, module.bias)


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's own forward runs its frozen plain `nn.Linear`s on CPU in `LINEAR_DTYPES`
    through `module_linear` (packed where it can; under autocast it falls back to F.linear, so a caller computing
    in autocast should not enter this). For passes that run the model as it is, such as activation extraction; the
    previous forwards are restored on exit."""
    frozen = [module for module in model.modules()
              if type(module) is nn.Linear and "forward" not in vars(module) and not module.weight.requires_grad
              and module.weight.device.type == "cpu" and module.weight.dtype in LINEAR_DTYPES]
    swapped = frozen if frozen and pays() else []  # a model on CUDA never asks the CPU probe
    for module in swapped:
        module.forward = functools.partial(module_linear, module)
    try:
        yield
    finally:
        for module in swapped:
            vars(module).pop("forward", None)
