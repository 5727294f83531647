"""Per-layer hidden states of a frozen causal LM, exact to the token, cached on disk.

    >>> acts = collect_activations(lm, ["The cat sat.", "2 + 3 = 5"], layers=[0, 15])
    >>> acts.layer(15).shape          # [n_rows, d]: 4 + 7 tokens, first token of each text left out
    (9, 576)
    >>> acts.n_excluded               # one attention-sink row per text
    2

Layer numbering (TransformerLens-like hook names `embed` and `blocks.{i}.output`):

- layer 0: the embedding output (token embeddings), [n_rows, d]
- layer i (1..L): the output of decoder block i-1, i.e. the residual stream after i
  blocks; layer L is the last block's output *before* the final norm. (In
  transformers 5 `output_hidden_states[-1]` is taken after the final norm.)

How it is fast without changing the numbers: forward hooks capture the asked
layers and a hook on the deepest one raises a private exception, so no later
block, final norm or output head runs; texts are sorted by length before
batching so little work goes to padding; with an fp32 model on a device where
bf16 is fast (`core.compute` decides, `compute="auto"`), the blocks run under
bf16 autocast, which keeps the residual stream in fp32 and is within about 1%
relative error of fp32 on ordinary tokens, about 2% on the few massive-activation
rows (measured by `bench/bench_activations.py`); elsewhere they run in the model's
own precision (`compute="native"`, or "fp32" for an fp32 model). Rows are stored as float16.

Padding is on the right, so real tokens keep positions 0..len-1 and never attend
to padding: a text's activations do not depend on what it is batched with
(beyond float rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.models import LoadedModel
from core.paths import cache_subdir
from core.tuning.packed import packed_linears

FORMAT_VERSION = 1  # bump when the stored layout changes; old entries are then ignored
# Bounded so a long session cannot fill the disk; least recently used entries go first.
CACHE_SIZE_LIMIT = int(float(os.environ.get("PRIOR_LAB_ACTIVATION_CACHE_GB", "2")) * 2**30)
COMPUTE_MODES = ("auto", "bf16", "fp32", "native")
FP16_MAX = 65504.0

ProgressFn = Callable[[float], None]


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer to end the forward pass there."""


# --------------------------------------------------------------------------- result type


@dataclass(frozen=True)
class Activations:
    """Hidden states of a set of texts at a few layers; one row per real token.

    Arrays over *all* real tokens are private; the public view drops each text's
    first token (the attention sink, whose norm is orders of magnitude larger)
    unless `include_first=True` (see `with_first_token()`). Every public array is
    aligned with the rows of `layer(i)`:

    - `layer(i)`      float32 [n_rows, d] (a float32 copy of the float16 storage)
    - `token_ids`     int64 [n_rows]
    - `doc_index`     int64 [n_rows], index into `texts`
    - `positions`     int64 [n_rows], 0 = first token of its text
    - `token_texts`   str [n_rows], each token decoded on its own
    - `n_excluded`    rows left out of the view (first tokens), 0 when included
    """

    layers: tuple[int, ...]
    texts: tuple[str, ...]
    fingerprint: str
    compute: str
    _hidden: dict[int, np.ndarray] = field(repr=False)  # layer -> float16 [n_all, d]
    _token_ids: np.ndarray = field(repr=False)
    _doc_index: np.ndarray = field(repr=False)
    _positions: np.ndarray = field(repr=False)
    _token_texts: np.ndarray = field(repr=False)
    n_overflow: int = 0  # values clipped to the float16 range when stored
    include_first: bool = False

    # ---- view
    @property
    def _keep(self) -> np.ndarray:
        if self.include_first:
            return np.ones(len(self._positions), dtype=bool)
        return self._positions > 0

    def with_first_token(self, include: bool = True) -> Activations:
        """The same activations with the first (attention-sink) token of each text in the view or not."""
        return dataclasses.replace(self, include_first=include)

    def layer(self, i: int) -> np.ndarray:
        """Activations at layer `i` as float32 [n_rows, d]."""
        if i not in self._hidden:
            raise ValueError(
                f"layer {i} ({hook_name(i)}) was not collected; these activations hold layers {list(self.layers)}: "
                "collect it by passing it in `layers`"
            )
        return self._hidden[i][self._keep].astype(np.float32)

    @property
    def token_ids(self) -> np.ndarray:
        return self._token_ids[self._keep]

    @property
    def doc_index(self) -> np.ndarray:
        return self._doc_index[self._keep]

    @property
    def positions(self) -> np.ndarray:
        return self._positions[self._keep]

    @property
    def token_texts(self) -> np.ndarray:
        return self._token_texts[self._keep]

    @property
    def n_excluded(self) -> int:
        return int((~self._keep).sum())

    @property
    def n_rows(self) -> int:
        return int(self._keep.sum())

    @property
    def n_docs(self) -> int:
        return len(self.texts)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self._hidden.values())).shape[1])

    def first_token_rows(self, i: int) -> np.ndarray:
        """The excluded first-token rows at layer `i`, float32 [n_docs, d] (for showing the sink openly)."""
        return self._hidden[i][self._positions == 0].astype(np.float32)

    def document_means(self, i: int) -> np.ndarray:
        """Mean activation of each text at layer `i` over the rows in view, float32 [n_docs, d].

        A text whose only token is the excluded first one falls back to that token,
        so every text has a finite mean.
        """
        return _mean_by_doc(self._hidden[i], self._doc_index, self._keep, self.n_docs)

    def rows_frame(self) -> pd.DataFrame:
        """Metadata of the rows in view (hover data): token, token_id, doc, position, text (first 80 chars)."""
        snippets = np.array([t[:80] for t in self.texts], dtype=object)
        return pd.DataFrame({
            "token": [repr(str(t)) for t in self.token_texts],  # str(): a numpy str's repr is "np.str_('...')"
            "token_id": self.token_ids,
            "doc": self.doc_index,
            "position": self.positions,
            "text": snippets[self.doc_index],
        })

    # ---- storage
    def to_bytes(self) -> bytes:
        """An .npz image (no pickle) for the disk cache."""
        arrays = {f"hidden_{i}": h for i, h in self._hidden.items()}
        buf = io.BytesIO()
        np.savez(
            buf,
            version=np.array(FORMAT_VERSION),
            layers=np.array(self.layers, dtype=np.int64),
            texts=np.array(self.texts, dtype=str),
            fingerprint=np.array(self.fingerprint),
            compute=np.array(self.compute),
            token_ids=self._token_ids,
            doc_index=self._doc_index,
            positions=self._positions,
            token_texts=self._token_texts,
            n_overflow=np.array(self.n_overflow),
            **arrays,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Activations:
        """Inverse of `to_bytes`; raises ValueError on a damaged or outdated image."""
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            if int(z["version"]) != FORMAT_VERSION:
                raise ValueError(f"stored activations have format {int(z['version'])}, expected {FORMAT_VERSION}")
            layers = tuple(int(x) for x in z["layers"])
            hidden = {i: z[f"hidden_{i}"] for i in layers}
            acts = cls(
                layers=layers,
                texts=tuple(str(t) for t in z["texts"]),
                fingerprint=str(z["fingerprint"]),
                compute=str(z["compute"]),
                _hidden=hidden,
                _token_ids=z["token_ids"],
                _doc_index=z["doc_index"],
                _positions=z["positions"],
                _token_texts=z["token_texts"],
                n_overflow=int(z["n_overflow"]),
            )
        n = len(acts._positions)
        if any(h.shape[0] != n or h.dtype != np.float16 for h in hidden.values()):
            raise ValueError("stored activations are inconsistent (row counts or dtype)")
        return acts


def _mean_by_doc(hidden: np.ndarray, doc_index: np.ndarray, keep: np.ndarray, n_docs: int) -> np.ndarray:
    d = hidden.shape[1]
    sums = np.zeros((n_docs, d), dtype=np.float64)
    counts = np.zeros(n_docs, dtype=np.int64)
    np.add.at(sums, doc_index[keep], hidden[keep].astype(np.float64))
    np.add.at(counts, doc_index[keep], 1)
    empty = counts == 0
    if empty.any():  # texts of a single (excluded) token: use that token
        back = np.isin(doc_index, np.flatnonzero(empty))
        np.add.at(sums, doc_index[back], hidden[back].astype(np.float64))
        np.add.at(counts, doc_index[back], 1)
    return (sums / counts[:, None]).astype(np.float32)


# --------------------------------------------------------------------------- checks


def check_layers(lm: LoadedModel, layers: int | Iterable[int]) -> tuple[int, ...]:
    """Sorted unique layer indices, each in 0..L; a ValueError names the model's depth otherwise."""
    raw = [layers] if isinstance(layers, int | np.integer) else list(layers)
    if not raw:
        raise ValueError("no layers asked for: pass at least one layer index, e.g. layers=[0]")
    depth = lm.num_layers
    out = []
    for layer in raw:
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise ValueError(f"layer indices must be integers; got {layer!r}")
        if not 0 <= int(layer) <= depth:
            raise ValueError(
                f"layer {int(layer)} is outside 0..{depth}: {lm.name} has {depth} decoder layers "
                f"(0 = embedding output, {depth} = last block's output)"
            )
        out.append(int(layer))
    return tuple(sorted(set(out)))


def resolve_compute(lm: LoadedModel, compute: str = "auto") -> str:
    """'bf16' (autocast) or 'native' (the model's own dtype).

    'auto' asks the compute policy (core.compute): bf16 autocast for an fp32 model where bf16 is fast on
    this device, the model's own dtype otherwise. 'fp32' is 'native' for an fp32 model.
    """
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODES)}; got {compute!r}")
    if compute == "auto":
        from core.compute import decide

        return "bf16" if lm.precision == "fp32" and decide(lm).dtype == "bf16" else "native"
    if compute == "fp32":
        if lm.precision == "bf16":
            raise ValueError("compute 'fp32' needs an fp32 or int8 model; this one is bf16: use 'auto' or 'native'")
        return "native"
    return compute


def hook_name(layer: int) -> str:
    """Module-path style name of a layer's capture point: 'embed' or 'blocks.{i}.output'."""
    return "embed" if layer == 0 else f"blocks.{layer - 1}.output"


# --------------------------------------------------------------------------- forward with hooks


@contextlib.contextmanager
def capture_layers(
    lm: LoadedModel, layers: Sequence[int], stop_after: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks storing layer outputs [B, T, d] into the yielded dict; removed in `finally`.

    With `stop_after`, the deepest layer's hook raises `_StopForward` so the rest of the
    model does not run; `run_forward` catches it.
    """
    store: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(_module, _args, output):
            store[layer] = output[0] if isinstance(output, tuple) else output
            if stop_after and layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in layers:
            module = lm.model.get_input_embeddings() if layer == 0 else lm.decoder_layers[layer - 1]
            handles.append(module.register_forward_hook(make_hook(layer)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[int]:
    """Torch intra-op threads for one CPU forward pass; restored afterwards. Yields the count used.

    `PRIOR_LAB_TORCH_THREADS` sets it. Otherwise, when the CPU is oversubscribed (1-minute
    load average >= cores), one thread: on the shared 2-core machine here, 2 spinning
    OpenMP threads made a forward pass 4-6x slower than 1 under load (16 texts x 64
    tokens, all layers: 5.2 s vs 1.3 s). On an idle CPU torch's default is kept.
    """
    before = torch.get_num_threads()
    wanted = before
    if device.type == "cpu":
        env = os.environ.get("PRIOR_LAB_TORCH_THREADS")
        if env:
            wanted = max(1, int(env))
        elif hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
            wanted = 1
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if wanted != before:
            torch.set_num_threads(before)


def run_forward(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int], compute: str
) -> dict[int, torch.Tensor]:
    """One batch through the model up to the deepest layer; returns layer -> fp32 [B, T, d]."""
    device = lm.device
    use_bf16 = compute == "bf16"
    # packed fp32 products only: under bf16 autocast every linear would fall back to F.linear anyway
    packing = contextlib.nullcontext() if use_bf16 else packed_linears(lm.model)
    with capture_layers(lm, layers) as store, cpu_threads(device), torch.inference_mode(), packing:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            try:
                lm.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
        return {i: store[i].float() for i in layers}


KEEP_SIDES = ("start", "end")
# QA texts are passage + question + answer, hundreds of tokens: their last tokens hold the question
# and the answer that make them QA, so dataset-level calls keep the end of them; others keep the start.
KEEP_END_DATASETS = frozenset({"squad"})


def keep_side(dataset: str) -> str:
    """Which end of a long text of `dataset` survives truncation: 'end' for QA, 'start' otherwise."""
    return "end" if dataset in KEEP_END_DATASETS else "start"


def tokenize(lm: LoadedModel, texts: Sequence[str], max_length: int, keep: str = "start") -> list[list[int]]:
    """Token ids per text, cut to `max_length` keeping the start (or the `keep="end"`); no text may be empty."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string: wrap it as [text]")
    if not texts:
        raise ValueError("no texts given: pass at least one non-empty string")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1; got {max_length}")
    if keep not in KEEP_SIDES:
        raise ValueError(f"keep must be 'start' or 'end'; got {keep!r}")
    ids = lm.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"texts {empty[:5]} are empty after tokenisation: drop them or give them some text")
    return [list(row[:max_length] if keep == "start" else row[-max_length:]) for row in ids]


def iter_batches(
    lm: LoadedModel,
    ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int,
    compute: str,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]]:
    """Run length-sorted batches; yields (doc indices, mask [B, T] bool, layer -> fp32 [B, T, d])."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    # Longest first: similar lengths share a batch, so padding is a few tokens, not most of it.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    n_batches = (len(order) + batch_size - 1) // batch_size
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        hidden = run_forward(lm, input_ids, mask, layers, compute)
        yield idx, mask.bool(), hidden
        if progress is not None:
            progress((b + 1) / n_batches)


def _decode_tokens(lm: LoadedModel, token_ids: np.ndarray) -> np.ndarray:
    unique = np.unique(token_ids)
    table = {int(t): lm.tokenizer.decode([int(t)]) for t in unique}
    return np.array([table[int(t)] for t in token_ids], dtype=str)


def collect_activations(
    lm: LoadedModel,
    texts: Sequence[str],
    layers: int | Iterable[int],
    max_length: int = 128,
    batch_size: int = 8,
    *,
    keep: str = "start",
    compute: str = "auto",
    progress: ProgressFn | None = None,
) -> Activations:
    """Hidden states of `texts` at `layers` (0 = embeddings, L = last block), one row per real token.

    texts: list of strings, each cut to `max_length` tokens keeping the start (`keep="end"`: the end).
    layers: an int or ints in 0..L; the forward pass stops after the deepest.
    compute: "auto" (core.compute decides: bf16 autocast where fast), "bf16", "fp32", "native" (model dtype).
    progress: called with the fraction done after each batch.
    Returns `Activations` whose `layer(i)` is float32 [n_rows, d] with padding and, by
    default, each text's first token left out (`n_excluded` says how many).
    """
    layer_t = check_layers(lm, layers)
    mode = resolve_compute(lm, compute)
    ids = tokenize(lm, texts, max_length, keep)
    lengths = np.array([len(r) for r in ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_all = int(offsets[-1])
    hidden = {i: np.empty((n_all, lm.hidden_size), dtype=np.float16) for i in layer_t}
    n_overflow = 0
    for idx, _mask, out in iter_batches(lm, ids, layer_t, batch_size, mode, progress):
        for i in layer_t:
            h = out[i]
            for r, doc in enumerate(idx):
                rows = h[r, : lengths[doc]]
                big = rows.abs() > FP16_MAX
                if big.any():  # float16 would turn these into inf; clip and say so
                    n_overflow += int(big.sum())
                    rows = rows.clamp(-FP16_MAX, FP16_MAX)
                hidden[i][offsets[doc] : offsets[doc + 1]] = rows.to(torch.float16).cpu().numpy()
    token_ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in ids])
    doc_index = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    return Activations(
        layers=layer_t,
        texts=tuple(texts),
        fingerprint=lm.fingerprint,
        compute=mode,
        _hidden=hidden,
        _token_ids=token_ids,
        _doc_index=doc_index,
        _positions=positions,
        _token_texts=_decode_tokens(lm, token_ids),
        n_overflow=n_overflow,
    )


def collect_document_means(
    lm: LoadedModel,
    texts: Sequence[str],
    layers: int | Iterable[int],
    max_length: int = 128,
    batch_size: int = 8,
    *,
    include_first: bool = False,
    keep: str = "start",
    compute: str = "auto",
    progress: ProgressFn | None = None,
) -> dict[int, np.ndarray]:
    """Mean activation per text at each layer, layer -> float32 [n_texts, d].

    Pools inside the batch loop, so all 31 layers of many texts fit in memory. The
    first token is left out of the mean unless `include_first` (a one-token text keeps it).
    """
    layer_t = check_layers(lm, layers)
    mode = resolve_compute(lm, compute)
    ids = tokenize(lm, texts, max_length, keep)
    means = {i: np.empty((len(ids), lm.hidden_size), dtype=np.float32) for i in layer_t}
    for idx, mask, out in iter_batches(lm, ids, layer_t, batch_size, mode, progress):
        weights = mask.clone().float()  # [B, T]
        if not include_first:
            weights[:, 0] = 0.0
            weights[mask.sum(1) == 1, 0] = 1.0
        weights = weights / weights.sum(1, keepdim=True)
        for i in layer_t:
            pooled = torch.einsum("bt,btd->bd", weights.to(out[i].device), out[i])  # [B, d]
            means[i][idx] = pooled.cpu().numpy()
    return means


# --------------------------------------------------------------------------- dataset-level, cached


def source_key(source: str) -> str:
    """A source name, or for a local file its path with size and mtime so an edit misses the cache."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return str(source)


def cache_key(kind: str, lm: LoadedModel, **parts) -> str:
    """Explicit, readable key: every argument that changes the result is in it."""
    items = ",".join(f"{k}={parts[k]}" for k in sorted(parts))
    return f"{kind}/v{FORMAT_VERSION}/{lm.fingerprint}/{items}"


def _cache(name: str = "activations", **settings):
    """The bounded disk cache `name`; a damaged index database is moved aside and started afresh."""
    import sqlite3

    import diskcache

    folder = cache_subdir(name)
    settings = {"size_limit": CACHE_SIZE_LIMIT, "eviction_policy": "least-recently-used", **settings}
    try:
        return diskcache.Cache(str(folder), **settings)
    except sqlite3.DatabaseError:
        import time
        import uuid

        # A name unique per event (not per process): a long-lived dashboard may heal the same cache many times.
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.rename(folder.with_name(f"{folder.name}.damaged-{stamp}"))
        return diskcache.Cache(str(cache_subdir(name)), **settings)


disk_cache = _cache  # the public name, for other core modules' disk caches


def cached_bytes(
    key: str, compute_fn: Callable[[], bytes], decode: Callable[[bytes], object], cache: str = "activations"
):
    """Decoded entry for `key` in the disk cache `cache`, computed and stored on a miss.

    A damaged or undecodable entry is deleted and recomputed, never fatal.
    """
    with _cache(cache) as store:
        try:
            blob = store.get(key, default=None, retry=True)
        except Exception:  # noqa: BLE001 - an unreadable entry is a miss, never fatal
            blob = None
        if blob is not None:
            try:
                return decode(blob)
            except Exception:  # noqa: BLE001 - damaged or outdated: recompute below
                store.delete(key, retry=True)
        blob = compute_fn()
        store.set(key, blob, retry=True)
        return decode(blob)


def _dataset_texts(dataset: str, n: int, seed: int, source: str) -> list[str]:
    from core.data import example_texts

    return example_texts(dataset, n, seed=seed, source=source)


def _dataset_key(kind: str, lm: LoadedModel, dataset: str, layer_t: tuple[int, ...], n: int, seed: int,
                 source: str, max_length: int, batch_size: int, compute: str) -> tuple[str, str]:
    """(cache key, resolved compute mode) of a per-dataset result; every input that changes it is in the key."""
    mode = resolve_compute(lm, compute)
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    from core.data import dataset_task

    key = cache_key(  # task: the MATH task served by default changed (core.data.math_task); old results must miss
        kind, lm, dataset=dataset, task=dataset_task(dataset, source), source=source_key(source), n=n, seed=seed,
        max_length=max_length, layers=list(layer_t), compute=mode, batch_size=batch_size, keep=keep_side(dataset),
    )
    return key, mode


def dataset_activations(
    lm: LoadedModel,
    dataset: str,
    layers: int | Iterable[int],
    n: int = 64,
    seed: int = 0,
    source: str = "auto",
    max_length: int = 128,
    *,
    batch_size: int = 8,
    compute: str = "auto",
    progress: ProgressFn | None = None,
) -> Activations:
    """`collect_activations` on `n` texts of `dataset` ("c4", "squad", "math"), cached on disk.

    The key holds the model fingerprint, dataset, source, n, seed, max_length,
    layers, compute mode and batch size. Long QA texts keep their last `max_length`
    tokens (question and answer), others their first (`keep_side`).
    Returns `Activations` ([n_rows, d] per layer).
    """
    layer_t = check_layers(lm, layers)
    key, mode = _dataset_key("tokens", lm, dataset, layer_t, n, seed, source, max_length, batch_size, compute)

    def compute_fn() -> bytes:
        texts = _dataset_texts(dataset, n, seed, source)
        acts = collect_activations(
            lm, texts, layer_t, max_length=max_length, batch_size=batch_size, keep=keep_side(dataset),
            compute=mode, progress=progress,
        )
        return acts.to_bytes()

    return cached_bytes(key, compute_fn, Activations.from_bytes)


def dataset_document_means(
    lm: LoadedModel,
    dataset: str,
    layers: int | Iterable[int] | None = None,
    n: int = 64,
    seed: int = 0,
    source: str = "auto",
    max_length: int = 128,
    *,
    batch_size: int = 8,
    compute: str = "auto",
    progress: ProgressFn | None = None,
) -> dict[int, np.ndarray]:
    """Mean activation per text of `dataset`, layer -> float32 [n, d], all layers by default; cached.

    First tokens are left out of the means; long QA texts keep their end (`keep_side`).
    One forward pass covers every layer.
    """
    layer_t = check_layers(lm, range(lm.num_layers + 1) if layers is None else layers)
    key, mode = _dataset_key("docmeans", lm, dataset, layer_t, n, seed, source, max_length, batch_size, compute)

    def compute_fn() -> bytes:
        texts = _dataset_texts(dataset, n, seed, source)
        means = collect_document_means(
            lm, texts, layer_t, max_length=max_length, batch_size=batch_size, keep=keep_side(dataset),
            compute=mode, progress=progress,
        )
        buf = io.BytesIO()
        np.savez(buf, version=np.array(FORMAT_VERSION), **{f"layer_{i}": m for i, m in means.items()})
        return buf.getvalue()

    def decode(blob: bytes) -> dict[int, np.ndarray]:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            if int(z["version"]) != FORMAT_VERSION:
                raise ValueError("outdated entry")
            return {i: z[f"layer_{i}"] for i in layer_t}

    return cached_bytes(key, compute_fn, decode)


def array_digest(*arrays: np.ndarray) -> str:
    """Short content hash of arrays (shape, dtype and bytes), for cache keys of derived results."""
    digest = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
