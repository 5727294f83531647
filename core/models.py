"""Loading the frozen causal LM: the embedded SmolLM2, any hub id or local folder, or a tiny test model.

    >>> lm = load_model()                      # embedded SmolLM2-135M-Instruct, fp32
    >>> lm.num_layers, lm.hidden_size
    (30, 576)

The embedded GGUF is dequantised once (~20 s) and saved as fp32 safetensors in
the gitignored cache; later loads read that folder in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.assets import ASSETS, asset_path, ensure_asset
from core.hub import hub_host, hub_offline, hub_reachable
from core.paths import MODELS_DIR

DEFAULT_MODEL = "smollm2-135m"
PRECISIONS = ("fp32", "bf16", "int8")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Aliases a user may type for the embedded model.
EMBEDDED_ALIASES = {DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct", "embedded"}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and identity.

    `fingerprint` identifies the weights and their precision: the same weights
    loaded in another process give the same string, so it can key caches.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    precision: str
    fingerprint: str
    load_seconds: float = 0.0
    source: str = ""  # where the weights came from, for the UI
    extra: dict = field(default_factory=dict)

    @property
    def config(self):  # noqa: ANN201 - transformers config
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def architecture(self) -> str:
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return archs[0]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        """The transformer blocks, `model.model.layers` for LLaMA-style models."""
        return self.model.model.layers

    def input_embeddings(self) -> torch.Tensor:
        """Token-embedding matrix as fp32 on the CPU, [vocab, d]."""
        return self.model.get_input_embeddings().weight.detach().float().cpu()

    def summary(self) -> dict:
        """What the home page shows about the model."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "layers": self.num_layers,
            "width": self.hidden_size,
            "parameters": self.num_parameters,
            "vocabulary": int(self.model.config.vocab_size),
            "device": str(self.device),
            "precision": self.precision,
            "load time (s)": round(self.load_seconds, 2),
            "source": self.source,
            "fingerprint": self.fingerprint,
        }


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device(device)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "int8":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                "precision 'int8' needs bitsandbytes: pip install bitsandbytes==0.50.2 "
                "(or choose precision 'fp32' or 'bf16')"
            ) from exc


def _embedded_dir() -> Path:
    """Folder of fp32 safetensors converted from the embedded GGUF (built once)."""
    asset = ASSETS["smollm2"]
    target = MODELS_DIR / f"smollm2-135m-instruct-{asset.sha256[:12]}"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = ensure_asset("smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("converting the embedded GGUF to safetensors once (about 20 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF quantizer cannot be serialised; weights are already fp32
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / "prior_lab_source.json").write_text(
        json.dumps({"gguf": str(gguf), "sha256": ASSETS["smollm2"].sha256})
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def _local_fingerprint(folder: Path) -> str:
    """Hash of the weight files' names, sizes and first/last MiB: cheap and stable."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"})
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _state_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter's bytes; for small in-process models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_hub_id(name: str) -> None:
    """Fail in seconds, with the way out, when a hub id cannot be fetched and is not cached locally."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # already in the local hub cache: transformers loads it from there
    why = None
    if hub_offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    elif not hub_reachable():
        why = f"the Hugging Face hub ({hub_host()}) cannot be reached from this machine"
    if why:
        raise ModelLoadError(
            f"could not load model {name!r}: it is not a local folder and {why}. Use the embedded model "
            f"{DEFAULT_MODEL!r}, which needs no network, or a local folder with config.json and weights."
        )


def _local_folder(name: str) -> Path | None:
    """The local model folder `name` names, or None for a hub id.

    Raises ModelLoadError for a folder, or a path-like name (./x, ../x, /x, ~/x), that holds no config.json,
    instead of letting transformers read it as a hub id.
    """
    path = Path(name).expanduser()
    if not (name.startswith(("./", "../", "/", "~")) or path.exists()):
        return None
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    why = ("the folder does not exist" if not path.exists() else
           "it is a file, not a folder" if not path.is_dir() else "the folder holds no model")
    raise ModelLoadError(f"no config.json in {path} ({why}): a local model folder needs config.json and the "
                         f"weights, as save_pretrained writes them; or use {DEFAULT_MODEL!r} or a hub id")


def _embedded_weights_id() -> str:
    return f"smollm2-135m-instruct-gguf-{ASSETS['smollm2'].sha256[:16]}"


def known_fingerprint(name: str, precision: str = "fp32") -> str | None:
    """The `LoadedModel.fingerprint` that `load_model(name, precision)` will have, without loading any weights;
    None where only loading tells (a local folder or a hub id). Lets a page match committed artifacts first."""
    return f"{_embedded_weights_id()}:{precision}" if name in EMBEDDED_ALIASES else None


def load_model(name: str = DEFAULT_MODEL, precision: str = "fp32", device: str = "auto") -> LoadedModel:
    """Load a frozen causal LM.

    name: "smollm2-135m" (embedded, offline), a Hugging Face model id, or a local folder.
    precision: "fp32", "bf16", or "int8" (bitsandbytes 8-bit; runs on CPU too).
    device: "auto" (CUDA when present), "cpu" or "cuda[:i]".
    """
    _check_precision(precision)
    dev = resolve_device(device)
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in EMBEDDED_ALIASES:
        folder: str | Path = _embedded_dir()
        display, source = DEFAULT_MODEL, f"embedded: {ASSETS['smollm2'].description}"
        weights_id = _embedded_weights_id()
    elif _local_folder(name):
        folder = _local_folder(name)
        display, source = folder.name, f"local folder {folder}"
        weights_id = f"local-{_local_fingerprint(folder)}"
    else:
        folder, display, source = name, name, f"Hugging Face hub: {name}"
        weights_id = None  # the snapshot's commit, read after loading
        _check_hub_id(name)

    kwargs: dict = {}
    if precision == "int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": str(dev) if dev.type == "cpu" else dev.index or 0}
    else:
        kwargs["dtype"] = _DTYPES[precision]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub did not provide it (no network, or an unknown id)"
        raise ModelLoadError(
            f"could not load model {name!r}: it is not a local folder and {why}. "
            f"Use the embedded model {DEFAULT_MODEL!r}, which needs no network, or a local folder "
            f"with config.json and weights. ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    if precision != "int8":
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if weights_id is None:
        commit = getattr(model.config, "_commit_hash", None) or "unknown-commit"
        weights_id = f"hub-{name}-{commit}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=display,
        device=dev,
        precision=precision,
        fingerprint=f"{weights_id}:{precision}",
        load_seconds=time.perf_counter() - start,
        source=source,
    )


def embedded_tokenizer_dir() -> Path:
    """A folder with the embedded model's tokenizer files.

    `PRIOR_LAB_TOKENIZER` names a folder holding only those files (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json: 3.5 MB), for a machine without the GGUF, such as a GPU box that runs the
    `gpu` tests; otherwise the converted embedded model's folder.
    """
    env = os.environ.get("PRIOR_LAB_TOKENIZER")
    if env:
        folder = Path(env).expanduser()
        if not (folder / "tokenizer.json").exists():
            raise ModelLoadError(f"PRIOR_LAB_TOKENIZER={env} has no tokenizer.json: point it at a folder holding "
                                 "the embedded model's tokenizer files, or unset it")
        return folder
    return _embedded_dir()


def tiny_llama(
    num_layers: int = 4, hidden_size: int = 64, vocab_size: int | None = None, seed: int = 0, device: str = "cpu"
) -> LoadedModel:
    """A tiny randomly initialised LLaMA with the embedded model's tokenizer, for tests.

    Uses the embedded tokenizer (so texts tokenise as on the real model) but a
    random model of a few layers; builds in well under a second once the
    embedded folder exists. The same seed gives the same weights on every device.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    fingerprint = _state_fingerprint(model)
    dev = resolve_device(device)
    model.to(dev)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=f"tiny-llama-{num_layers}x{hidden_size}",
        device=dev,
        precision="fp32",
        fingerprint=f"tiny-{fingerprint}:fp32",
        source="random tiny LLaMA built in-process (tests)",
    )


def embedded_model_dir() -> Path:
    """The embedded model as fp32 safetensors, converted from its GGUF on first call (set-up does it)."""
    return _embedded_dir()


def embedded_asset_present() -> bool:
    return asset_path("smollm2").exists()
