"""The GPU path, on a tiny random LLaMA with the embedded tokenizer; skipped where no CUDA device is visible.

Runs on a CUDA machine with torch, transformers and peft but none of our other pins:

    PRIOR_LAB_TOKENIZER=<folder with tokenizer.json ...> python -m pytest -q -m gpu tests/test_gpu.py

`PRIOR_LAB_TEST_DEVICE=cpu` runs the same tests on the CPU (to check the tests themselves).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

DEVICE = os.environ.get("PRIOR_LAB_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device visible"),
]


def _examples(n: int, offset: int = 0) -> list:
    return [SimpleNamespace(prompt=f"Question: What is {k % 13} plus {k % 7}?\nAnswer:", target=f" {k % 13 + k % 7}",
                            answers=[str(k % 13 + k % 7)], meta={}) for k in range(offset, offset + n)]


DATA = (_examples(16), _examples(8, offset=100), _examples(4, offset=200))


@pytest.fixture(scope="module")
def gpu_lm():
    from core.models import tiny_llama

    return tiny_llama(device=DEVICE)


@pytest.fixture(scope="module")
def cpu_lm():
    from core.models import tiny_llama

    return tiny_llama(device="cpu")


@pytest.fixture(scope="module")
def saved_tiny(cpu_lm, tmp_path_factory):
    """The tiny model as a local folder (config, safetensors, tokenizer), as a user's checkpoint would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    cpu_lm.model.save_pretrained(folder)
    cpu_lm.tokenizer.save_pretrained(folder)
    return folder


def _config(**kw):
    from core.tuning import TrainConfig

    base = dict(dataset="math", steps=4, batch_size=4, val_every=2, snapshot_every=2, eval_n=0, n_val=8,
                n_tokens=4, lr=0.05)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_load_on_the_device_in_each_precision(saved_tiny, precision):
    from core.compute import decide
    from core.models import load_model

    lm = load_model(str(saved_tiny), precision=precision, device=DEVICE)
    assert lm.device.type == torch.device(DEVICE).type
    assert next(lm.model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    ids = lm.tokenizer(["The capital of France is"], return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=ids).logits.float()).all()
    decision = decide(lm)
    if precision == "bf16":
        assert decision.dtype == "bf16"
    elif lm.device.type == "cuda":
        assert decision.dtype == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_load_in_int8_and_train_a_step(saved_tiny, tmp_path):
    from core.models import load_model
    from core.tuning import train

    lm = load_model(str(saved_tiny), precision="int8", device=DEVICE)
    result = train(lm, _config(steps=2), tmp_path / "int8", examples=DATA)
    assert result.status == "done"
    assert all(h["val_loss"] is None or torch.isfinite(torch.tensor(h["val_loss"])) for h in result.history)


def test_activations_on_the_device_equal_the_cpu(gpu_lm, cpu_lm):
    from core.activations import collect_activations

    texts = ["The cat sat on the mat.", "What is 12 plus 30?", "A longer sentence, with commas, and more words."]
    on_device = collect_activations(gpu_lm, texts, [0, 2, 4], compute="fp32")
    on_cpu = collect_activations(cpu_lm, texts, [0, 2, 4], compute="fp32")
    for layer in (0, 2, 4):
        torch.testing.assert_close(torch.from_numpy(on_device.layer(layer)), torch.from_numpy(on_cpu.layer(layer)),
                                   rtol=2e-3, atol=2e-3)  # rows are stored as float16
    assert (on_device.token_ids == on_cpu.token_ids).all()


@pytest.mark.parametrize("method,extra", [("soft", {}), ("deep", {}), ("deep", {"soft": False})])
def test_training_steps_on_the_device(gpu_lm, tmp_path, method, extra):
    from core.tuning import train

    result = train(gpu_lm, _config(method=method, **extra), tmp_path / method, examples=DATA)
    assert result.status == "done"
    vals = [h["val_loss"] for h in result.history if h["val_loss"] is not None]
    assert len(vals) >= 2 and all(torch.isfinite(torch.tensor(vals)))
    assert vals[-1] < vals[0]  # lr 0.05 on 16 sums: the prompt learns something in 4 steps
    assert all(t.device.type == "cpu" for t in result.prompt.values())  # run files hold CPU tensors


def test_resume_on_the_device_equals_an_uninterrupted_run(gpu_lm, tmp_path):
    import threading

    from core.tuning import train

    straight = train(gpu_lm, _config(), tmp_path / "straight", examples=DATA)
    cancel = threading.Event()

    def stop_after_two(progress) -> None:  # noqa: ANN001
        if progress.step >= 2:
            cancel.set()

    partial = train(gpu_lm, _config(), tmp_path / "resumed", examples=DATA, cancel=cancel,
                    on_progress=stop_after_two)
    assert partial.status == "cancelled"
    resumed = train(gpu_lm, _config(), tmp_path / "resumed", examples=DATA, resume=True)
    torch.testing.assert_close(resumed.prompt["soft"], straight.prompt["soft"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,params", [("soft", {}), ("deep", {"layers": [0, 3]}),
                                           ("deep", {"layers": [2, 3], "soft": False})])
def test_generation_with_prompts_on_the_device(gpu_lm, method, params):
    from core.evaluation import generate
    from core.tuning import build_prompt

    prompt = build_prompt(method, gpu_lm.hidden_size, gpu_lm.num_layers, n_tokens=3, **params)
    gen = torch.Generator().manual_seed(0)
    prompt.load_tensors({k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in prompt.named_tensors().items()})
    prompt.to(gpu_lm.device)
    texts = ["What is 2 plus 3?", "A much longer question that pads the batch: what is 10 plus 11?"]
    batched = generate(gpu_lm, texts, prompt, max_new_tokens=4, compute="fp32")
    alone = [generate(gpu_lm, [t], prompt, max_new_tokens=4, compute="fp32")[0] for t in texts]
    assert batched == alone  # left padding and the KV cache change nothing


@pytest.mark.skipif(importlib.util.find_spec("mathematics_dataset") is None or importlib.util.find_spec("diskcache")
                    is None, reason="precompute needs the project's data packages (mathematics-dataset, diskcache)")
def test_precompute_quick_on_the_device(gpu_lm, tmp_path):
    from core.artifacts import ArtifactStore
    from core.precompute import QUICK, Precompute

    store = ArtifactStore(tmp_path / "artifacts")
    Precompute(gpu_lm, store, QUICK, "test --quick (gpu)", log=lambda _: None).run()
    manifest = store.manifest()
    assert manifest["tasks_done"] == list(Precompute.TASKS)
    assert manifest["compute"]["device"].startswith(DEVICE.split(":")[0])
