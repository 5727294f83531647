"""Training that converges: the learning-rate schedules, the plateau stop, per-tensor deep rates, drift.

    >>> plateau_reached([2.0, 1.5, 1.49, 1.495, 1.492, 1.491, 1.493], margin=0.01, patience=5)
    True

The plateau rule is a pure function of the validation losses in a run's history, so a resumed run
decides exactly as an uninterrupted one would (nothing but the history is needed to carry it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("constant", "linear")
CONSTANT_WARMUP = 10  # constant schedule: a short warm-up (at most 10 updates) so Adam's first moments settle


def default_warmup(schedule: str, steps: int) -> int:
    """Warm-up updates when none is asked: 10% of the budget for "linear", at most 10 for "constant"."""
    tenth = max(1, steps // 10)
    return min(tenth, CONSTANT_WARMUP) if schedule == "constant" else tenth


def lr_factor(step: int, warmup: int, total: int, schedule: str = "linear") -> float:
    """Multiplier of the base learning rate for optimizer update `step` (0-based) of `total`.

    Linear warm-up over `warmup` updates starting above 0 ((step + 1) / warmup: a 1-step run trains at the
    full rate). "constant" then stays at 1 (the budget is a ceiling, not a plan: the plateau stop ends the
    run). "linear" decays linearly and ends above 0 at the last update (1 / (total - warmup)), so no update
    of the run is wasted at learning rate 0.
    """
    up = (step + 1) / warmup if step < warmup else 1.0
    if schedule == "constant":
        return min(1.0, up)
    down = (total - step) / max(1, total - warmup) if step >= warmup else 1.0
    return max(0.0, min(up, down))


# --------------------------------------------------------------------------- plateau stop


def plateau_state(val_losses: list[float], margin: float) -> tuple[float, int]:
    """(reference loss, evaluations since it was set) after the validation losses `val_losses`, in order.

    The reference is the first loss, replaced only by a loss more than `margin` (relative) below it: small
    improvements do not reset the count, so a run creeping down by less than the margin per evaluation
    still stops once the sum of its creeping stays under the margin for `patience` evaluations.
    """
    best, since = math.inf, 0
    for v in val_losses:
        if not math.isfinite(best) or v < best * (1.0 - margin):
            best, since = v, 0
        else:
            since += 1
    return best, since


def plateau_reached(val_losses: list[float], margin: float, patience: int) -> bool:
    """Whether the plateau rule stops a run whose validation losses so far are `val_losses` (patience 0: never)."""
    return patience > 0 and plateau_state(val_losses, margin)[1] >= patience


def history_val_losses(history: list[dict]) -> list[float]:
    """The validation losses of a run's history, in step order (step 0, the prior's loss, first)."""
    return [float(h["val_loss"]) for h in history if h.get("val_loss") is not None]


def plateau_rule(margin: float, patience: int, val_every: int, steps: int) -> str:
    """The stop rule as one line of text (stored in run.json beside `converged`)."""
    if patience <= 0:
        return f"no plateau stop: train the whole budget of {steps} steps"
    return (f"stop when the best validation loss has not improved by more than {100 * margin:g}% (relative) over "
            f"{patience} consecutive evaluations (every {val_every} steps), within a budget of {steps} steps")


# --------------------------------------------------------------------------- per-tensor deep learning rates

RATE_EXAMPLES = 8  # real training examples the activation scale is measured on (it varies little between them)


def rms_scale(rows: np.ndarray) -> float:
    """Median over rows [n, d] of each row's RMS (norm / sqrt(d)): robust to the few huge-norm tokens."""
    rows = np.asarray(rows, dtype=np.float64)
    return float(np.median(np.linalg.norm(rows, axis=1) / math.sqrt(rows.shape[1])))


def deep_lr_scales(lm, texts: list[str], layers: list[int], max_length: int = 320) -> dict[int, float]:  # noqa: ANN001
    """Per deep layer l: the RMS of the residual stream entering block l over that of the token embeddings.

    Why a per-tensor rate: Adam's update is about `lr` in absolute units per coordinate whatever the
    gradient's size, so a vector at activation scale (norm ~500 in SmolLM2's last blocks, the token
    embeddings' ~1-2) moves the same absolute amount as a soft-prompt vector, a far smaller relative one.
    Scaling each deep tensor's rate by its layer's activation RMS makes every tensor move the same
    relative amount per step as the soft prompt does at `lr`. (Equivalent to training a unit-scale
    vector multiplied by that RMS, but the stored tensors stay in the model's own units.)

    Measured once on `texts` (real training examples, first token and padding left out, see
    `core.activations.collect_activations`; activation layer l is the input of block l), in fp32.
    Returns {layer: ratio}; layer 0 gives 1.
    """
    from core.activations import collect_activations

    acts = collect_activations(lm, texts, sorted({0, *layers}), max_length=max_length, compute="fp32")
    token_rms = rms_scale(acts.layer(0))
    return {int(layer): rms_scale(acts.layer(layer)) / token_rms for layer in layers}


def param_groups(named: dict[str, torch.nn.Parameter], lr: float, scales: dict[str, float] | None) -> list[dict]:
    """Adam param groups: one group of every tensor at `lr` without `scales`, else one group per tensor at
    `lr` x its scale ({name: scale}; a tensor not named keeps `lr`, e.g. the soft prompt)."""
    if not scales:
        return [{"params": list(named.values()), "lr": lr}]
    return [{"params": [p], "lr": lr * float(scales.get(name, 1.0)), "name": name} for name, p in named.items()]


# --------------------------------------------------------------------------- drift


DRIFT_KEYS = ("l2", "max_l2", "init_norm", "relative_to_init_norm", "relative_to_token_nn_gap")


def prompt_drift(prompt: dict[str, torch.Tensor], init: dict[str, torch.Tensor], nn_gap: float | None) -> dict:
    """How far each prompt tensor moved from its initial sample, in absolute and relative units.

    prompt, init: {name: [n, d]}. nn_gap: the token embeddings' median distance to their nearest other token
    (`token_nn_gap`), or None. Returns {name: {"l2": mean per-vector L2 drift, "max_l2", "init_norm": mean
    initial vector norm, "relative_to_init_norm": l2 / init_norm, "relative_to_token_nn_gap": l2 / nn_gap}}.
    A soft vector that moved less than the gap has not reached another token's place.
    """
    from core.analysis.divergence import drift

    out = {}
    for name, tensor in prompt.items():
        if name not in init:
            continue
        if not (torch.isfinite(tensor).all() and torch.isfinite(init[name]).all()):
            out[name] = dict.fromkeys(DRIFT_KEYS)  # a diverged run's non-finite tensors give no drift
            continue
        l2, _cos = drift(tensor.float().numpy(), init[name].float().numpy())
        init_norm = float(np.linalg.norm(init[name].double().numpy(), axis=1).mean())
        mean = float(l2.mean())
        values = {"l2": mean, "max_l2": float(l2.max()), "init_norm": init_norm,
                  "relative_to_init_norm": mean / init_norm if init_norm > 0 else None,
                  "relative_to_token_nn_gap": mean / nn_gap if nn_gap else None}
        out[name] = {k: v if v is not None and math.isfinite(v) else None for k, v in values.items()}  # JSON: no NaN
    return out


# Vocabularies up to this size give the token gap from every token's nearest distance (`nearest_distances`: the
# k-NN table shared with the Divergence page where it is at hand, else a V x V pass of its own); larger ones from a
# fixed sample of tokens, each against the whole vocabulary. On 2 Zen 1 cores the whole table took ~20 s for the tiny
# test model's 49,152 x 64 (the pass of its own: 10 s) and ~60 s for SmolLM2's 49,152 x 576 (a sample of 8,192: 10 s);
# a 128k x 2048 vocabulary would take many minutes.
NN_GAP_EXACT_MAX = 65_536
NN_GAP_SAMPLE = 8_192


def token_nn_gap(lm) -> float:  # noqa: ANN001 - core.models.LoadedModel
    """Median distance from a token embedding to its nearest other token: over every token
    (`core.analysis.divergence.nearest_distances`: the vocabulary's k-NN table where it is at hand, as the committed
    artifact of the embedded model, else a pass of its own, cached on disk) up to `NN_GAP_EXACT_MAX` tokens, else
    over a fixed sample of `NN_GAP_SAMPLE` tokens (`sampled_nn1`; on SmolLM2's vocabulary three seeds' medians were
    within 0.4% of the whole one's), so the first run of a large hub model does not end in a V x V pass."""
    from core.analysis.divergence import nearest_distances, sampled_nn1, token_reference

    ref = token_reference(lm)
    if len(ref) <= NN_GAP_EXACT_MAX:
        return float(np.median(nearest_distances(ref)))
    return float(np.median(sampled_nn1(ref, NN_GAP_SAMPLE)))
