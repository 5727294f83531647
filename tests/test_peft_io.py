"""Soft prompts as PEFT prompt-tuning adapters: PEFT loads ours and gives the same loss; import round trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.peft_io import export_peft, import_peft
from core.tuning import answer_loss, build_prompt, collate, encode_examples

EX = [SimpleNamespace(prompt=f"Question: What is {k} times 3?\nAnswer:", target=f" {3 * k}", answers=[str(3 * k)])
      for k in (2, 17, 123)]


def test_peft_loads_our_adapter_with_the_same_loss(tiny_lm, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "tiny-base"  # the tiny model is on no hub: save it so the adapter can name it
    tiny_lm.model.save_pretrained(base_dir)
    prompt = build_prompt("soft", tiny_lm.hidden_size, tiny_lm.num_layers, n_tokens=5)
    prompt.load_tensors({"soft": torch.randn(5, tiny_lm.hidden_size, generator=torch.Generator().manual_seed(0))})
    adapter = export_peft(prompt.tensors(), tmp_path / "adapter", tiny_lm, base_model=str(base_dir))

    base = AutoModelForCausalLM.from_pretrained(adapter.parent / "tiny-base")
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    batch = collate(encode_examples(tiny_lm.tokenizer, EX), tiny_lm.tokenizer.pad_token_id)
    labels = torch.full(batch.input_ids.shape, -100)
    labels[batch.rows, batch.cols] = batch.labels
    mask = (torch.arange(batch.input_ids.shape[1])[None] <= batch.cols.new_tensor(
        [int(batch.cols[batch.rows == r].max()) for r in range(len(EX))])[:, None]).long()
    with torch.no_grad():
        theirs = model(input_ids=batch.input_ids, attention_mask=mask, labels=labels).loss
        ours = answer_loss(tiny_lm.model, prompt, batch) / batch.n_answer
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    back = import_peft(adapter, hidden_size=tiny_lm.hidden_size)
    assert torch.equal(back, prompt.tensors()["soft"])


def test_export_and_import_errors(tiny_lm, tmp_path):
    deep = {"soft": torch.zeros(2, 64), "deep.3": torch.zeros(2, 64)}
    with pytest.raises(ValueError, match="this is a deep prompt"):
        export_peft(deep, tmp_path / "a", tiny_lm)
    with pytest.raises(ValueError, match=r"soft prompt must be \[n, 64\]"):
        export_peft(torch.zeros(2, 8), tmp_path / "a", tiny_lm)
    with pytest.raises(FileNotFoundError, match="is not a PEFT adapter"):
        import_peft(tmp_path)
    export_peft(torch.zeros(2, 64), tmp_path / "ok", tiny_lm)
    with pytest.raises(ValueError, match="does not match this model's 576"):
        import_peft(tmp_path / "ok", hidden_size=576)
    cfg = tmp_path / "ok" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace("PROMPT_TUNING", "LORA"))
    with pytest.raises(ValueError, match="only PROMPT_TUNING adapters"):
        import_peft(tmp_path / "ok")
