"""`python -m core precompute`: build the committed artifacts for the embedded model.

Every page opens on a fresh clone from these files without training anything.
The command is a list of named tasks; each writes its outputs atomically and is
skipped when they already exist for the same model and budget, so an interrupted
build resumes where it stopped. `--quick` shrinks every budget (for tests).

Tasks, in order:
    separation     per-layer separation of C4 / SQuAD / MATH document means (tables/separation.csv)
    trajectory     sentence step lengths vs random walks, token and last layer (tables/trajectory.json)
    token_pca      PCA axes of the token embeddings, keyed by content, used by every view of the token cloud
                   (tables/projections.json)
    fitted         fitted Gaussian of the token embeddings: mean, shrunk covariance (arrays/fitted_tokens)
    reference_knn  the vocabulary's own k-NN distances, for divergence measures (arrays/, ~0.8 MB)
    vae            the VAE prior's spread on last-layer SQuAD activations, 5 seeds (tables/vae.json)
    gallery        converged runs per prior and seed (runs/<method>-<dataset>-<prior>-s<seed>/): a sweep
                   (runs/sweep.json); the plan is `gallery_specs`, its cost in README "The gallery and its compute plan"
    runs_table     the run comparison table over the gallery (tables/runs.csv)
    transfer       every gallery soft prompt evaluated on MATH and QA (tables/transfer.csv)
    interpolation  MATH-C4 axis positions of interpolation priors and posteriors (tables/interpolation.csv)
    interpolation_view  the Interpolation page's view at the last block's input (tables/interpolation_view_l*)
    findings       the paper's findings against this model's numbers (tables/findings.json)
    activations_view  the Activations page's default views: token clouds and per-text means
                   (tables/activations_view*; core.analysis.activation_views)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.artifacts import ArtifactStore
from core.assets import ASSETS, GENERATOR_PROVENANCE
from core.compute import decide
from core.models import DEFAULT_MODEL, LoadedModel, load_model
from core.paths import REPO_ROOT

# The gallery (issue 11's plan). Soft MATH carries the prior comparison, so it gets every prior and 5 seeds (the
# equivalence and rank tests need >= 5 per prior); QA and deep MATH get fewer priors and 3 seeds.
SOFT_MATH_PRIORS = ("gaussian", "gaussian_tokens", "xavier", "fitted", "exclusion", "interpolation", "vae", "vocab")
SOFT_QA_PRIORS = ("gaussian", "fitted", "exclusion", "vae")  # near the origin, on the fit, off it, a learned fit
DEEP_PRIORS = ("gaussian", "fitted", "interpolation")
GALLERY_FORMAT = 2  # 2: converged runs (constant lr, plateau stop, run.json `converged`); 1: fixed short schedules
# Tokens of prompt + answer. Every QA row is longer (median 594 tokens); fit_to_length cuts its passage to a window
# around the answer, keeping the question. 192 has a quarter fewer tokens per QA step than 256 (7.8 s per step
# on one core), to fit the gallery's 12 QA runs into a sitting.
MAX_LENGTH = {"math": 320, "squad": 192}
# Budget fields of the tasks that do not read the gallery; the rest plan the gallery and what is made from it.
NON_GALLERY_BUDGET = ("sep_docs", "sep_layers", "traj_texts")
FROM_GALLERY = ("runs_table", "transfer", "interpolation", "interpolation_view", "findings")
EXCLUSION_WIDENING = 1.21  # c_dim, 10% wider per axis; the paper's c=5 gives 1.0056 at d=576, nearly the fit itself
# The gallery's build in progress, committed as it grows: on a 2-core CPU it takes 12-13 worker-hours, more than a
# sitting, and a build in a gitignored folder is lost with the checkout. Each sitting resumes it (README "The gallery
# and its compute plan"); `--land` moves its runs into artifacts/runs when every run is done and removes the folder.
# It sits outside artifacts/: no page reads it, and beside the gallery it replaces it would break artifacts' 30 MB.
GALLERY_BUILD = REPO_ROOT / "gallery-build"


@dataclass(frozen=True)
class Budget:
    """How much work each task does; `quick` is for tests, `full` for the committed artifacts.

    Steps are budgets: every gallery run trains at the TrainConfig convergence defaults (constant lr 0.03, plateau
    stop after `plateau_patience` validations without a 1% gain), so a run ends when it converges, or at its budget
    with `converged` false."""

    sep_docs: int  # documents per dataset for the separation table
    sep_layers: tuple[int, ...] | None  # None = every layer
    traj_texts: int
    math_steps: int  # step budget of a MATH run (soft and deep)
    qa_steps: int  # 500: at 300, 2 of 12 QA runs (noisy validation on 48 long answers) were still finding new bests
    math_batch: int
    qa_batch: int
    math_eval_n: int  # held-out items of the final generation metrics
    qa_eval_n: int
    n_train: int
    n_val: int
    val_every: int  # steps between validations: the plateau rule's clock
    snapshot_every: int  # prompt snapshots: each is n x d fp32 per tensor (46 KB soft, 138 KB deep at d=576); at
    # 25 / 60 steps a converged gallery (~120 steps) holds ~25 MB, under the artifacts' 30 MB
    deep_snapshot_every: int  # a deep prompt holds one tensor per prompted layer
    transfer_n: int
    soft_math_priors: tuple[str, ...]
    soft_math_seeds: int
    soft_qa_priors: tuple[str, ...]
    qa_seeds: int
    deep_priors: tuple[str, ...]
    deep_seeds: int
    deep_soft: bool  # False: deep vectors only, trained from cached activations (the paper also trains a soft prompt)
    datasets: tuple[str, ...]


FULL = Budget(sep_docs=48, sep_layers=None, traj_texts=200, math_steps=400, qa_steps=500, math_batch=8, qa_batch=4,
              math_eval_n=200, qa_eval_n=100, n_train=1000, n_val=48, val_every=10, snapshot_every=25,
              deep_snapshot_every=60, transfer_n=24, soft_math_priors=SOFT_MATH_PRIORS, soft_math_seeds=5,
              soft_qa_priors=SOFT_QA_PRIORS, qa_seeds=3, deep_priors=DEEP_PRIORS, deep_seeds=3, deep_soft=False,
              datasets=("math", "squad"))
QUICK = Budget(sep_docs=8, sep_layers=None, traj_texts=12, math_steps=3, qa_steps=2, math_batch=2, qa_batch=1,
               math_eval_n=2, qa_eval_n=2, n_train=8, n_val=2, val_every=1, snapshot_every=1, deep_snapshot_every=1,
               transfer_n=2, soft_math_priors=("gaussian", "fitted"), soft_math_seeds=2,
               soft_qa_priors=("gaussian",), qa_seeds=1, deep_priors=("gaussian",), deep_seeds=1, deep_soft=False,
               datasets=("math", "squad"))


def _git_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gallery_specs(budget: Budget) -> list[dict]:
    """The runs of the gallery, in the order they train: method, dataset, prior, seed and folder name.

    Soft MATH first, seed-major (seed 0 of every prior, then seed 1, ...), so a build stopped early still holds
    every prior; then deep MATH, then soft QA, in the same order."""
    groups = []
    if "math" in budget.datasets:
        groups += [("soft", "math", budget.soft_math_priors, budget.soft_math_seeds),
                   ("deep", "math", budget.deep_priors, budget.deep_seeds)]
    if "squad" in budget.datasets:
        groups.append(("soft", "squad", budget.soft_qa_priors, budget.qa_seeds))
    specs = [{"method": method, "dataset": dataset, "prior": prior, "seed": seed,
              "name": f"{method}-{dataset}-{prior}-s{seed}"}
             for method, dataset, priors, seeds in groups for seed in range(seeds) for prior in priors]
    return specs


def gallery_prior_params(method: str, prior: str) -> dict:
    """Options of each gallery prior.

    Data-fitted priors name their datasets and no layer, so the trainer draws each
    tensor at its own input: the soft prompt at layer 0 (the embeddings of the
    tokens the datasets use, as the paper's section 4.4 plots token-level prompts),
    each deep layer's vectors at that layer. The soft `fitted` prior is fitted to
    the whole vocabulary (section 4.2); the deep one to MATH activations. The exclusion
    prior widens the fit by EXCLUSION_WIDENING per axis (the paper's c=5 barely widens it at this width).
    """
    if prior == "interpolation":
        return {"source_a": "math", "source_b": "c4"}
    if prior == "vae":
        return {"source": "squad"}
    if prior == "fitted" and method == "deep":
        return {"source": "math"}
    if prior == "exclusion":
        return {"widening": EXCLUSION_WIDENING}
    return {}


def gallery_record(budget: Budget) -> dict:
    """What the manifest says about the gallery: its format and how its runs differ from the paper's."""
    return {
        "format": GALLERY_FORMAT,
        "training": "TrainConfig convergence defaults: constant lr 0.03 after warm-up, plateau stop (5 validations "
                    "without a 1% relative gain), steps = a budget; run.json `converged` says which rule stopped it",
        "deep": ("deep vectors only (soft=False), trained from cached activations at the first prompted block; the "
                 "paper's deep method also trains a token-level soft prompt" if not budget.deep_soft else
                 "deep vectors and a token-level soft prompt, as in the paper"),
        "eval_n": {"math": budget.math_eval_n, "squad": budget.qa_eval_n},
        "max_length": MAX_LENGTH,
        "exclusion_widening": EXCLUSION_WIDENING,
    }


def gallery_sweep(budget: Budget, model: str = DEFAULT_MODEL) -> tuple:
    """The gallery as a sweep: (core.sweep.SweepSpec, its trials), one trial per `gallery_specs` entry, named as
    the committed run folders. Shared options are the spec's options (the rest are TrainConfig's convergence
    defaults); each trial sets what differs by dataset and method.
    `model`: the loaded model's name, so the local backend trains the model precompute was given."""
    from core.sweep.spec import plan_trials

    options = {"n-train": budget.n_train, "n-val": budget.n_val, "val-every": budget.val_every}
    if model != DEFAULT_MODEL:  # the embedded model is the options' default: its recorded spec stays as committed
        options["model"] = model
    trials = []
    for spec in gallery_specs(budget):
        is_math = spec["dataset"] == "math"
        deep = spec["method"] == "deep"
        trial = {
            "name": spec["name"], "method": spec["method"], "dataset": spec["dataset"], "prior": spec["prior"],
            "seed": spec["seed"], "prior-param": gallery_prior_params(spec["method"], spec["prior"]),
            "steps": budget.math_steps if is_math else budget.qa_steps,
            "batch-size": budget.math_batch if is_math else budget.qa_batch,
            "eval-n": budget.math_eval_n if is_math else budget.qa_eval_n,
            "snapshot-every": budget.deep_snapshot_every if deep else budget.snapshot_every,
            "max-length": MAX_LENGTH[spec["dataset"]],
        }
        if deep and not budget.deep_soft:
            trial["soft"] = False  # TrainConfig field (CLI --no-soft): the cached-activation path
        trials.append(trial)
    return plan_trials(options, trials=trials)


def prune_done_checkpoints(runs_root: Path = GALLERY_BUILD / "runs") -> list[str]:
    """Remove the checkpoint of every done trial of the gallery sweep in `runs_root` (resume state, ~0.5 MB a run:
    the gallery keeps prompts, snapshots and run.json); stopped trials keep theirs, so the build resumes them.
    Returns the trials pruned. Run before committing a build in progress, and when the gallery is done."""
    from core.runs import CHECKPOINT_FILE
    from core.sweep.record import read_sweep

    done = [t["name"] for t in read_sweep(runs_root)["trials"] if t.get("status") == "done"]
    for name in done:
        (runs_root / name / CHECKPOINT_FILE).unlink(missing_ok=True)
    return done


def halve_snapshots(runs_root: Path) -> int:
    """Store the prompt snapshots of every run in `runs_root` in fp16; returns the bytes saved.

    Snapshots draw training paths and nearest-token read-outs, where fp16's relative precision (5e-4) changes
    nothing a page shows, and they are most of the gallery: the converged gallery holds ~26 MB of them in fp32,
    which took artifacts/ past its 30 MB. The kept prompts (prompt.safetensors) stay fp32, and `core.runs.load_run`
    reads snapshots back as fp32. Refuses (ValueError, nothing written) a value past fp16's range."""
    from safetensors.torch import load_file

    from core.runs import SNAPSHOT_FILE, write_tensors

    files = sorted(runs_root.glob(f"*/{SNAPSHOT_FILE}"))
    halved = {}
    for file in files:
        tensors = load_file(str(file))
        if all(t.dtype == torch.float16 for t in tensors.values()):
            continue
        half = {k: t.to(torch.float16) for k, t in tensors.items()}
        if not all(torch.isfinite(h).all() for h in half.values()):
            raise ValueError(f"{file}: a snapshot value is past fp16's range; the gallery's snapshots stay fp32")
        halved[file] = half
    before = sum(f.stat().st_size for f in halved)
    for file, half in halved.items():
        write_tensors(file, half)
    return before - sum(f.stat().st_size for f in halved)


def gallery_compute(runs_root: Path) -> dict:
    """Where and how long the gallery in `runs_root` trained: worker-hours (the sum of its trials' seconds, from
    sweep.json; a build spread over sittings adds them up) and its runs per device and compute reason (run.json),
    since a build resumed on another machine may train its later runs differently."""
    from collections import Counter

    from core.runs import is_run, read_run_json
    from core.sweep.record import is_sweep, read_sweep

    trials = read_sweep(runs_root)["trials"] if is_sweep(runs_root) else []
    configs = [read_run_json(runs_root / t["name"]).get("config", {}) for t in trials
               if t.get("status") == "done" and is_run(runs_root / t["name"])]
    where = Counter(f"{c.get('device', '?')}: {c.get('compute_reason', c.get('compute_resolved', '?'))}"
                    for c in configs)
    return {"worker_hours": round(sum(t.get("seconds") or 0.0 for t in trials) / 3600, 2),
            "runs_done": sum(t.get("status") == "done" for t in trials), "runs_by_compute": dict(where)}


class Precompute:
    """Runs the tasks against one artifacts folder, skipping what is already built."""

    def __init__(self, lm: LoadedModel, store: ArtifactStore, budget: Budget, command: str,
                 log: Callable[[str], None] = print, workers: int = 1) -> None:
        self.lm, self.store, self.budget, self.command, self.log = lm, store, budget, command, log
        if workers < 1:
            raise ValueError(f"workers must be at least 1; got {workers}")
        self.workers = workers  # gallery runs at once: 1 in this process, more as one-thread Ray tasks
        self.timings: dict[str, float] = dict(store.manifest().get("timings", {}))
        self.task_compute: dict[str, str] = dict(store.manifest().get("compute_by_task", {}))

    # ---- bookkeeping ---------------------------------------------------------------------
    def _check_manifest(self, force: list[str]) -> None:
        """Refuse artifacts of another model, or of another budget, unless only the gallery's part of the budget
        changed and this build rebuilds everything already made from the gallery (the gallery task itself resumes,
        and refuses runs trained to another plan)."""
        manifest = self.store.manifest()
        if not manifest:
            return
        stored, mine = manifest.get("budget") or {}, self._budget_record()
        other = "remove the folder or pass --out to build elsewhere"
        if manifest.get("model_fingerprint") != self.lm.fingerprint:
            raise SystemExit(f"{self.store.root} holds artifacts built for another model "
                             f"({manifest.get('model_fingerprint')}); {other}")
        if stored == mine:
            return
        outside = [k for k in NON_GALLERY_BUDGET if stored.get(k) != mine.get(k)]
        if outside:
            raise SystemExit(f"{self.store.root} holds artifacts built with another budget ({', '.join(outside)}); "
                             f"{other}")
        built = manifest.get("tasks_done", [])  # only what exists was made from the old plan (a gallery build has none)
        missing = [t for t in FROM_GALLERY if t in built and t not in force]
        if missing:
            raise SystemExit(f"{self.store.root} holds a gallery built to another plan: rebuild what is made from it "
                             f"with --force {' '.join(FROM_GALLERY)} (the runs folder must hold runs of this plan)")

    def _budget_record(self) -> dict:
        """The budget as the manifest stores it (JSON types), to compare with a saved one."""
        return json.loads(json.dumps(self.budget.__dict__ | {"sep_layers": self._sep_layers()}))

    def _sep_layers(self) -> list[int]:
        return list(self.budget.sep_layers or range(self.lm.num_layers + 1))

    def write_manifest(self, done: list[str]) -> None:
        previous = self.store.manifest()
        if previous.get("commands") and previous["commands"][-1] == self.command:
            previous["commands"] = previous["commands"][:-1]  # one entry per invocation, not per task
        manifest = {
            "model": self.lm.name,
            "model_fingerprint": self.lm.fingerprint,
            "assets": {a.key: f"{a.package}=={a.version}" for a in ASSETS.values()}
            | {"math-generator": f"{GENERATOR_PROVENANCE['package']}=={GENERATOR_PROVENANCE['version']}"},
            "budget": self._budget_record(),
            # what compute "auto" resolved to for the latest build, and for each task where it last ran: tasks
            # rebuilt later on another machine may differ from the gallery's
            "compute": decide(self.lm).to_dict(),
            "compute_by_task": {t: self.task_compute.get(t, previous.get("compute", {}).get("reason", "unknown"))
                                for t in done},
            "seeds": sorted({s["seed"] for s in gallery_specs(self.budget)}),
            "gallery": gallery_record(self.budget) | {"built": gallery_compute(self.store.runs_root)},
            # the command that built the artifacts, and every later one that touched them
            "command": previous.get("command", self.command),
            "commands": [*previous.get("commands", []), self.command][-20:],
            "code_version": _git_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tasks_done": done,
            "timings": self.timings,
            "total_bytes": self.store.total_bytes(),
        }
        self.store.save_manifest(manifest)

    # ---- tasks ---------------------------------------------------------------------------
    def task_separation(self) -> None:
        from core.analysis.separation import all_layer_means, dataset_separation, separation_gaps

        with _fraction_bar("separation") as progress:
            table = dataset_separation(self.lm, n=self.budget.sep_docs, layers=self._sep_layers(), progress=progress)
        self.store.save_table("separation", table)
        # The MATH-vs-SQuAD gap with CIs over documents at the first (lexical control), middle and last layer;
        # the document means are the ones the table used (cached on disk).
        layers = sorted(int(x) for x in table["layer"].unique())
        every = len(layers) == self.lm.num_layers + 1
        means = all_layer_means(self.lm, n=self.budget.sep_docs, layers=None if every else layers)
        picks = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))
        self.store.save_table("separation_gaps", separation_gaps(means, picks))

    def task_trajectory(self) -> None:
        from core.analysis.trajectories import shuffled_cv_pairs, trajectory_test
        from core.data import example_texts

        texts = [t.split(". ")[0] for t in example_texts("c4", self.budget.traj_texts, seed=0)]
        out = {}
        for key, layer in (("token_layer", 0), ("last_layer", self.lm.num_layers)):
            test = trajectory_test(self.lm, texts, layer=layer, seed=0)
            out[key] = {k: (float(v) if isinstance(v, int | float | np.floating) else v)
                                     for k, v in test.__dict__.items()}
        # Per sentence, CV of step lengths against the same tokens shuffled (the trajectory finding's test).
        out["shuffled_cv"] = {key: shuffled_cv_pairs(self.lm, texts, layer=layer, seed=0)
                              for key, layer in (("token_layer", 0), ("last_layer", self.lm.num_layers))}
        self.store.save_json("trajectory", out)

    def task_token_pca(self) -> None:
        from core.analysis.projections import PCA_ARTIFACT, fit_pca, pca_cache_key

        emb = self.lm.input_embeddings().numpy()
        self.store.save_json(PCA_ARTIFACT, {pca_cache_key(emb): fit_pca(emb).to_dict()})

    def task_fitted(self) -> None:
        from core.priors import fitted_gaussian

        fit = fitted_gaussian(self.lm)
        self.store.save_arrays("fitted_tokens", {
            "mean": np.asarray(fit.mean, dtype=np.float32),
            "cov": np.asarray(fit.cov, dtype=np.float16),
        }, metadata={"describe": getattr(fit, "describe", lambda: "fitted Gaussian of token embeddings")()})

    def task_reference_knn(self) -> None:
        from core.analysis.divergence import save_reference_knn_artifact

        save_reference_knn_artifact(self.lm, self.store)

    def task_vae(self) -> None:
        from core.priors.vae import spread_by_seed

        # The paper's section 4.6: the VAE on last-layer activations (layer None), over 5 training seeds for a CI;
        # the gallery's soft runs draw theirs at layer 0, where a soft prompt lives.
        self.store.save_json("vae", _jsonable(spread_by_seed(self.lm, **gallery_prior_params("soft", "vae"))))

    def task_gallery(self) -> None:
        """The gallery is a sweep (`gallery_sweep`) run by the sweep engine: one run at a time in this process,
        sharing the model, or with `workers` > 1 that many at once as one-thread tasks of a local Ray cluster (on a
        CPU the runs are small, so one per core beats one run on every core).
        `python -m core sweep --spec artifacts/runs/sweep.json --out DIR` reproduces it anywhere."""
        from core.sweep import run_sweep

        spec, trials = gallery_sweep(self.budget, self.lm.name)
        backend = ({"backend": "local", "lm": self.lm} if self.workers == 1 else
                   {"backend": "ray", "backend_options": {"cpus_per_trial": 1, "num_cpus": self.workers}})
        result = run_sweep(self.store.runs_root, trials, spec=spec, name="gallery", **backend)
        failed = [t for t in result.record["trials"] if t["status"] != "done"]
        if failed:
            raise RuntimeError("gallery runs not done: " + "; ".join(
                f"{t['name']} {t['status']}: {(t.get('error') or t.get('note') or '').splitlines()[0:1]}"
                for t in failed))
        prune_done_checkpoints(self.store.runs_root)

    def _gallery_paths(self) -> list[Path]:
        return [self.store.runs_root / s["name"] for s in gallery_specs(self.budget)]

    def task_runs_table(self) -> None:
        from core.analysis.runs_compare import RunEntry, runs_table
        from core.runs import run_info

        entries = [RunEntry(run_info(p), "precomputed") for p in self._gallery_paths()]
        table = runs_table(self.lm, entries)
        # relative, as transfer's: no host path in a committed table
        table["path"] = [str(Path(p).relative_to(self.store.root)) for p in table["path"]]
        self.store.save_table("runs", table)

    def task_transfer(self) -> None:
        from core.analysis.runs_compare import transfer_matrix

        soft = [p for p in self._gallery_paths() if p.name.startswith("soft-")]
        with _fraction_bar("transfer") as progress:
            table = transfer_matrix(self.lm, soft, n=self.budget.transfer_n, max_length=MAX_LENGTH,
                                    progress=progress)
        table["path"] = [str(Path(p).relative_to(self.store.root)) for p in table["path"]]
        self.store.save_table("transfer", table)

    def task_interpolation(self) -> None:
        from core.analysis.runs_compare import interpolation_positions

        deep = [p for p in self._gallery_paths() if p.name.startswith("deep-")]
        self.store.save_table("interpolation", interpolation_positions(self.lm, deep))

    def task_interpolation_view(self) -> None:
        from core.analysis.runs_compare import save_interpolation_view

        deep = [p for p in self._gallery_paths() if p.name.startswith("deep-")]
        save_interpolation_view(self.store, self.lm, self.lm.num_layers - 1, deep)

    def task_findings(self) -> None:
        from core.findings import compute_findings

        self.store.save_json("findings", compute_findings(self.store, self.lm))

    def task_activations_view(self) -> None:
        from core.analysis.activation_views import save_activations_view

        save_activations_view(self.store, self.lm, self.command)

    def land_gallery(self, build: Path = GALLERY_BUILD) -> None:
        """Land a finished gallery build: the runs of `build`/runs (every run of this budget's plan done) replace the
        store's, everything made from them is rebuilt (FROM_GALLERY), and the build folder is removed. Refused, with
        what is left to train, while any run is not done; nothing is moved then."""
        from core.sweep.record import is_sweep, read_sweep

        runs_root = build / "runs"
        if not is_sweep(runs_root):
            raise SystemExit(f"{runs_root} holds no gallery build (no sweep.json); start one with "
                             f"`python -m core precompute --out {build} --only gallery --workers 2`")
        status = {t["name"]: t.get("status") for t in read_sweep(runs_root)["trials"]}
        planned = [s["name"] for s in gallery_specs(self.budget)]
        left = [name for name in planned if status.get(name) != "done"]
        if left:
            raise SystemExit(f"{runs_root}: {len(left)} of {len(planned)} gallery runs are not done yet (next: "
                             f"{left[0]}); resume the build with `python -m core precompute --out {build} "
                             "--only gallery --workers 2`")
        old = self.store.runs_root.with_name(self.store.runs_root.name + ".replaced")
        if self.store.runs_root.exists():
            self.store.runs_root.rename(old)  # kept until the new runs are in place
        shutil.move(str(runs_root), str(self.store.runs_root))
        shutil.rmtree(old, ignore_errors=True)
        halve_snapshots(self.store.runs_root)  # before the tables, which are then made from the files as committed
        # the gallery task's time is the build's (worker-seconds over its sittings), not the replaced gallery's
        self.timings["gallery"] = round(3600 * gallery_compute(self.store.runs_root)["worker_hours"], 1)
        self.run(force=list(FROM_GALLERY))  # its gallery task finds every run done and prunes their checkpoints
        shutil.rmtree(build)

    TASKS = ("separation", "trajectory", "token_pca", "fitted", "reference_knn", "vae", "gallery", "runs_table",
             "transfer", "interpolation", "interpolation_view", "findings", "activations_view")

    def run(self, only: list[str] | None = None, force: list[str] | None = None) -> None:
        self._check_manifest(list(force or []))
        done = list(self.store.manifest().get("tasks_done", []))
        tasks = [t for t in self.TASKS if not only or t in only]
        for name in tqdm(tasks, desc="precompute", unit="task"):
            if name in done and name not in (force or []) and name != "gallery":
                continue
            start = time.perf_counter()
            self.log(f"== {name}")
            getattr(self, f"task_{name}")()
            self.task_compute[name] = decide(self.lm).reason
            self.timings[name] = round(time.perf_counter() - start, 1) + (
                self.timings.get(name, 0.0) if name == "gallery" and name in done else 0.0)
            if name not in done:
                done.append(name)
            self.write_manifest(done)  # after every task, so an interrupted build resumes from here


@contextlib.contextmanager
def _fraction_bar(desc: str) -> Iterator[Callable[[float], None]]:
    """A tqdm bar in percent, driven by the `progress(fraction)` callbacks core functions take."""
    bar = tqdm(total=100, desc=desc, unit="%", leave=False)
    try:
        yield lambda f: bar.update(round(100 * f) - bar.n)
    finally:
        bar.close()


def _jsonable(obj):  # noqa: ANN001, ANN202
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model id (artifacts are for the embedded model)")
    parser.add_argument("--out", default=None, help="artifacts folder (default: artifacts/)")
    parser.add_argument("--quick", action="store_true", help="tiny budget, for tests (never commit its output)")
    parser.add_argument("--only", nargs="*", choices=Precompute.TASKS, help="run only these tasks")
    parser.add_argument("--force", nargs="*", default=[], choices=Precompute.TASKS, help="rebuild these tasks")
    parser.add_argument("--land", action="store_true",
                        help=f"land a finished gallery build ({GALLERY_BUILD.relative_to(REPO_ROOT)}): its runs "
                             "replace the store's and everything made from them is rebuilt")
    parser.add_argument("--workers", type=int, default=1,
                        help="gallery runs trained at once: 1 in this process; N > 1 as one-thread tasks of a "
                             "local Ray cluster of N CPUs (e.g. one per core)")


def run(args: argparse.Namespace) -> int:
    store = ArtifactStore(Path(args.out)) if args.out else ArtifactStore()
    lm = load_model(args.model, precision="fp32")
    budget = QUICK if args.quick else FULL
    command = "python -m core precompute " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["precompute"] else [])
    start = time.perf_counter()
    build = Precompute(lm, store, budget, command.strip(), workers=args.workers)
    if args.land:
        build.land_gallery()
    else:
        build.run(only=args.only, force=args.force)
    print(f"artifacts in {store.root}: {store.total_bytes() / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s")
    print(json.dumps(store.manifest().get("timings", {})))
    return 0


__all__ = ["FULL", "GALLERY_BUILD", "GALLERY_FORMAT", "MAX_LENGTH", "QUICK", "Budget", "Precompute", "gallery_record",
           "gallery_compute", "gallery_specs", "gallery_sweep", "halve_snapshots", "prune_done_checkpoints"]
