"""Soft prompts as PEFT prompt-tuning adapters: export for `peft.PeftModel.from_pretrained`, import back.

    >>> export_peft(run.prompt["soft"], "adapter/", lm, base_model="path/or/hub-id")
    >>> soft = import_peft("adapter/")             # [n, d] fp32

The files are written directly (adapter_config.json + adapter_model.safetensors
with the key "prompt_embeddings" [n, d], as PEFT saves prompt tuning), so
exporting does not need peft installed; only loading it in PEFT does.
Deep prompts have no PEFT equivalent (PEFT's prefix tuning injects keys and
values, not layer inputs), so only soft prompts export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE, WEIGHTS_FILE, PEFT_KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
PEFT_FORMAT_VERSION = "0.21.2"  # the peft version whose config layout this mirrors (requirements-dev.txt)


def export_peft(soft: torch.Tensor | dict, out_dir: str | Path, lm, base_model: str | None = None) -> Path:
    """Write a PEFT PROMPT_TUNING adapter for a soft prompt `soft` [n, d] (or a run's prompt dict).

    base_model: what `base_model_name_or_path` names (a hub id or a local folder with the base weights);
    defaults to the loaded model's name. Raises ValueError for a deep prompt or a width that does not match `lm`.
    """
    if isinstance(soft, dict):
        deep = [k for k in soft if k.startswith("deep.")]
        if deep:
            raise ValueError(f"this is a deep prompt ({', '.join(deep)}): PEFT prompt tuning holds only the "
                             "token-level soft prompt; export a soft-prompt run")
        soft = soft["soft"]
    soft = torch.as_tensor(soft).detach().float().cpu()
    if soft.ndim != 2 or soft.shape[1] != lm.hidden_size:
        raise ValueError(f"soft prompt must be [n, {lm.hidden_size}] for this model; got {tuple(soft.shape)}")
    cfg = lm.model.config
    config = {
        "task_type": "CAUSAL_LM", "peft_type": "PROMPT_TUNING", "auto_mapping": None,
        "peft_version": PEFT_FORMAT_VERSION, "base_model_name_or_path": base_model or lm.name, "revision": None,
        "inference_mode": True, "num_virtual_tokens": int(soft.shape[0]), "token_dim": int(soft.shape[1]),
        "num_transformer_submodules": 1, "num_attention_heads": int(cfg.num_attention_heads),
        "num_layers": int(cfg.num_hidden_layers), "modules_to_save": None, "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({PEFT_KEY: soft.contiguous()}, str(out / WEIGHTS_FILE))
    return out


def import_peft(adapter_dir: str | Path, hidden_size: int | None = None) -> torch.Tensor:
    """Read a PEFT prompt-tuning adapter's soft prompt: [n, d] fp32 (checked against `hidden_size` if given)."""
    folder = Path(adapter_dir)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"adapter type is {config.get('peft_type')!r}; only PROMPT_TUNING adapters hold a soft prompt")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    if PEFT_KEY not in tensors:
        raise ValueError(f"{WEIGHTS_FILE} has no {PEFT_KEY!r} tensor (keys: {', '.join(tensors)})")
    soft = tensors[PEFT_KEY].float()
    if hidden_size is not None and soft.shape[-1] != hidden_size:
        raise ValueError(f"adapter width {soft.shape[-1]} does not match this model's {hidden_size}")
    return soft
