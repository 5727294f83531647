"""Frozen weights packed for oneDNN (core.tuning.packed): the block loop's products must keep F.linear's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.tuning import packed

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def packing_pays(monkeypatch):
    """These tests check the packed path's numbers, so it is taken whatever this machine's probe measured (on 1
    thread of an AVX2 CPU the plain product is the faster one and `linear` would step aside)."""
    monkeypatch.setattr(packed, "_pays_at", lambda threads: True)


def _frozen_linear(dtype: torch.dtype, bias: bool) -> nn.Linear:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 24, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(40, generator=gen))
    return layer.to(dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_gives_f_linear_and_its_input_gradient(monkeypatch, dtype, bias):
    """Output and input gradient equal F.linear's for 2-d and 3-d inputs; the weight is really packed (and its
    transpose, at the backward); a weight changed in place is packed again rather than served stale."""
    layer = _frozen_linear(dtype, bias)
    if packed.pack(layer.weight) is None:
        pytest.skip(f"this CPU cannot pack {dtype} weights")
    monkeypatch.setattr(packed, "LINEAR_DTYPES", (torch.float32, torch.bfloat16))  # bf16: off by default, still exact
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for shape in ((7, 24), (3, 5, 24)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        upstream = torch.randn(*shape[:-1], 40, generator=torch.Generator().manual_seed(2)).to(dtype)
        expected = F.linear(x, layer.weight, layer.bias)
        (expected_grad,) = torch.autograd.grad(expected, x, upstream)
        out = packed.module_linear(layer, x)
        (grad,) = torch.autograd.grad(out, x, upstream)
        torch.testing.assert_close(out, expected, **tol)
        torch.testing.assert_close(grad, expected_grad, **tol)
    entry = packed.packed(layer, "weight", layer.weight)
    assert entry is not None and entry._transposed is not None  # both products went through the packings
    with torch.no_grad():
        layer.weight.mul_(-1)
    x = torch.randn(7, 24).to(dtype)
    torch.testing.assert_close(packed.module_linear(layer, x), F.linear(x, layer.weight, layer.bias), **tol)


def test_packed_linear_steps_aside_where_packing_would_change_the_computation(monkeypatch):
    """A weight that trains gets its gradient (F.linear), autocast still casts, zero rows work, and packing off
    means F.linear: the packed path is only ever a faster route to the same numbers."""
    layer = _frozen_linear(torch.float32, bias=False)
    trained = copy.deepcopy(layer).requires_grad_(True)
    x = torch.randn(4, 24)
    packed.module_linear(trained, x).sum().backward()
    assert trained.weight.grad is not None and trained.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed.module_linear(layer, x).dtype == torch.bfloat16
    assert packed.module_linear(layer, x[:0]).shape == (0, 40)
    refused = _frozen_linear(torch.float32, bias=False)
    calls = []
    monkeypatch.setattr(packed, "pack", lambda weight: calls.append(weight) and None)  # a CPU the kernel refuses
    for _ in range(2):
        torch.testing.assert_close(packed.module_linear(refused, x), F.linear(x, refused.weight))
    assert len(calls) == 1  # the refusal is remembered, not retried every step
    monkeypatch.setattr(packed, "ENABLED", False)
    fresh = _frozen_linear(torch.float32, bias=False)
    packed.module_linear(fresh, x)
    assert not packed._STORE.get(fresh)  # nothing packed for it


def test_plain_products_where_the_probe_measured_them_faster(monkeypatch, tmp_path):
    """Packing is decided by `core.compute.packing_probe` per machine and thread count: where F.linear measured
    faster, `linear` and `packed_linears` multiply plainly and pack nothing (no second copy of the weights)."""
    import core.compute

    monkeypatch.setattr(core.compute, "cache_subdir", lambda name: tmp_path)
    probe = core.compute.packing_probe(refresh=True)
    assert probe["plain_gflops"] > 0 and probe["packed_gflops"] > 0 and probe["threads"] == torch.get_num_threads()
    assert core.compute.packing_probe() == probe  # read back, not measured again
    monkeypatch.undo()  # the real decision, from a probe file that says plain products are faster
    monkeypatch.setattr(core.compute, "cache_subdir", lambda name: tmp_path)
    monkeypatch.setattr(core.compute, "packing_probe", lambda: {"packed_gflops": 80.0, "plain_gflops": 90.0})
    packed._pays_at.cache_clear()
    try:
        assert not packed.pays()
        layer = _frozen_linear(torch.float32, bias=False)
        x = torch.randn(4, 24)
        torch.testing.assert_close(packed.module_linear(layer, x), F.linear(x, layer.weight))
        assert not packed._STORE.get(layer)  # nothing packed
        with packed.packed_linears(layer):
            assert "forward" not in vars(layer)  # nothing swapped
    finally:
        packed._pays_at.cache_clear()


def test_a_copied_model_does_not_carry_or_share_packings():
    """Packings live beside the module, not in it: deepcopy copies the weights only, and the copy packs its own."""
    layer = _frozen_linear(torch.float32, bias=False)
    x = torch.randn(3, 24)
    packed.module_linear(layer, x)
    clone = copy.deepcopy(layer)
    assert clone not in packed._STORE
    with torch.no_grad():
        clone.weight.mul_(2)
    torch.testing.assert_close(packed.module_linear(clone, x), 2 * packed.module_linear(layer, x))


def test_packed_linears_runs_a_models_own_forward_packed_and_restores_it():
    """Activation extraction runs the model's own forward: inside `packed_linears` its frozen linears go through
    their packings with the same numbers, a trainable one is left alone, and every forward is restored on exit,
    also when the pass is cut short by an exception (as `run_forward` stops at its deepest layer)."""
    model = nn.Sequential(_frozen_linear(torch.float32, bias=True), nn.ReLU(), nn.Linear(40, 8))
    model[0].requires_grad_(False)
    x = torch.randn(5, 24)
    expected = model(x)
    with packed.packed_linears(model):
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert "weight" in packed._STORE.get(model[0], {})  # the frozen one really ran packed
        assert "forward" not in vars(model[2])  # the trainable one runs as it is
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="stop"), packed.packed_linears(model):
        raise RuntimeError("stop")
    assert not any("forward" in vars(m) for m in model.modules())
    bf16 = _frozen_linear(torch.bfloat16, bias=False)
    with packed.packed_linears(bf16):  # bf16 keeps the plain products (LINEAR_DTYPES): nothing is swapped
        assert "forward" not in vars(bf16)
