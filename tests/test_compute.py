"""The compute policy (core.compute) and deep prompt-tuning from cached activations (core.tuning.cached)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import core.paths
from core import compute as policy
from core.tuning import TrainConfig, build_prompt, collate, encode_examples, train
from core.tuning.blocks import residual_before
from core.tuning.cached import ResidualCache, residual_stream
from core.tuning.loss import answer_loss, common_token_prefix


def _lm(precision: str = "fp32", device: str = "cpu") -> SimpleNamespace:
    return SimpleNamespace(precision=precision, device=torch.device(device))


def test_auto_on_cpu_follows_the_measured_matmul_rates(monkeypatch):
    policy._auto_for_device.cache_clear()
    monkeypatch.setattr(policy, "cpu_matmul_probe",
                        lambda: {"bf16_gflops": 0.9, "fp32_gflops": 75.0, "capability": "AVX2"})
    slow = policy.decide(_lm())
    assert slow.dtype == "fp32" and "0.9" in slow.reason and "75" in slow.reason
    policy._auto_for_device.cache_clear()
    monkeypatch.setattr(policy, "cpu_matmul_probe",
                        lambda: {"bf16_gflops": 780.0, "fp32_gflops": 172.0, "capability": "AVX512_BF16"})
    assert policy.decide(_lm()).dtype == "bf16"
    policy._auto_for_device.cache_clear()


def test_explicit_compute_is_never_overridden_and_bad_names_are_refused():
    assert policy.decide(_lm(), "bf16").dtype == "bf16"
    assert policy.decide(_lm(), "fp32").dtype == "fp32"
    assert policy.decide(_lm("bf16"), "auto").dtype == "bf16"  # bf16 weights compute in bf16
    with pytest.raises(ValueError, match="compute 'fp32' needs an fp32 or int8 model"):
        policy.decide(_lm("bf16"), "fp32")
    with pytest.raises(ValueError, match="compute must be one of auto, bf16, fp32"):
        policy.decide(_lm(), "fp16")


def test_probe_is_quick_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "cache_subdir", lambda name: tmp_path)
    first = policy.cpu_matmul_probe(refresh=True)
    assert first["bf16_gflops"] > 0 and first["fp32_gflops"] > 0
    files = list(tmp_path.glob("cpu-probe-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["cpu"] == first["cpu"]
    assert policy.cpu_matmul_probe() == first  # read back, not measured again


def _math(n: int, offset: int = 0) -> list:
    return [SimpleNamespace(prompt=f"Question: What is {k % 13} plus {k % 7}?\nAnswer:", target=f" {k % 13 + k % 7}",
                            answers=[str(k % 13 + k % 7)], meta={}) for k in range(offset, offset + n)]


@pytest.mark.parametrize("layers", [[2, 3], [1, 3], [2], [3]])
def test_cached_residual_loss_equals_the_full_forward(tiny_lm, tmp_path, monkeypatch, layers):
    """The cached path (the start block's token attention cached, its deep keys joined to it; the last block at
    the read positions only) gives the full pass's loss and gradients, with prompted blocks anywhere from the
    start block on, the last block alone included, and rows sharing a token prefix ("Question: What is")."""
    monkeypatch.setattr(core.paths, "CACHE_DIR", tmp_path)  # computed here, not read from an earlier run's cache
    prompt = build_prompt("deep", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=3, layers=layers, soft=False)
    gen = torch.Generator().manual_seed(0)
    prompt.load_tensors({k: torch.randn(v.shape, generator=gen) for k, v in prompt.named_tensors().items()})
    assert prompt.n_prefix == 0 and set(prompt.named_tensors()) == {f"deep.{x}" for x in layers}
    # sharper attention than the random init's (near uniform, where a query at the wrong position or a wrong
    # score scale hardly moves the output), so the cached queries and the score join are really checked
    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    items = encode_examples(tiny_lm.tokenizer, _math(6))
    full = answer_loss(model, prompt, collate(items, tiny_lm.tokenizer.pad_token_id))
    full.backward()
    full_grads = {k: p.grad.clone() for k, p in prompt.named_tensors().items()}
    prompt.zero_grad(set_to_none=True)
    start = min(layers)
    cache = ResidualCache(tiny_lm, model, None, start=start)
    batch = collate(items, tiny_lm.tokenizer.pad_token_id)
    # residuals computed in another grouping than the batch: a row's stream must not depend on its batch-mates
    cache.get(items[3:]), cache.get(items[:3])
    cache.attach(batch, items)
    assert batch.first_attention is not None and common_token_prefix(batch) > 0
    cached = answer_loss(model, prompt, batch)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    cached.backward()
    for name, param in prompt.named_tensors().items():
        assert param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stop", [1, 3])
def test_cache_fill_through_the_block_loop_equals_the_models_forward(tiny_lm, stop):
    """The cache's fill runs blocks 0..stop-1 as the training loop does (the rows' common tokens once, nothing after
    a row's kept positions): at every kept position of rows of different lengths it gives the residual stream the
    model's own forward gives there, and zeros after."""
    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():  # sharper attention than the random init's, so a wrong position or mask shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    items = encode_examples(tiny_lm.tokenizer, _math(2) + _math(1, offset=12))  # "12 plus 5": longer
    batch = collate(items, tiny_lm.tokenizer.pad_token_id)
    assert common_token_prefix(batch) > 0 and len({len(x.ids) for x in items}) > 1
    kept = [len(x.ids) - 1 for x in items]
    loop = residual_before(model, batch.input_ids, kept, stop)
    forward = residual_stream(model, batch.input_ids, stop)
    for row, n in enumerate(kept):
        torch.testing.assert_close(loop[row, :n], forward[row, :n], rtol=1e-5, atol=1e-5)
        assert not loop[row, n:].any()
    with pytest.raises(ValueError, match="stop block"):
        residual_before(model, batch.input_ids, kept, tiny_lm.num_layers)


def test_deep_without_soft_trains_from_the_cache_and_matches_the_uncached_run(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(core.paths, "CACHE_DIR", tmp_path / "cache")  # computed here, not read from an earlier run's
    data = (_math(16), _math(8, offset=100), [])
    base = dict(method="deep", dataset="math", soft=False, layers=[2, 3], n_tokens=3, steps=3, batch_size=4,
                val_every=1, snapshot_every=1, eval_n=0, n_val=8, compute="fp32", lr=0.05, prior="gaussian")
    cached = train(tiny_lm, TrainConfig(**base), tmp_path / "cached", examples=data)
    plain = train(tiny_lm, TrainConfig(**base, cached_activations=False), tmp_path / "plain", examples=data)
    assert set(cached.prompt) == {"deep.2", "deep.3"}
    for a, b in zip(cached.history, plain.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert any((tmp_path / "cache" / "residuals").iterdir())  # the cached run really stored residuals
    config = json.loads((tmp_path / "cached" / "run.json").read_text())["config"]
    assert config["cached_from_layer"] == 2 and config["compute_resolved"] == "fp32"
    assert config["compute_reason"].startswith("fp32")


def test_no_soft_is_refused_for_the_soft_method():
    with pytest.raises(ValueError, match="only applies to --method deep"):
        TrainConfig(method="soft", soft=False)


def test_probe_takes_each_dtype_best_round_so_a_burst_of_load_does_not_decide(tmp_path, monkeypatch):
    """The dashboard's pages once probed while other pages computed: one slow bf16 round must not flip the choice."""
    monkeypatch.setattr(policy, "cache_subdir", lambda name: tmp_path)
    rounds = iter([15.0, 170.0, 560.0, 180.0, 540.0, 175.0])  # bf16, fp32, ... : the first bf16 round under load
    monkeypatch.setattr(policy, "matmul_gflops", lambda dtype, device, seconds: next(rounds))
    probe = policy.cpu_matmul_probe(refresh=True)
    assert probe["bf16_gflops"] == 560.0 and probe["fp32_gflops"] == 180.0


def test_concurrent_first_asks_measure_once(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(policy, "cache_subdir", lambda name: tmp_path)
    calls = []

    def rate(dtype, device, seconds):
        calls.append(dtype)
        return 100.0

    monkeypatch.setattr(policy, "matmul_gflops", rate)
    threads = [threading.Thread(target=policy.cpu_matmul_probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 * policy.PROBE_ROUNDS  # one measurement; the other threads read its file


def test_auto_is_fp32_on_a_cpu_limited_to_avx2(tmp_path):
    """Measured, not mocked: this CPU limited to AVX2 kernels (torch's and oneDNN's own switches, as on the AVX2-only
    machines where bf16 ran 26x slower) makes the probe see slow bf16, and auto resolves to fp32."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PRIOR_LAB_CACHE": str(tmp_path)}
    code = ("import torch, json; from core.compute import decide_for, cpu_matmul_probe; "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), decide_for('fp32', 'cpu').dtype, "
            "cpu_matmul_probe()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    capability, dtype, probe = json.loads(out.stdout.strip().splitlines()[-1])
    if capability != "AVX2":
        pytest.skip(f"this torch ignores ATEN_CPU_CAPABILITY (capability {capability})")
    assert dtype == "fp32", probe
    assert probe["bf16_gflops"] * policy.BF16_MIN_SPEEDUP < probe["fp32_gflops"]


def test_cpu_training_asks_malloc_to_keep_freed_memory(tiny_lm):
    """`compute_model` on CPU asks glibc to keep freed memory for the next step (mallopt accepts both settings),
    once per process. Whether a freed block is then reused without page faults depends on where the heap can
    grow: a fresh process measured 5 of 6 times here, 0 of 4 inside a full test run, so it is not asserted."""
    import ctypes.util

    from core.tuning import compute_model

    if not ctypes.util.find_library("c"):
        pytest.skip("no C library found to ask")
    policy.keep_freed_memory.cache_clear()
    compute_model(tiny_lm, "fp32")
    assert policy.keep_freed_memory.cache_info().currsize == 1
    assert policy.keep_freed_memory() is True
