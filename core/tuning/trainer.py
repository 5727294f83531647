"""Training a prompt on a frozen model: the one engine behind the CLI, the page and the gallery.

    >>> result = train(lm, TrainConfig(method="soft", dataset="math", prior="fitted", steps=40), "runs/demo")
    >>> result.status, result.history[-1]["val_loss"]

AdamW on the prompt parameters only (deep vectors at a per-tensor rate, see
`core.tuning.convergence.deep_lr_scales`), a constant (or linearly decaying) rate after a short warm-up,
gradient accumulation and clipping, loss on answer tokens only, validation loss every `val_every` steps,
snapshots every `snapshot_every` steps, a checkpoint with the optimizer/scheduler/RNG state so
`resume=True` continues exactly where it stopped.

`steps` is a budget: the plateau stop (`plateau_patience`, `plateau_margin`) ends a run whose validation
loss stopped improving, and run.json records `converged` (true only when that rule stopped it), `stop_reason`
("plateau", "budget", "cancelled", "diverged") and `stop_rule` (the rule as text). A finished run keeps the
prompt of its best validation loss (`keep="best"`, early stopping; run.json "kept" says which step): at a
constant rate the prompt keeps moving after the plateau, and the last step's validation loss was 1-13% above
the best in the converged soft MATH runs. The checkpoint holds the last step's state, so a resume continues
training from where it stopped.

The run folder is claimed with `core.run_folders.claim_run_dir` (a lock held while training;
an existing run only with resume or force). A loss that becomes non-finite or exceeds
DIVERGE_FACTOR x the initial validation loss (at a validation step) stops the run as "diverged".
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core import runs
from core.compute import COMPUTE_CHOICES, decide
from core.tuning.base import METHODS, PromptModule, build_prompt
from core.tuning.batches import Batch, Encoded, collate, encode_examples, epoch_batches, fixed_batches
from core.tuning.compute import compute_model
from core.tuning.convergence import (
    SCHEDULES,
    deep_lr_scales,
    default_warmup,
    history_val_losses,
    lr_factor,
    param_groups,
    plateau_reached,
    plateau_rule,
    prompt_drift,
    token_nn_gap,
)
from core.tuning.loss import answer_loss

TRAINABLE_DATASETS = ("math", "squad")


@dataclass
class TrainConfig:
    """Everything that decides a run's result (saved as run.json["config"], with the model's identity)."""

    method: str = "soft"  # a key of core.tuning.METHODS: "soft" or "deep"
    dataset: str = "math"  # "math" or "squad" (c4 has no answers to score)
    source: str = "auto"  # data source passed to core.data.load_examples
    prior: str = "gaussian"  # a core.priors name (for a given initial tensor: the prior it was drawn from)
    prior_params: dict = field(default_factory=dict)
    n_tokens: int = 20  # the paper's 20 vectors (per layer for deep prompts)
    layers: list[int] = field(default_factory=list)  # deep only; empty = the last 3 layers
    # Measured (soft MATH, fitted prior, SmolLM2, constant schedule, plateau stop 5 x 10 steps at 1%): lr 0.03, 0.1
    # and 0.3 all stopped converged at step 110-120 with best val loss 0.955 / 0.944 / 0.944 (from 3.31); the soft
    # prompt drifted 2.6 / 6.9 / 19 token nearest-neighbour gaps. 0.03 reaches the same loss with the least
    # Adam-noise drift (3e-3 had moved a fifth of a gap after 60 steps).
    lr: float = 0.03
    steps: int = 400  # the budget (CLI --max-steps); the plateau stop usually ends the run before it
    schedule: str = "constant"  # "constant" (after a short warm-up) or "linear" (warm-up, then decay to ~0)
    plateau_patience: int = 5  # stop after this many evaluations without a relative gain > plateau_margin; 0: off
    plateau_margin: float = 0.01
    scale_deep_lr: bool = True  # deep tensors at lr x (their layer's activation RMS / the token embeddings' RMS)
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = -1  # -1: 10% of steps for "linear", at most 10 for "constant"
    weight_decay: float = 0.0  # decay would pull the prompt toward 0 and confound where it drifts
    max_grad_norm: float = 1.0
    seed: int = 0
    compute: str = "auto"  # "auto" (core.compute decides per device, by measurement), "bf16" or "fp32"
    n_train: int = 1000  # fits every dataset (the QuAC stand-in has 1,246 training questions)
    n_val: int = 48
    val_every: int = 10
    snapshot_every: int = 5
    eval_n: int = 200  # held-out examples for greedy-generation metrics at the end (exact match within about
    # +-7 points, core.evaluation.DEFAULT_EVAL_N); 0 skips
    max_new_tokens: int = 0  # 0: 12 for math, 40 for squad
    max_length: int = 320  # tokens of prompt+answer; longer prompts are cut from the start
    bucket: int = 8  # batches per length-sorting chunk (less padding)
    compile: bool = False  # torch.compile the decoder layers for training steps (pays off from ~100 steps)
    soft: bool = True  # deep only: also train the token-level soft prompt (the paper's method)
    cached_activations: bool = True  # deep with soft=False: start each step at the first prompted block (cached)
    keep: str = "best"  # a finished run's prompt: "best" (of the best validation loss) or "last" (the last step's)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.dataset not in TRAINABLE_DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(TRAINABLE_DATASETS)} for training; got "
                             f"{self.dataset!r} (c4 is plain text with no answer to score)")
        if self.compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}; got {self.compute!r}")
        for name in ("steps", "batch_size", "grad_accum", "n_tokens", "val_every", "snapshot_every", "n_train",
                     "n_val"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        if self.layers and self.method != "deep":
            raise ValueError("layers only apply to --method deep; drop --layers or use the deep method")
        if self.compile and self.compute == "fp32":
            raise ValueError("compile needs compute 'bf16' (it compiles the bf16 copy of the weights)")
        if not self.soft and self.method != "deep":
            raise ValueError("soft=False (--no-soft) only applies to --method deep: a soft prompt is its soft vectors")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}; got {self.keep!r}")
        if int(self.plateau_patience) < 0:
            raise ValueError(f"plateau_patience must be 0 (no plateau stop) or more; got {self.plateau_patience!r}")
        if not 0 <= self.plateau_margin < 1:
            raise ValueError(f"plateau_margin must be a relative gain in [0, 1); got {self.plateau_margin!r}")
        if self.warmup_steps < 0:
            self.warmup_steps = default_warmup(self.schedule, self.steps)
        if self.max_new_tokens <= 0:
            self.max_new_tokens = 12 if self.dataset == "math" else 40

    def prompt_params(self) -> dict:
        params = {"n_tokens": self.n_tokens}
        if self.method == "deep":
            params["layers"] = list(self.layers)
            params["soft"] = bool(self.soft)
        return params

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """What a progress callback receives after each step (and at step 0)."""

    step: int
    total: int
    train_loss: float | None
    val_loss: float | None
    elapsed: float
    tokens_per_s: float
    history: list[dict]
    phase: str = "train"  # "train", "eval", "done"


@dataclass
class TrainResult:
    path: Path
    status: str  # "done", "cancelled", "diverged" (see core.runs for every status)
    message: str
    history: list[dict]
    metrics: dict
    prompt: dict[str, torch.Tensor]
    converged: bool = False  # the plateau rule stopped it (not the budget, a cancel or a divergence)
    stop_reason: str = ""  # "plateau", "budget", "cancelled" or "diverged"


# What a run saved before these fields existed trained with: its resume compares against these.
LEGACY_CONFIG = {"schedule": "linear", "plateau_patience": 0, "plateau_margin": 0.01, "scale_deep_lr": False}


class NonFiniteLoss(RuntimeError):
    pass


KEEP_CHOICES = ("best", "last")
KEEP_RULE = "the prompt of the lowest validation loss (early stopping); the last step's stays in the checkpoint"
DIVERGE_FACTOR = 3.0  # a loss above this multiple of the initial validation loss means the run diverged


def divergence(loss: float, initial_val_loss: float | None, kind: str) -> str | None:
    """Why `loss` (a "training" or "validation" loss) shows divergence, or None.

    The rule: a non-finite loss, or one above DIVERGE_FACTOR x the run's initial validation loss (the
    prior's loss, measured at step 0). Prompt-tuning lowers the loss from there; tripling it on the
    validation set is no fluctuation but a learning rate the prompt cannot follow (the trainer applies
    the factor to validation losses only: one training batch can spike and recover).
    """
    if not math.isfinite(loss):
        return f"{kind} loss is {loss}"
    if initial_val_loss is not None and math.isfinite(initial_val_loss) and initial_val_loss > 0 \
            and loss > DIVERGE_FACTOR * initial_val_loss:
        return (f"{kind} loss {loss:.4g} is above {DIVERGE_FACTOR:g} x the initial validation loss "
                f"{initial_val_loss:.4g}")
    return None


def warmup_linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, schedule: str = "linear"
                           ) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule (see `core.tuning.convergence.lr_factor`, same factor for every param group); a
    closure, so a checkpoint stores its position, not its plan."""
    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _data_task(config: TrainConfig) -> str:
    """What load_examples serves for the run's dataset and source (core.data.dataset_task)."""
    from core.data import dataset_task

    try:
        return dataset_task(config.dataset, config.source)
    except ValueError:  # a local file that is gone: the dataset name is all that is known
        return config.dataset


def _check_one_file_source(config: TrainConfig) -> None:
    """A local SQuAD file serves one split whole, so training and validating from it would share questions."""
    src = str(config.source)
    if config.dataset == "squad" and src not in ("auto", "hub") and not src.startswith("split:"):
        raise ValueError(
            f"source {src!r} is one SQuAD file, used whole for each split asked for: training and validation "
            f"would be the same questions. Pass source='split:{src}' to divide it by passage, or pass examples")


def _load_data(config: TrainConfig, lm, examples: tuple | None) -> tuple[list, list, list]:
    if examples is not None:
        train_ex, val_ex, eval_ex = examples
    else:
        from core.data import load_examples

        _check_one_file_source(config)
        train_ex = load_examples(config.dataset, split="train", n=config.n_train, seed=config.seed,
                                 source=config.source)
        held = load_examples(config.dataset, split="validation", n=config.n_val + config.eval_n, seed=config.seed,
                             source=config.source)
        val_ex, eval_ex = held[: config.n_val], held[config.n_val:]
        if config.dataset == "squad":  # cut passages (never question or answer) to fit, leaving room for "\n"
            from core.data import fit_to_length

            fit = [[fit_to_length(ex, lm.tokenizer, config.max_length - 2) for ex in part]
                   for part in (train_ex, val_ex)]
            train_ex, val_ex = fit
    if len(train_ex) < config.batch_size:
        raise ValueError(f"only {len(train_ex)} training examples for batch size {config.batch_size}")
    if not val_ex:
        raise ValueError("no validation examples: raise n_val")
    return list(train_ex), list(val_ex), list(eval_ex)


def initial_tensors(
    lm, config: TrainConfig, prompt: PromptModule, init: torch.Tensor | dict | None
) -> tuple[dict, dict]:
    """Prior samples for every prompt tensor: {"soft": [n, d], "deep.{l}": [n, d]}, and the prior's description.

    One generator seeded with `config.seed` draws the soft prompt first, then each
    deep layer in order. `init` ([n, d], e.g. the Prior-lab sample) replaces the soft
    draw; a dict {name: [n, d]} replaces the named tensors. When the prior is fitted on
    datasets' activations (a "source", "source_a" or "source_b" other than "tokens") and no
    "layer" is given, the soft prompt is drawn at layer 0 and each deep layer's vectors from
    the same prior fitted at that layer's input.
    """
    names = list(prompt.named_tensors())
    n, d = config.n_tokens, lm.hidden_size
    gen = torch.Generator().manual_seed(config.seed)
    out: dict[str, torch.Tensor] = {}
    info: dict = {"prior": config.prior, "prior_params": dict(config.prior_params)}
    given = init if isinstance(init, dict) else ({"soft": init} if init is not None else {})
    for name, value in given.items():
        if name not in names:
            raise ValueError(f"initial tensor {name!r} is not part of this prompt ({', '.join(names)})")
        value = torch.as_tensor(value, dtype=torch.float32).cpu()
        if tuple(value.shape) != (n, d):
            raise ValueError(f"initial sample {name!r} has shape {tuple(value.shape)}; this prompt needs ({n}, {d}): "
                             f"sample {n} vectors from a prior for this model")
        out[name] = value
    if given:
        info["init_given"] = sorted(given)  # these tensors came from the caller (e.g. a Prior-lab sample)
    need = [x for x in names if x not in out]
    if need:
        from core.priors import make_prior

        # The prior's own seed (its fit, e.g. a VAE's training) is the run's seed unless prior_params fixes one;
        # without this every run recorded the prior's default seed 0, whatever seed drew its sample.
        params = {"seed": config.seed, **config.prior_params}
        sources = [params.get(k) for k in ("source", "source_a", "source_b") if params.get(k) is not None]
        # A prior fitted on datasets' activations with no fixed layer draws each tensor at its own input:
        # the soft prompt at layer 0 (token level), the vectors of block l at activation layer l, so every
        # tensor starts at the scale of the activations it is mixed with.
        per_layer = any(src != "tokens" for src in sources) and "layer" not in params
        prior = make_prior(config.prior, lm=lm, **({**params, "layer": 0} if per_layer else params))
        info["prior_params"] = getattr(prior, "params", config.prior_params)
        info["prior_describe"] = prior.describe() if hasattr(prior, "describe") else config.prior
        for name in need:
            source = prior
            if per_layer and name.startswith("deep."):
                source = make_prior(config.prior, lm=lm, **{**params, "layer": int(name[5:])})
                info.setdefault("deep_prior_layers", {})[name] = int(name[5:])
            sample = source.sample(n, generator=gen).detach().float().cpu()
            if tuple(sample.shape) != (n, d):
                raise ValueError(f"prior {config.prior!r} gave shape {tuple(sample.shape)}, expected ({n}, {d})")
            out[name] = sample
    return {k: out[k] for k in names}, info


class _Trainer:
    """The state of one run between steps; `train()` drives it."""

    def __init__(self, lm, config: TrainConfig, out_dir: Path, examples: tuple | None, init: torch.Tensor | None,
                 resume: bool) -> None:
        self.lm, self.config, self.out_dir = lm, config, Path(out_dir)
        self.compute = decide(lm, config.compute)
        self.model, self.autocast = compute_model(lm, config.compute)  # validation (no grad)
        self.train_model = compute_model(lm, config.compute, compiled=True)[0] if config.compile else self.model
        self.device = lm.device
        train_ex, val_ex, self.eval_examples = _load_data(config, lm, examples)
        tok = lm.tokenizer
        self.train_items = encode_examples(tok, train_ex, config.max_length)
        self.val_items = encode_examples(tok, val_ex, config.max_length)
        self.pad_id = tok.pad_token_id
        self.prompt = build_prompt(config.method, lm.hidden_size, lm.num_layers, **config.prompt_params())
        if config.method == "deep":
            config.layers = list(self.prompt.config.layers)  # record the resolved default
        self.prompt.to(self.device)
        self.residuals = None  # deep prompts without a soft prompt: cached stream entering the first prompted block
        if config.method == "deep" and not config.soft and config.cached_activations and not config.compile:
            from core.tuning.cached import ResidualCache

            self.residuals = ResidualCache(lm, self.model, self.autocast, self.prompt.first_layer)
        checkpoint = self.out_dir / runs.CHECKPOINT_FILE
        state = torch.load(checkpoint, weights_only=False) if resume and checkpoint.exists() else None
        # {tensor: lr multiplier}: measured once, then carried by the checkpoint (a resume never re-measures)
        self.lr_scales: dict[str, float] = (dict(state.get("lr_scales") or {}) if state is not None
                                            else self._measure_lr_scales(train_ex))
        self.optimizer = torch.optim.AdamW(param_groups(self.prompt.named_tensors(), config.lr, self.lr_scales),
                                           lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = warmup_linear_schedule(self.optimizer, config.warmup_steps, config.steps, config.schedule)
        self.extended: list[dict] = []  # each resume that raised `steps`: {"at_step", "steps_before", "steps_after"}
        self.diverged: dict | None = None  # {"step", "reason", "rule"} once a loss diverged
        self.history: list[dict] = []
        self.snapshot_steps: list[int] = []
        self.snapshots: dict[str, list[torch.Tensor]] = {}
        self.step = 0
        self.elapsed = 0.0
        self.tokens = 0
        self.prior_info: dict = {}
        self.stop_reason: str | None = None  # set when the run stops: "plateau", "budget", "cancelled", "diverged"
        self.best: dict | None = None  # {"step", "val_loss", "tensors"} of the best validation so far
        self.kept: dict | None = None  # {"step", "val_loss", "rule"} once a finished run keeps its best prompt
        self.last_tensors: dict[str, torch.Tensor] | None = None  # the last step's prompt while the best is kept
        self.track_best = True
        if state is not None:
            self._restore(state)
        else:
            tensors, self.prior_info = initial_tensors(lm, config, self.prompt, init)
            self.prompt.load_tensors(tensors)
            self._snapshot()
            self.history.append({"step": 0, "train_loss": None, "val_loss": self.validate()})
            self.note_validation(self.history[-1]["val_loss"])
            self.save(status="running")

    # -- pieces -------------------------------------------------------------------------------------------
    def _measure_lr_scales(self, train_ex: list) -> dict[str, float]:
        """{"deep.{l}": activation RMS at block l's input / token RMS} for a deep prompt with scale_deep_lr, else {}."""
        cfg = self.config
        if cfg.method != "deep" or not cfg.scale_deep_lr:
            return {}
        from core.tuning.convergence import RATE_EXAMPLES

        texts = [ex.prompt + ex.target for ex in train_ex[:RATE_EXAMPLES]]
        scales = deep_lr_scales(self.lm, texts, list(cfg.layers), max_length=cfg.max_length)
        return {f"deep.{layer}": scale for layer, scale in scales.items()}

    def plateaued(self) -> bool:
        """Whether the plateau rule stops the run at its history so far (a pure function of the history)."""
        cfg = self.config
        return plateau_reached(history_val_losses(self.history), cfg.plateau_margin, cfg.plateau_patience)

    def batches_for_step(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step `step` (1-based): a pure function of seed and step."""
        cfg = self.config
        per_epoch = len(epoch_batches(self.train_items, cfg.batch_size, cfg.seed, 0, cfg.bucket))
        out = []
        for k in range(cfg.grad_accum):
            m = (step - 1) * cfg.grad_accum + k
            epoch, pos = divmod(m, per_epoch)
            idx = epoch_batches(self.train_items, cfg.batch_size, cfg.seed, epoch, cfg.bucket)[pos]
            out.append(self._collate([self.train_items[i] for i in idx]))
        return out

    def _collate(self, items: list[Encoded]) -> Batch:
        batch = collate(items, self.pad_id).to(self.device)
        if self.residuals is not None:
            self.residuals.attach(batch, items)
        return batch

    @torch.no_grad()
    def validate(self) -> float:
        total, count = 0.0, 0
        for idx in fixed_batches(self.val_items, self.config.batch_size):
            batch = self._collate([self.val_items[i] for i in idx])
            total += float(answer_loss(self.model, self.prompt, batch, self.autocast))
            count += batch.n_answer
        return total / max(count, 1)

    def note_validation(self, val_loss: float) -> None:
        """Remember the prompt if `val_loss` (just measured at this step) is the best so far."""
        if self.track_best and (self.best is None or val_loss < self.best["val_loss"]):
            self.best = {"step": self.step, "val_loss": val_loss, "tensors": self.prompt.tensors()}

    def keep_best(self) -> None:
        """Load the best-validation prompt (the run's result); the last step's prompt stays in the checkpoint."""
        best = self.best
        if best is None:
            return
        self.kept = {"step": best["step"], "val_loss": best["val_loss"], "rule": KEEP_RULE}
        if best["step"] != self.step:
            self.last_tensors = self.prompt.tensors()
            self.prompt.load_tensors(best["tensors"])

    def train_step(self) -> float:
        batches = self.batches_for_step(self.step + 1)
        n_answer = sum(b.n_answer for b in batches)
        total = 0.0
        for batch in batches:
            loss = answer_loss(self.train_model, self.prompt, batch, self.autocast) / n_answer
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"non-finite training loss ({float(loss.detach())}) at step {self.step + 1}")
            loss.backward()
            total += float(loss.detach())
            self.tokens += batch.n_tokens
        torch.nn.utils.clip_grad_norm_(self.prompt.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def _snapshot(self) -> None:
        self.snapshot_steps.append(self.step)
        for name, tensor in self.prompt.tensors().items():
            self.snapshots.setdefault(name, []).append(tensor)

    # -- persistence --------------------------------------------------------------------------------------
    def run_config(self) -> dict:
        lm = self.lm
        return {**self.config.to_dict(), **self.prior_info, "prompt": self.prompt.config.to_dict(),
                "model": lm.name, "model_fingerprint": lm.fingerprint, "precision": lm.precision,
                "device": str(lm.device), "hidden_size": lm.hidden_size, "num_layers": lm.num_layers,
                "compute_resolved": self.compute.dtype, "compute_reason": self.compute.reason,
                "cached_from_layer": self.residuals.start if self.residuals is not None else None,
                "n_train_examples": len(self.train_items), "n_val_examples": len(self.val_items),
                "task": _data_task(self.config),
                # every tensor's Adam rate (deep tensors scaled by their layer's activation RMS, see lr_scales)
                "lr_per_tensor": {name: self.config.lr * self.lr_scales.get(name, 1.0)
                                  for name in self.prompt.named_tensors()},
                "lr_scales": dict(self.lr_scales)}  # e.g. "math:add_sub_multiple@easy": which MATH task it learned

    def save(self, status: str, message: str = "", metrics: dict | None = None) -> None:
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        runs.write_tensors(out / runs.PROMPT_FILE, self.prompt.tensors())
        runs.write_tensors(out / runs.SNAPSHOT_FILE, {k: torch.stack(v) for k, v in self.snapshots.items()})
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "prompt": self.last_tensors or self.prompt.tensors(),
                 "best": self.best, "history": self.history,
                 "snapshot_steps": self.snapshot_steps, "snapshots": self.snapshots, "elapsed": self.elapsed,
                 "tokens": self.tokens, "prior_info": self.prior_info, "train_config": self.config.to_dict(),
                 "extended": self.extended, "lr_scales": self.lr_scales}
        runs._atomic_write(out / runs.CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        previous = runs.read_run_json(out) if runs.is_run(out) else {}
        runs.write_json(out / runs.RUN_JSON, {
            "config": self.run_config(), "history": self.history,
            "metrics": metrics if metrics is not None else previous.get("metrics", {}),
            "snapshot_steps": self.snapshot_steps, "status": status, "message": message, "steps_done": self.step,
            "created": previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_seconds": round(self.elapsed, 2),
            "train_tokens": self.tokens, "files": list(runs.RUN_FILES),  # the manifest: what `runs --delete` removes
            "converged": self.stop_reason == "plateau", "stop_reason": self.stop_reason,
            "stop_rule": plateau_rule(self.config.plateau_margin, self.config.plateau_patience,
                                      self.config.val_every, self.config.steps),
            **({"kept": self.kept} if self.kept else {}),
            **({"diverged": self.diverged} if self.diverged else {}),
            **({"extended": self.extended} if self.extended else {}),
        })

    def _restore(self, state: dict) -> None:
        saved = {**LEGACY_CONFIG, **state["train_config"],
                 "model_fingerprint": runs.read_run_json(self.out_dir)["config"].get("model_fingerprint")}
        mine = {**self.config.to_dict(), "model_fingerprint": self.lm.fingerprint}
        extend = self._extension(saved, mine, state["step"])
        ignored = ("eval_n", "steps", "warmup_steps", "keep") + (("scale_deep_lr",) if mine["method"] != "deep" else ())
        # eval_n and keep leave the training alone; a soft prompt has no deep rate
        keys = [k for k in mine if k not in ignored]
        diff = {k: (saved.get(k), mine.get(k)) for k in keys if saved.get(k) != mine.get(k)}
        if diff:
            raise ValueError(f"cannot resume {self.out_dir}: its config differs in {diff} (saved, asked); "
                             "resume with the same settings (only --steps may grow) or start a new run")
        self.prompt.load_tensors(state["prompt"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.history = state["step"], state["history"]
        self.snapshot_steps, self.snapshots = state["snapshot_steps"], state["snapshots"]
        self.elapsed, self.tokens, self.prior_info = state["elapsed"], state["tokens"], state["prior_info"]
        self.extended = list(state.get("extended", []))
        # a checkpoint from before best prompts were tracked cannot know its best: such a run keeps its last prompt
        self.best, self.track_best = state.get("best"), "best" in state
        if extend:
            # The linear decay is re-planned over the new total: the next update uses the rate the new plan gives
            # at this step (not the old plan's rate, which reached ~0 at its end). The first `steps_before`
            # updates followed the old plan, so an extended run differs from one planned long from the start.
            lrs = [base * lr_factor(self.scheduler.last_epoch, self.config.warmup_steps, self.config.steps,
                                    self.config.schedule) for base in self.scheduler.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            self.scheduler._last_lr = lrs
            self.extended.append({"at_step": self.step, "steps_before": saved["steps"],
                                  "steps_after": self.config.steps})

    def _extension(self, saved: dict, mine: dict, done: int) -> bool:
        """Does this resume raise `steps` (allowed: extending a run)? Refuses shortening; keeps the saved warm-up."""
        if mine["steps"] == saved.get("steps"):
            if mine["warmup_steps"] != saved.get("warmup_steps"):
                raise ValueError(f"cannot resume {self.out_dir}: its config differs in warmup_steps "
                                 f"({saved.get('warmup_steps')}, {mine['warmup_steps']}) (saved, asked); resume "
                                 "with the same settings or start a new run")
            return False
        if mine["steps"] < saved["steps"]:
            raise ValueError(f"cannot resume {self.out_dir} with steps {mine['steps']}: it was planned for "
                             f"{saved['steps']} steps ({done} done); a run can be extended (more steps), not "
                             "shortened: resume with --steps >= " f"{saved['steps']} or start a new run")
        if mine["warmup_steps"] != saved["warmup_steps"]:
            if mine["warmup_steps"] != default_warmup(mine["schedule"], mine["steps"]):  # the user asked for it
                raise ValueError(f"cannot resume {self.out_dir}: extending keeps its warm-up of "
                                 f"{saved['warmup_steps']} steps; leave out --warmup-steps (asked "
                                 f"{mine['warmup_steps']})")
            self.config.warmup_steps = saved["warmup_steps"]
        self.scheduler = warmup_linear_schedule(self.optimizer, self.config.warmup_steps, self.config.steps,
                                                self.config.schedule)
        return True


def train(lm, config: TrainConfig, out_dir: str | Path, *, init: torch.Tensor | None = None,
          examples: tuple[list, list, list] | None = None, resume: bool = False, force: bool = False,
          on_progress: Callable[[Progress], None] | None = None, cancel: threading.Event | None = None,
          evaluate: bool = True) -> TrainResult:
    """Train a prompt on `lm` (frozen) and write the run folder `out_dir`.

    init: optional [n_tokens, d] initial soft prompt (e.g. a Prior-lab sample), or {name: [n, d]} for any of the
        prompt's tensors; the rest are drawn from `config.prior` (recorded in the config).
    examples: optional (train, validation, eval) example lists; by default read with core.data.load_examples.
    resume: continue from `out_dir/checkpoint.pt` (same config). The result equals an uninterrupted run.
        Only `steps` may grow (extending a run; the decay is re-planned over the new total, see `_restore`).
        Raises core.run_folders.RunFolderError when there is no checkpoint to resume from.
    force: replace the run in `out_dir` (its own files only; a folder holding others is refused).
        Without resume or force an existing run is refused, and so is any non-empty folder that is not a run.
    cancel: when set, the run stops after the current step and saves a usable partial run (status "cancelled").
    While it trains, the run holds `out_dir/.lock`; a second writer gets core.locks.LockHeld naming this one.
    Returns a TrainResult; a diverging loss (see `divergence`) stops the run (status "diverged") and records
    run.json["diverged"] = {"step", "reason", "rule"}.
    """
    from core.run_folders import claim_run_dir

    with claim_run_dir(out_dir, resume=resume, force=force) as mode:
        return _train(lm, config, Path(out_dir), init=init, examples=examples, resume=mode == "resume",
                      on_progress=on_progress, cancel=cancel, evaluate=evaluate)


def _train(lm, config: TrainConfig, out_dir: Path, *, init: torch.Tensor | dict | None, examples: tuple | None,
           resume: bool, on_progress: Callable[[Progress], None] | None, cancel: threading.Event | None,
           evaluate: bool) -> TrainResult:
    trainer = _Trainer(lm, config, out_dir, examples, init, resume)
    message = ""
    cfg = config

    def report(train_loss: float | None, val_loss: float | None, phase: str = "train") -> None:
        if on_progress is not None:
            rate = trainer.tokens / trainer.elapsed if trainer.elapsed > 0 else 0.0
            on_progress(Progress(trainer.step, cfg.steps, train_loss, val_loss, trainer.elapsed, rate,
                                 list(trainer.history), phase))

    report(None, trainer.history[0]["val_loss"] if trainer.history else None)
    status = "running"
    plateau = trainer.plateaued()  # a resumed run that had already converged trains no further
    while not plateau and trainer.step < cfg.steps:
        if cancel is not None and cancel.is_set():
            status, message = "cancelled", (f"cancelled at step {trainer.step} of {cfg.steps}; resume (same "
                                            "settings) to continue")
            break
        start = time.perf_counter()
        try:
            train_loss = trainer.train_step()
        except NonFiniteLoss as exc:
            status, reason = "diverged", str(exc).split(" at step")[0]
            trainer.diverged = {"step": trainer.step + 1, "reason": reason, "rule": _DIVERGE_RULE}
            message = (f"diverged at step {trainer.step + 1}: {reason}; stopped, keeping the prompt of step "
                       f"{trainer.step}. Lower the learning rate (now {cfg.lr}) or use compute fp32.")
            break
        trainer.elapsed += time.perf_counter() - start
        val = None
        if trainer.step % cfg.val_every == 0 or trainer.step == cfg.steps:
            val = trainer.validate()
        trainer.history.append({"step": trainer.step, "train_loss": train_loss, "val_loss": val})
        if trainer.step % cfg.snapshot_every == 0 or trainer.step == cfg.steps:
            trainer._snapshot()
        initial = trainer.history[0]["val_loss"] if trainer.history else None
        # Judged on the validation set, not one training batch: a batch can spike and recover (deep prompts from
        # a token-scale gaussian, whose init the activation-scaled rate overwrites in the first steps, reached
        # up to 8x on single batches in the gallery, then converged). A non-finite training loss stops at once.
        reason = divergence(val, initial, "validation") if val is not None else None
        if reason:
            status = "diverged"
            trainer.diverged = {"step": trainer.step, "reason": reason, "rule": _DIVERGE_RULE}
            message = (f"diverged at step {trainer.step}: {reason}; stopped. Lower the learning rate "
                       f"(now {cfg.lr}).")
            report(train_loss, val)
            break
        if val is not None:
            trainer.note_validation(val)
            plateau = trainer.plateaued()
            trainer.save(status="running")
        report(train_loss, val)
    if status == "running":
        status = "done"
        rule = plateau_rule(cfg.plateau_margin, cfg.plateau_patience, cfg.val_every, cfg.steps)
        message = (f"converged at step {trainer.step}: the plateau rule stopped it ({rule})" if plateau else
                   f"not converged: used the whole budget of {cfg.steps} steps"
                   + (" before the plateau stop" if cfg.plateau_patience > 0 else " (no plateau stop)"))
    trainer.stop_reason = "plateau" if plateau else {"done": "budget"}.get(status, status)
    if trainer.snapshot_steps[-1] != trainer.step:
        trainer._snapshot()  # the trajectory ends at the last step's prompt
    if status == "done" and cfg.keep == "best":
        trainer.keep_best()
        if trainer.kept is not None:
            message += (f"; kept the prompt of step {trainer.kept['step']} (best validation loss "
                        f"{trainer.kept['val_loss']:.4f})")
    metrics = _loss_metrics(trainer)
    trainer.save(status=status if status != "done" else "evaluating", message=message, metrics=metrics)
    if status == "done" and evaluate and cfg.eval_n > 0 and trainer.eval_examples:
        report(None, None, phase="eval")
        from core.evaluation import evaluate_with_baselines

        metrics["eval"] = evaluate_with_baselines(
            lm, cfg.dataset, trainer.eval_examples[: cfg.eval_n], trainer.prompt, compute=cfg.compute,
            max_new_tokens=cfg.max_new_tokens, source=cfg.source, max_length=cfg.max_length)
    trainer.save(status=status, message=message, metrics=metrics)
    report(None, None, phase="done")
    return TrainResult(trainer.out_dir, status, message, trainer.history, metrics, trainer.prompt.tensors(),
                       converged=trainer.stop_reason == "plateau", stop_reason=trainer.stop_reason)


_DIVERGE_RULE = (f"a non-finite loss, or a validation loss above {DIVERGE_FACTOR:g} x the initial validation loss "
                 "(a single training batch may spike and recover)")


def _loss_metrics(trainer: _Trainer) -> dict:
    vals = [h["val_loss"] for h in trainer.history if h["val_loss"] is not None]
    out = {"initial_val_loss": vals[0] if vals else None, "final_val_loss": vals[-1] if vals else None,
           "train_seconds": round(trainer.elapsed, 2),
           "train_tokens_per_s": round(trainer.tokens / trainer.elapsed, 1) if trainer.elapsed else None}
    if vals and vals[0]:
        out["val_loss_reduction"] = 1 - vals[-1] / vals[0]
    out["best_val_loss"] = min(vals) if vals else None
    out["steps_done"] = trainer.step
    if trainer.kept is not None:  # the prompt the run keeps, which drift, the evaluation and prompt.safetensors use
        out["kept_step"], out["kept_val_loss"] = trainer.kept["step"], trainer.kept["val_loss"]
    init = {name: snaps[0] for name, snaps in trainer.snapshots.items() if snaps}
    out["drift"] = prompt_drift(trainer.prompt.tensors(), init, _token_nn_gap(trainer.lm))
    out["token_nn_gap"] = _token_nn_gap(trainer.lm)
    return out


def _token_nn_gap(lm) -> float | None:  # noqa: ANN001 - core.models.LoadedModel
    """The token nearest-neighbour gap of `lm`, remembered on the model (reading the vocabulary costs ~0.5 s)."""
    extra = getattr(lm, "extra", None)
    if isinstance(extra, dict) and "token_nn_gap" in extra:
        return extra["token_nn_gap"]
    gap = token_nn_gap(lm)
    if isinstance(extra, dict):
        extra["token_nn_gap"] = gap
    return gap


def encode_for(lm, examples: list, max_length: int = 320) -> list[Encoded]:
    """Public helper for benchmarks and tests: encode examples with the model's tokenizer."""
    return encode_examples(lm.tokenizer, examples, max_length)
