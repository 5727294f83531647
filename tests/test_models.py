"""Model loading: embedded default, local folders, precisions, fingerprints and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from core.models import ModelLoadError, load_model


def _fingerprint_in_new_process(name: str) -> str:
    code = f"from core.models import load_model; print(load_model({name!r}, device='cpu').fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_bad_precision_says_what_is_allowed():
    with pytest.raises(ValueError, match="fp32, bf16, int8"):
        load_model(precision="fp16")


def test_unknown_id_offline_names_the_embedded_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("no-such-org/no-such-model-xyz")


def test_int8_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
        load_model(precision="int8")


def test_local_folder_loads_with_a_stable_fingerprint(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.num_layers == tiny_lm.num_layers
    assert lm.fingerprint == _fingerprint_in_new_process(str(tmp_path))
    for name, tensor in tiny_lm.model.state_dict().items():
        assert torch.equal(tensor, lm.model.state_dict()[name]), name


def test_bf16_and_int8_on_cpu(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    ids = tiny_lm.tokenizer("a short test", return_tensors="pt")
    ref = tiny_lm.model(**ids).logits
    for precision in ("bf16", "int8"):
        lm = load_model(str(tmp_path), precision=precision, device="cpu")
        assert lm.fingerprint.endswith(precision)
        out = lm.model(**ids).logits.float()
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert not any(p.requires_grad for p in lm.model.parameters())


@pytest.mark.integration
def test_embedded_model_is_smollm2_and_knows_paris(real_lm):
    assert type(real_lm.model).__name__ == "LlamaForCausalLM"
    assert (real_lm.num_layers, real_lm.hidden_size) == (30, 576)
    ids = real_lm.tokenizer("The capital of France is", return_tensors="pt")
    out = real_lm.model.generate(**ids, max_new_tokens=4, do_sample=False)
    continuation = real_lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert continuation.strip().startswith("Paris")


@pytest.mark.integration
def test_embedded_fingerprint_is_stable_across_processes(real_lm):
    assert real_lm.fingerprint == _fingerprint_in_new_process("smollm2-135m")
