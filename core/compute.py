"""The compute policy: which dtype a forward pass or a training step runs in, decided in one place.

    >>> decide(lm).reason           # the default everywhere: compute="auto"
    'fp32: bf16 matmul here 1.37 GFLOP/s vs fp32 155 (AVX2)'

"auto" resolves once per device and process, with its reason kept:

- CUDA: bf16 where `torch.cuda.is_bf16_supported()`, else fp32 (fp16 autocast would need loss
  scaling to train a prompt safely, and the prompt is small enough that fp32 costs little there).
  Attention uses PyTorch's fused SDPA kernels on CUDA.
- CPU: bf16 only when this machine multiplies bf16 matrices clearly faster than fp32
  (`BF16_MIN_SPEEDUP`). Machines differ by 26x in the same default: an AVX512-BF16 CPU ran bf16
  matmuls at 780 GFLOP/s against 172 in fp32, an AVX2-only one at 0.9 against 75. So the choice
  is measured by a matmul probe of about 0.2 s, cached per machine (CPU model, instruction set,
  torch version, threads) under `.cache/compute/`, never guessed from CPU flags.
- A model loaded in bf16 computes in bf16 (its weights are bf16).

Explicit "bf16" and "fp32" are used as asked and never overridden.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.paths import cache_subdir

COMPUTE_CHOICES = ("auto", "bf16", "fp32")
BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 matmuls by this factor to be chosen: "clearly faster"
PROBE_SIZE = 256  # square matmul side; on the slowest bf16 CPU seen (0.9 GFLOP/s) one product takes ~40 ms
PROBE_SECONDS = 0.08  # time spent per dtype after a warm-up product
PROBE_ROUNDS = 3  # interleaved rounds per dtype; the best of each counts, so a burst of other load skews neither
_PROBE_LOCK = threading.Lock()  # the dashboard's page threads ask at once: one measures, the others read its result


# glibc gives freed blocks above its mmap threshold (dynamic, at most 32 MB) back to the OS and trims its heap
# past twice that, so each CPU training step's activations arrive as fresh pages the kernel must fault in and
# zero: ~170k page faults per 8-row QA step of SmolLM2 here, and log_softmax over 96 x 49,152 logits took 121 ms
# inside a step against 1.4 ms alone. Keeping freed memory for reuse, as the jemalloc/tcmalloc set-ups
# recommended for PyTorch on CPU do, took a QA pass from 5.8-8.2 s to 5.5-6.3 s (alternating processes; MATH
# unchanged); the process keeps its peak memory until exit. Not every process gets it: glibc still maps big blocks
# afresh where its heap cannot grow in place (1 fresh process in 6 here; 4 of 4 inside a full test run).
KEEP_MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap, reused
KEEP_TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top kept up to this (mallopt takes a C int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask malloc to keep freed memory for reuse rather than return it to the OS (process-wide, once): called
    for CPU training by `core.tuning.compute_model`. False where the C library has no glibc `mallopt`."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                 KEEP_TRIM_THRESHOLD))


@dataclass(frozen=True)
class ComputeDecision:
    """What "compute" resolved to for one model on one device, and why."""

    dtype: str  # "bf16" or "fp32": what the forward pass runs in
    requested: str  # "auto", "bf16" or "fp32"
    device: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.reason


def check_compute(compute: str) -> None:
    if compute not in COMPUTE_CHOICES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}; got {compute!r}")


def cpu_model_name() -> str:
    """The CPU's model name as the OS reports it (lscpu's 'Model name')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sustained_gflops(product, flops: float, seconds: float, sync=None) -> float:  # noqa: ANN001
    """GFLOP/s of calling `product()` (`flops` each) over `seconds`, after one warm-up call."""
    sync = sync or (lambda: None)
    product()  # warm-up: kernel selection, caches
    sync()
    count, start = 0, time.perf_counter()
    while True:
        product()
        count += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return flops * count / elapsed / 1e9


def matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = PROBE_SIZE,
                   seconds: float = PROBE_SECONDS) -> float:
    """Sustained GFLOP/s of a [size, size] @ [size, size] product in `dtype` on `device`, over `seconds` after a
    warm-up product: the bf16/fp32 probe here, and the ceiling line of the benchmarks."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return sustained_gflops(lambda: torch.matmul(a, b), 2 * size**3, seconds, sync)


def _probe_key() -> str:
    parts = [cpu_model_name(), torch.backends.cpu.get_cpu_capability(), torch.__version__,
             str(torch.get_num_threads())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cpu_matmul_probe(refresh: bool = False) -> dict:
    """bf16 and fp32 matmul rates of this CPU, {"bf16_gflops", "fp32_gflops", "cpu", ...}; measured once per machine.

    Cached in `.cache/compute/cpu-probe-<key>.json`, the key made of the CPU model, its instruction
    set as torch sees it, the torch version and the thread count. `refresh=True` measures again. Set-up
    (`python -m core assets`) measures it; one process measures at a time, its threads waiting for the result.
    """
    with _PROBE_LOCK:
        return _cpu_matmul_probe(refresh)


def _best_of_rounds(rates: dict) -> dict:
    """{key: the best of `PROBE_ROUNDS` calls of rates[key]()}, the keys taking turns within each round. Load from
    elsewhere (another process, a page computing) only ever slows a round, so the best round is the closest to this
    CPU's rate, and every key gets the same chances."""
    best = dict.fromkeys(rates, 0.0)
    for _ in range(PROBE_ROUNDS):
        for key, rate in rates.items():
            best[key] = max(best[key], rate())
    return best


def _cpu_matmul_probe(refresh: bool) -> dict:
    def measure() -> dict:
        cpu, seconds = torch.device("cpu"), PROBE_SECONDS / PROBE_ROUNDS
        rates = _best_of_rounds({dtype: (lambda dtype=dtype: matmul_gflops(dtype, cpu, seconds=seconds))
                                 for dtype in (torch.bfloat16, torch.float32)})
        return {"bf16_gflops": round(rates[torch.bfloat16], 2), "fp32_gflops": round(rates[torch.float32], 2),
                "size": PROBE_SIZE}

    return _cached_probe("cpu-probe", measure, refresh)


def _cached_probe(kind: str, measure, refresh: bool) -> dict:  # noqa: ANN001 - () -> dict
    """`measure()` with this machine's description, kept in `.cache/compute/<kind>-<key>.json` (the key: CPU
    model, instruction set, torch version, threads) and read back from there unless `refresh`."""
    path = cache_subdir("compute") / f"{kind}-{_probe_key()}.json"
    if not refresh and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # damaged: measure again
    result = {
        **measure(),
        "rounds": PROBE_ROUNDS,
        "cpu": cpu_model_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result


# A block's product in a training step: an 8-row MATH batch's ~256 positions through SmolLM2's gate (576 -> 1536).
PACKING_PROBE_SHAPE = (256, 576, 1536)


def packing_probe(refresh: bool = False) -> dict:
    """fp32 rates of a block-shaped product through oneDNN on a packed weight (core.tuning.packed) and through
    F.linear (MKL here), {"packed_gflops", "plain_gflops", ...}; measured once per machine and thread count, cached
    like `cpu_matmul_probe` (about 0.1 s). Which is faster depends on both: MKL runs its AVX2 code on AMD CPUs with
    AVX512, where the packed product was ~3x faster (Zen 5); on an AVX2-only Zen 3 this probe measured it faster on
    2 threads (163 vs 150 GFLOP/s) and slower on 1 (85 vs 94), the thread count activation extraction drops to under
    load (core.activations.cpu_threads) and bench_activations runs at."""
    with _PROBE_LOCK:
        return _cached_probe("packing-probe", _packing_rates, refresh)


def _packing_rates() -> dict:
    import torch.nn.functional as F

    from core.tuning.packed import pack, product

    rows, width, out = PACKING_PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    weight = torch.randn(out, width, generator=gen) * 0.02
    packed = pack(weight)
    products = {"plain": lambda: F.linear(x, weight)}
    if packed is not None:
        products["packed"] = lambda: product(x, packed)
    flops, seconds = 2 * rows * width * out, PROBE_SECONDS / PROBE_ROUNDS / 2
    rates = _best_of_rounds({name: (lambda run=run: sustained_gflops(run, flops, seconds))
                             for name, run in products.items()})
    return {"packed_gflops": round(rates.get("packed", 0.0), 2),  # 0: this torch or CPU cannot pack
            "plain_gflops": round(rates["plain"], 2), "shape": list(PACKING_PROBE_SHAPE)}


@functools.cache
def _auto_for_device(device: str) -> tuple[str, str]:
    """(dtype, reason) of "auto" on `device`; once per device and process."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"bf16: {name} supports bf16 (fused SDPA attention)"
        return "fp32", f"fp32: {name} has no bf16 (fp16 would need loss scaling to train a prompt)"
    if dev.type != "cpu":
        return "fp32", f"fp32: no measured policy for device type {dev.type!r}"
    probe = cpu_matmul_probe()
    bf16, fp32 = probe["bf16_gflops"], probe["fp32_gflops"]
    rates = f"bf16 matmul here {bf16:.3g} GFLOP/s vs fp32 {fp32:.3g} ({probe['capability']})"
    if bf16 >= BF16_MIN_SPEEDUP * fp32:
        return "bf16", f"bf16: {rates}"
    return "fp32", f"fp32: {rates}"


def decide(lm, compute: str = "auto") -> ComputeDecision:  # noqa: ANN001 - core.models.LoadedModel
    """Resolve `compute` ("auto", "bf16", "fp32") for a loaded model on its device."""
    return decide_for(lm.precision, lm.device, compute)


def decide_for(precision: str, device: str | torch.device, compute: str = "auto") -> ComputeDecision:
    """Resolve `compute` for weights of `precision` ("fp32", "bf16", "int8") on `device`, before loading them."""
    check_compute(compute)
    device = str(torch.device(device))
    if precision == "bf16":
        if compute == "fp32":
            raise ValueError("compute 'fp32' needs an fp32 or int8 model; this one is bf16: use compute 'bf16' "
                             "or 'auto', or load the model with precision fp32")
        return ComputeDecision("bf16", compute, device, "bf16: the model's weights are bf16")
    if compute != "auto":
        return ComputeDecision(compute, compute, device, f"{compute}: asked for explicitly")
    dtype, reason = _auto_for_device(device)
    return ComputeDecision(dtype, compute, device, reason)


def default_precision() -> str:
    """The weight precision the dashboard proposes: bf16 on a CUDA GPU that supports it, fp32 otherwise."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
