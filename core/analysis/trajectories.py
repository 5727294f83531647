"""Sentences as paths through the token-embedding space or a layer's activations, against random walks.

    >>> traj = sentence_trajectory(lm, "The cat sat on the mat.")      # layer 0: token embeddings
    >>> traj.points.shape, traj.steps.shape                             # [T, d], [T-1]
    >>> result = trajectory_test(lm, sentences, layer=0)               # real vs random walks
    >>> result.p_value

The paper (sec. 4.1) found sentence paths "highly jumpy", with step statistics
"statistically lower than the random walks, though close". Here a random walk of
length T is a sequence of T token ids drawn uniformly from the vocabulary
(special tokens excluded); at layer 0 its points are those tokens' embeddings, at
a deeper layer the model reads the random sequence and we take that layer's
activations, so the baseline goes through the same computation as the sentence.

The test is one-sided Mann-Whitney U (scipy) with the *sequence* as the unit:
each sentence and each walk contributes its mean step length (and, separately,
its step-length standard deviation), because steps within one sentence are not
independent. H1: real sentences take shorter steps than random walks.
At layers >= 1 the first token (attention sink, huge norm) is left out of the
path, for sentences and walks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from core.activations import check_layers, iter_batches, resolve_compute, tokenize
from core.models import LoadedModel


@dataclass(frozen=True)
class Trajectory:
    """A text's path at one layer: points [T, d] with token ids [T] and token texts [T]."""

    text: str
    layer: int
    token_ids: np.ndarray
    token_texts: list[str]
    points: np.ndarray
    first_position: int  # 0 at layer 0; 1 when the attention-sink token was left out

    @property
    def steps(self) -> np.ndarray:
        """Euclidean length of each step, [T-1]."""
        return step_lengths(self.points)

    def frame(self) -> pd.DataFrame:
        """One row per point (hover data): order, token, token_id, step_in (length of the step arriving here)."""
        return pd.DataFrame({
            "order": np.arange(len(self.token_ids)),
            "token": [repr(t) for t in self.token_texts],
            "token_id": self.token_ids,
            "step_in": np.concatenate([[np.nan], self.steps]),
        })


def step_lengths(points: np.ndarray) -> np.ndarray:
    """[T, d] -> [T-1] distances between consecutive points."""
    points = np.asarray(points, dtype=np.float64)
    return np.linalg.norm(np.diff(points, axis=0), axis=1)


def _layer_points(
    lm: LoadedModel, ids: list[list[int]], layer: int, batch_size: int = 16, compute: str = "auto"
) -> list[np.ndarray]:
    """Points of each id sequence at `layer`: [len, d] (layer 0) or [len-1, d] (sink token dropped)."""
    if layer == 0:
        emb = lm.input_embeddings()  # [vocab, d]
        return [emb[torch.tensor(seq)].numpy() for seq in ids]
    mode = resolve_compute(lm, compute)
    out: list[np.ndarray | None] = [None] * len(ids)
    for idx, _mask, hidden in iter_batches(lm, ids, [layer], batch_size, mode):
        for r, doc in enumerate(idx):
            out[doc] = hidden[layer][r, 1 : len(ids[doc])].cpu().numpy()
    return out  # type: ignore[return-value]


def sentence_trajectory(lm: LoadedModel, text: str, layer: int = 0, max_length: int = 64) -> Trajectory:
    """The path of `text` at `layer` (0 = token embeddings). points [T, d], T >= 2 required."""
    (layer,) = check_layers(lm, [layer])
    ids = tokenize(lm, [text], max_length)
    need = 2 if layer == 0 else 3
    if len(ids[0]) < need:
        raise ValueError(
            f"the text has {len(ids[0])} token(s); a path at layer {layer} needs at least {need}: "
            "type a longer sentence"
        )
    points = _layer_points(lm, ids, layer)[0]
    first = 0 if layer == 0 else 1
    token_ids = np.asarray(ids[0][first:], dtype=np.int64)
    token_texts = [lm.tokenizer.decode([int(t)]) for t in token_ids]
    return Trajectory(text, layer, token_ids, token_texts, points.astype(np.float32), first)


def regular_token_ids(lm: LoadedModel) -> np.ndarray:
    """Ids a random walk may visit: the embedding rows minus special tokens, int64 [V']."""
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    special = set(lm.tokenizer.all_special_ids)
    return np.array([i for i in range(min(vocab, len(lm.tokenizer))) if i not in special], dtype=np.int64)


def random_walks(lm: LoadedModel, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """One uniform random token sequence per requested length (seeded)."""
    pool = regular_token_ids(lm)
    rng = np.random.default_rng(seed)
    return [rng.choice(pool, size=int(n), replace=True).tolist() for n in lengths]


def shuffled_walks(sequences: Sequence[Sequence[int]], copies: int = 1, seed: int = 0) -> list[list[int]]:
    """Each sequence's own tokens in random order, `copies` times (the first token stays first).

    A control the uniform walk lacks: same tokens, same norms, only the order is lost.
    """
    rng = np.random.default_rng(seed)
    out = []
    for seq in sequences:
        for _ in range(copies):
            out.append([seq[0], *rng.permutation(np.asarray(seq[1:])).tolist()])
    return out


BASELINES = ("uniform", "shuffled")


def _baseline_walks(
    lm: LoadedModel, ids: Sequence[Sequence[int]], copies: int, baseline: str, seed: int
) -> list[list[int]]:
    if baseline == "uniform":
        return random_walks(lm, [len(s) for s in ids for _ in range(copies)], seed=seed)
    if baseline == "shuffled":
        return shuffled_walks(ids, copies, seed=seed)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")


@dataclass(frozen=True)
class StepTest:
    """Real vs random-walk step statistics and a one-sided Mann-Whitney U test (H1: real steps shorter).

    unit: "sequence" (one mean per sentence/walk) or "step" (pooled steps, for a single sentence).
    common_language: P(real value < random value), U / (n_real · n_random); 0.5 = no difference.
    """

    layer: int
    unit: str
    baseline: str
    n_real: int
    n_random: int
    real_mean_step: float
    real_std_step: float
    random_mean_step: float
    random_std_step: float
    u_statistic: float
    p_value: float
    common_language: float
    std_u_statistic: float | None = None  # the same test on per-sequence standard deviations
    std_p_value: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "shorter than" if self.p_value < 0.05 else "not significantly shorter than"
        text = (
            f"layer {self.layer}: real steps {self.real_mean_step:.3g} ± {self.real_std_step:.3g} vs {self.baseline} "
            f"walks {self.random_mean_step:.3g} ± {self.random_std_step:.3g}: {verdict} the walks "
            f"(one-sided Mann-Whitney U={self.u_statistic:.0f}, p={self.p_value:.2g}, unit={self.unit}, "
            f"n={self.n_real} vs {self.n_random}, P(real<walk)={self.common_language:.2f})"
        )
        if self.std_p_value is not None:
            text += f"; per-sequence step std lower than the walks': p={self.std_p_value:.2g}"
        return text


def _mwu_less(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    from scipy.stats import mannwhitneyu

    res = mannwhitneyu(a, b, alternative="less")
    # scipy's U counts pairs with a > b (ties half), so P(a < b) is its complement.
    return float(res.statistic), float(res.pvalue), 1.0 - float(res.statistic) / (len(a) * len(b))


def compare_steps(
    layer: int, real: list[np.ndarray], random: list[np.ndarray], unit: str = "sequence", baseline: str = "uniform"
) -> StepTest:
    """Test real step lengths against random-walk ones; each list holds one [T-1] array per sequence."""
    if unit not in ("sequence", "step"):
        raise ValueError(f"unit must be 'sequence' or 'step'; got {unit!r}")
    real = [np.asarray(s, dtype=np.float64) for s in real if len(s)]
    random = [np.asarray(s, dtype=np.float64) for s in random if len(s)]
    if not real or not random:
        raise ValueError("need at least one real and one random sequence with a step each")
    all_real, all_random = np.concatenate(real), np.concatenate(random)
    std_u = std_p = None
    if unit == "sequence":
        if len(real) < 2 or len(random) < 2:
            raise ValueError("a per-sequence test needs at least 2 real sentences; use unit='step' for one")
        u, p, cl = _mwu_less(np.array([s.mean() for s in real]), np.array([s.mean() for s in random]))
        std_u, std_p, _ = _mwu_less(np.array([s.std() for s in real]), np.array([s.std() for s in random]))
        n_real, n_random = len(real), len(random)
    else:
        u, p, cl = _mwu_less(all_real, all_random)
        n_real, n_random = len(all_real), len(all_random)
    return StepTest(
        layer=layer, unit=unit, baseline=baseline, n_real=n_real, n_random=n_random,
        real_mean_step=float(all_real.mean()), real_std_step=float(all_real.std()),
        random_mean_step=float(all_random.mean()), random_std_step=float(all_random.std()),
        u_statistic=u, p_value=p, common_language=cl, std_u_statistic=std_u, std_p_value=std_p,
    )


def trajectory_test(
    lm: LoadedModel,
    texts: Sequence[str],
    layer: int = 0,
    walks_per_text: int = 1,
    seed: int = 0,
    max_length: int = 48,
    baseline: str = "uniform",
) -> StepTest:
    """Do real sentences move more locally than random walks of the same lengths? Per-sequence test.

    texts: sentences (each truncated to `max_length` tokens; those too short for a step are skipped).
    baseline: "uniform" (random tokens, the paper's random walk) or "shuffled" (the sentence's own tokens reordered).
    """
    (layer,) = check_layers(lm, [layer])
    if walks_per_text < 1:
        raise ValueError(f"walks_per_text must be at least 1; got {walks_per_text}")
    ids = [seq for seq in tokenize(lm, texts, max_length) if len(seq) >= (2 if layer == 0 else 3)]
    if len(ids) < 2:
        raise ValueError("need at least 2 texts with 2+ tokens (3+ above layer 0) for a per-sequence test")
    walks = _baseline_walks(lm, ids, walks_per_text, baseline, seed)
    real = [step_lengths(p) for p in _layer_points(lm, ids, layer)]
    rand = [step_lengths(p) for p in _layer_points(lm, walks, layer)]
    return compare_steps(layer, real, rand, unit="sequence", baseline=baseline)


def reference_cloud(
    lm: LoadedModel, layer: int = 0, n_texts: int = 32, max_length: int = 64, seed: int = 0
) -> tuple[str, np.ndarray, pd.DataFrame]:
    """The cloud a path is drawn over: (name, points [n, d], hover metadata with token and token_id).

    Layer 0: the whole vocabulary's input embeddings. Layer k >= 1: the layer-k activations of
    `n_texts` news texts (C4 role), first tokens left out (cached by `dataset_activations`).
    """
    from core.activations import dataset_activations
    from core.analysis.projections import token_table

    (layer,) = check_layers(lm, [layer])
    if layer == 0:
        emb = lm.input_embeddings().numpy()
        return "vocabulary", emb, token_table(lm, np.arange(len(emb)))
    acts = dataset_activations(lm, "c4", [layer], n=n_texts, seed=seed, max_length=max_length)
    return f"news tokens, layer {layer}", acts.layer(layer), acts.rows_frame()


def step_histogram(test_steps: np.ndarray, walk_steps: np.ndarray, bins: int = 30) -> pd.DataFrame:
    """Share of steps per length bin for a sentence [T-1] and its walks [n, T-1] (for one chart).

    Columns: group ('sentence' | 'random walks'), left, right (bin edges), share.
    """
    both = np.concatenate([np.ravel(test_steps), np.ravel(walk_steps)])
    edges = np.histogram_bin_edges(both, bins=bins)
    rows = []
    for group, values in (("sentence", np.ravel(test_steps)), ("random walks", np.ravel(walk_steps))):
        counts, _ = np.histogram(values, bins=edges)
        share = counts / max(counts.sum(), 1)
        rows.append(pd.DataFrame({"group": group, "left": edges[:-1], "right": edges[1:], "share": share}))
    return pd.concat(rows, ignore_index=True)


def sentence_vs_random(
    lm: LoadedModel,
    text: str,
    layer: int = 0,
    n_walks: int = 200,
    seed: int = 0,
    max_length: int = 64,
    baseline: str = "uniform",
) -> tuple[Trajectory, StepTest, np.ndarray]:
    """One sentence's path, its pooled-step test against `n_walks` walks of its length,
    and the walks' step lengths [n_walks, T-1] (for a histogram)."""
    traj = sentence_trajectory(lm, text, layer, max_length)
    if n_walks < 1:
        raise ValueError(f"n_walks must be at least 1; got {n_walks}")
    ids = tokenize(lm, [text], max_length)
    walks = _baseline_walks(lm, ids, n_walks, baseline, seed)
    rand = np.stack([step_lengths(p) for p in _layer_points(lm, walks, layer)])
    return traj, compare_steps(layer, [traj.steps], list(rand), unit="step", baseline=baseline), rand


def step_cv(steps: np.ndarray) -> float:
    """Coefficient of variation of one path's step lengths (std / mean): how unevenly it jumps, scale-free."""
    steps = np.asarray(steps, dtype=np.float64)
    return float(steps.std() / steps.mean()) if len(steps) and steps.mean() > 0 else float("nan")


def shuffled_cv_pairs(
    lm: LoadedModel, texts: Sequence[str], layer: int = 0, seed: int = 0, max_length: int = 48
) -> dict:
    """Per sentence, the coefficient of variation of its step lengths and of the same tokens shuffled.

    The shuffled sentence is the baseline: same tokens (same embeddings at layer 0), order destroyed, so a
    difference is about order, not vocabulary. Returns {"layer", "real": [m], "shuffled": [m]} (lists, JSON-ready),
    paired by sentence; the pairs feed `core.analysis.claims.paired_difference`.
    """
    (layer,) = check_layers(lm, [layer])
    ids = [seq for seq in tokenize(lm, texts, max_length) if len(seq) >= (3 if layer == 0 else 4)]
    if len(ids) < 2:
        raise ValueError("need at least 2 texts with 3+ tokens (4+ above layer 0) to compare step variation")
    walks = shuffled_walks(ids, 1, seed=seed)
    real = [step_cv(step_lengths(p)) for p in _layer_points(lm, ids, layer)]
    shuffled = [step_cv(step_lengths(p)) for p in _layer_points(lm, walks, layer)]
    keep = [i for i in range(len(real)) if np.isfinite(real[i]) and np.isfinite(shuffled[i])]
    return {"layer": int(layer), "real": [real[i] for i in keep], "shuffled": [shuffled[i] for i in keep]}
