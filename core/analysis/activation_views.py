"""The Activations page's two views, computed live or served from the committed artifacts.

    >>> s = CloudSettings.default(lm.num_layers)        # C4/SQuAD/MATH, layer L//2, 16 texts x 64 tokens, PCA
    >>> clouds = token_clouds(lm, s)                    # clouds.views[15].frame: one row per drawn token
    >>> means = text_means(lm, MeanSettings.default(lm.num_layers))   # one row per text, at the last layer

The page's default settings are the dataclasses' defaults. `python -m core precompute` (task
`activations_view`) stores exactly what those defaults draw: the token clouds at the default
layer and the per-text means at every layer (so the page's layer slider is served too), with
hover text, outlier flags and axis labels. `load_activations_view` returns them only for the
weights they were built on; `StoredActivationsView.clouds` / `.means` only for settings equal to
the stored ones, so the page computes anything else live, as before.

Files (tables/): activations_view_tokens.csv (group, row, x, y, inside, token, token_id, doc,
position, layer), activations_view_means.csv (group, row, x, y, inside, layer) and
activations_view.json (settings, model fingerprint, depth, axis labels, notes, text snippets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from core.analysis.projections import View, project_groups

DATASETS = ("c4", "squad", "math")
NAME = "activations_view"
SNIPPET = 80  # characters of each text shown on hover
ProgressFn = Callable[[float], None]


@dataclass(frozen=True)
class CloudSettings:
    """What the token clouds depend on; defaults are the page's defaults (layers: `default`)."""

    datasets: tuple[str, ...] = DATASETS
    layers: tuple[int, ...] = ()  # sorted; the page's default is the middle layer
    n_docs: int = 16  # texts per dataset
    max_length: int = 64  # tokens per text
    method: str = "pca"  # or "tsne"
    include_first: bool = False  # the attention-sink first token of each text

    @classmethod
    def default(cls, num_layers: int) -> CloudSettings:
        return cls(layers=(num_layers // 2,))

    @property
    def max_points(self) -> int:
        return 3000 if self.method == "pca" else 1500  # t-SNE costs about 10 s per 1,000 points here


@dataclass(frozen=True)
class MeanSettings:
    """What the per-text means view depends on; `layer` defaults to the last (the paper's Figure 5)."""

    datasets: tuple[str, ...] = DATASETS
    layer: int = -1
    n_docs: int = 32
    max_length: int = 64
    method: str = "pca"

    @classmethod
    def default(cls, num_layers: int) -> MeanSettings:
        return cls(layer=num_layers)


@dataclass(frozen=True)
class TokenClouds:
    """layer -> View of the tokens (frame columns group, row, x, y, inside, token, token_id, doc, position, text);
    n_excluded: first tokens left out over all datasets."""

    views: dict[int, View]
    n_excluded: int
    source: str = "Computed live."  # or where the stored view came from (the page's caption)


def _reference(groups: dict) -> str | None:
    return "c4" if "c4" in groups else None  # PCA axes fitted on the web-text cloud when it is drawn


def token_clouds(lm, s: CloudSettings, progress: ProgressFn | None = None) -> TokenClouds:  # noqa: ANN001
    """Project each dataset's token activations at each of `s.layers` (activations cached on disk)."""
    from core.activations import dataset_activations

    acts = {}
    for k, d in enumerate(s.datasets):
        acts[d] = dataset_activations(
            lm, d, list(s.layers), n=s.n_docs, max_length=s.max_length,
            progress=None if progress is None else (lambda f, k=k: progress((k + f) / len(s.datasets))),
        ).with_first_token(s.include_first)
    views = {layer: project_groups({d: a.layer(layer) for d, a in acts.items()},
                                   {d: a.rows_frame() for d, a in acts.items()}, method=s.method,
                                   reference=_reference(acts), max_points=s.max_points)
             for layer in sorted(s.layers)}
    return TokenClouds(views, sum(a.n_excluded for a in acts.values()))


def _snippets(s: MeanSettings) -> dict[str, list[str]]:
    from core.data import example_texts

    return {d: [t[:SNIPPET] for t in example_texts(d, s.n_docs, seed=0)] for d in s.datasets}


def _means_view(means: dict[str, dict[int, object]], snippets: dict[str, list[str]], s: MeanSettings,
                layer: int) -> View:
    texts = {d: pd.DataFrame({"text": snippets[d]}) for d in means}
    return project_groups({d: m[layer] for d, m in means.items()}, texts, method=s.method,
                          reference=_reference(means))


def text_means(lm, s: MeanSettings, progress: ProgressFn | None = None) -> View:  # noqa: ANN001
    """One point per text: its mean activation at `s.layer` (first token left out), projected; frame columns
    group, row, x, y, inside, text. Every layer's means come from one cached pass per dataset."""
    from core.analysis.separation import all_layer_means

    means = all_layer_means(lm, s.datasets, n=s.n_docs, max_length=s.max_length, progress=progress)
    return _means_view(means, _snippets(s), s, s.layer)


# --------------------------------------------------------------------------- the committed artifact


@dataclass(frozen=True)
class StoredActivationsView:
    """The default views as built by `python -m core precompute`, for one model's weights."""

    cloud_settings: CloudSettings
    mean_settings: MeanSettings  # its layer is the page's default; every layer is stored
    num_layers: int
    tokens: pd.DataFrame
    means: pd.DataFrame
    meta: dict = field(repr=False)

    @property
    def source(self) -> str:
        m = self.meta
        return (f"Precomputed by `{m.get('command', 'python -m core precompute')}` on {m.get('date', '?')} "
                f"({m.get('compute', '?')}); change any setting to compute live.")

    def clouds(self, s: CloudSettings) -> TokenClouds | None:
        """The stored clouds when `s` is what was stored, else None (compute live)."""
        if s != self.cloud_settings:
            return None
        views = {}
        for layer in s.layers:
            frame = self.tokens[self.tokens["layer"] == layer].drop(columns="layer").reset_index(drop=True)
            frame["text"] = [self.meta["token_texts"][g][d] for g, d in zip(frame["group"], frame["doc"], strict=True)]
            info = self.meta["token_views"][str(layer)]
            views[layer] = View(frame, info["x_label"], info["y_label"], info["note"], info["n_total"], s.method)
        return TokenClouds(views, self.meta["n_excluded"], self.source)

    def means_at(self, s: MeanSettings) -> View | None:
        """The stored per-text means view when `s` matches the stored settings at any layer, else None."""
        if dataclasses.replace(s, layer=self.mean_settings.layer) != self.mean_settings:
            return None
        info = self.meta["mean_views"].get(str(s.layer))
        if info is None:
            return None
        frame = self.means[self.means["layer"] == s.layer].drop(columns="layer").reset_index(drop=True)
        frame["text"] = [self.meta["mean_texts"][g][r] for g, r in zip(frame["group"], frame["row"], strict=True)]
        return View(frame, info["x_label"], info["y_label"], info["note"], info["n_total"], s.method)


def _view_info(view: View) -> dict:
    return {"x_label": view.x_label, "y_label": view.y_label, "note": view.note, "n_total": view.n_total}


def save_activations_view(store, lm, command: str = "python -m core precompute") -> None:  # noqa: ANN001
    """Compute the page's default views on `lm` and write them into `store` (core.artifacts.ArtifactStore)."""
    import datetime as dt

    from core.analysis.separation import all_layer_means
    from core.compute import decide

    cs, ms = CloudSettings.default(lm.num_layers), MeanSettings.default(lm.num_layers)
    clouds = token_clouds(lm, cs)
    tokens = pd.concat([v.frame.assign(layer=layer) for layer, v in clouds.views.items()], ignore_index=True)
    # Hover text lives once per text in the JSON, not once per token in the CSV (a 6x smaller artifact).
    token_texts = {d: {} for d in cs.datasets}
    for g, doc, text in tokens[["group", "doc", "text"]].drop_duplicates(["group", "doc"]).itertuples(index=False):
        token_texts[g][int(doc)] = text
    means = all_layer_means(lm, ms.datasets, n=ms.n_docs, max_length=ms.max_length)
    snippets = _snippets(ms)
    mean_views = {layer: _means_view(means, snippets, ms, layer) for layer in range(lm.num_layers + 1)}
    store.save_table(f"{NAME}_tokens", tokens.drop(columns="text"))
    store.save_table(f"{NAME}_means", pd.concat([v.frame.drop(columns="text").assign(layer=layer)
                                                 for layer, v in mean_views.items()], ignore_index=True))
    store.save_json(NAME, {
        "model_fingerprint": lm.fingerprint, "num_layers": lm.num_layers,
        "cloud_settings": dataclasses.asdict(cs), "mean_settings": dataclasses.asdict(ms),
        "token_views": {str(k): _view_info(v) for k, v in clouds.views.items()},
        "mean_views": {str(k): _view_info(v) for k, v in mean_views.items()},
        "n_excluded": clouds.n_excluded, "token_texts": token_texts, "mean_texts": snippets,
        "command": command, "compute": decide(lm).reason,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    })


def load_activations_view(store, fingerprint: str | None) -> StoredActivationsView | None:  # noqa: ANN001
    """The stored default views for these weights (`LoadedModel.fingerprint`), or None: none stored, or built on
    other weights, or a file missing."""
    meta = store.load_json(NAME)
    if not meta or fingerprint is None or meta.get("model_fingerprint") != fingerprint:
        return None
    tokens, means = store.load_table(f"{NAME}_tokens"), store.load_table(f"{NAME}_means")
    if tokens is None or means is None:
        return None
    # JSON has no tuples and string keys only: back to the settings' and lookups' own types.
    cs = CloudSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["cloud_settings"].items()})
    ms = MeanSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["mean_settings"].items()})
    meta["token_texts"] = {g: {int(k): t for k, t in docs.items()} for g, docs in meta["token_texts"].items()}
    return StoredActivationsView(cs, ms, int(meta["num_layers"]), tokens, means, meta)


__all__ = ["CloudSettings", "MeanSettings", "StoredActivationsView", "TokenClouds", "load_activations_view",
           "save_activations_view", "text_means", "token_clouds"]
