"""Activations: token clouds of C4 / SQuAD / MATH per layer, their separation across layers, per-document means."""

import altair as alt
import streamlit as st

import ui_state
from core.analysis.activation_views import CloudSettings, MeanSettings, load_activations_view, text_means, token_clouds
from core.analysis.separation import COLUMNS, dataset_separation
from core.artifacts import ArtifactStore
from core.data import dataset_label

METRICS = {"silhouette": "silhouette (-1..1)", "centroid_ratio": "centroid distance / within spread",
           "probe_accuracy": "held-out probe accuracy"}

st.title("Activations")
st.caption("Hidden states of web text (C4 role), QA (SQuAD role) and arithmetic (MATH) at chosen layers. "
           "The paper: 'MATH activations lie in a distant cluster; SQuAD stays close to C4'. Does it hold here?")
# The default views come from the committed artifacts when they were built on these weights: the model is loaded
# only when a setting asks for something they do not hold.
store = ArtifactStore()
fingerprint = ui_state.current_fingerprint()
stored = load_activations_view(store, fingerprint)
depth = stored.num_layers if stored else ui_state.current_model().num_layers
cloud_default = CloudSettings.default(depth)

c1, c2 = st.columns(2)
datasets = c1.multiselect("Datasets", ["c4", "squad", "math"], default=list(cloud_default.datasets),
                          key="act_datasets", format_func=ui_state.DATASETS.get)
layers = c2.multiselect("Layers (0 = embeddings)", list(range(depth + 1)), default=list(cloud_default.layers),
                        key="act_layers", max_selections=3)
c3, c4, c5, c6 = st.columns(4)
n_docs = c3.slider("Texts per dataset", 4, 128, cloud_default.n_docs, step=4, key="act_docs")
max_len = c4.select_slider("Tokens per text", [32, 64, 128, 256], cloud_default.max_length, key="act_len",
                           help="QA texts keep their last tokens (question and answer), others their first.")
view = c5.radio("View", ["PCA", "t-SNE"], horizontal=True, key="act_view",
                help="PCA axes are fitted on the C4 cloud when it is selected (else on all points).")
show_out = c6.toggle("Show outliers", key="act_outliers", help="Points outside median ± 3·IQR on either axis.")
with_first = st.toggle("Include each text's first token (attention sink)", key="act_first",
                       help="LLaMA models give the first token activations orders of magnitude larger than the rest.")
if not datasets or not layers:
    st.info("Pick at least one dataset and one layer.")
    st.stop()
st.caption("Data: " + "; ".join(f"{d} = {dataset_label(d)}" for d in datasets))

method = "tsne" if view == "t-SNE" else "pca"
settings = CloudSettings(tuple(datasets), tuple(sorted(layers)), n_docs, max_len, method, with_first)
clouds = stored.clouds(settings) if stored else None
if clouds is None:
    bar = st.progress(0.0, text="Collecting activations (cached after the first time) ...")
    with st.spinner(f"Activations and {view} ..."):
        clouds = token_clouds(ui_state.current_model(), settings, progress=bar.progress)
    bar.empty()
color = alt.Color("group:N", title="dataset", scale=alt.Scale(domain=["c4", "squad", "math"],
                                                              range=["#4c78a8", "#f58518", "#d62728"]))
tips = [alt.Tooltip(c) for c in ("group:N", "token:N", "doc:Q", "position:Q", "text:N")]
for (layer, pv), col in zip(clouds.views.items(), st.columns(len(layers)), strict=True):
    with col:
        pts = pv.frame if show_out else pv.frame[pv.frame["inside"]]
        st.altair_chart(alt.Chart(pts, title=f"Layer {layer} tokens ({view})").mark_circle(size=14, opacity=0.5)
                        .encode(x=alt.X("x:Q", title=pv.x_label), y=alt.Y("y:Q", title=pv.y_label), color=color,
                                tooltip=tips).interactive(), width="stretch")
        st.caption(f"{len(pv.frame):,} of {pv.n_total:,} tokens drawn. {pv.note} "
                   f"{'Shown.' if show_out else 'Hidden (toggle to show).'} "
                   + (f"{clouds.n_excluded} first tokens left out." if clouds.n_excluded else "First tokens included.")
                   + f" {clouds.source}")

st.subheader("Separation across layers")
st.caption("One point per text: its mean activation (first token left out). Silhouette and centroid ratio on the "
           "raw vectors; probe: standardised logistic regression, 5-fold held-out accuracy.")
s1, s2 = st.columns(2)
mean_default = MeanSettings.default(depth)
sep_docs = s1.slider("Texts per dataset for separation", 8, 128, mean_default.n_docs, step=8, key="act_sep_docs")
metric = s2.radio("Measure", list(METRICS), horizontal=True, format_func=METRICS.get, key="act_sep_metric")
usable, note = store.status(fingerprint)
table = store.load_table("separation") if usable else None
live = table is None or st.toggle("Compute live with these settings", key="act_sep_live")
if live:
    if len(datasets) < 2:
        st.info("Pick at least two datasets to compare.")
        st.stop()
    bar = st.progress(0.0, text="Mean activations at every layer (one pass per dataset, cached) ...")
    table = dataset_separation(ui_state.current_model(), datasets, n=sep_docs, max_length=max_len,
                               progress=bar.progress)
    bar.empty()
else:
    st.caption(f"Precomputed table. {note}")
table = table[COLUMNS]
st.altair_chart(
    alt.Chart(table, title=f"{METRICS[metric]} per layer").mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer (0 = embeddings)"), y=alt.Y(f"{metric}:Q", title=METRICS[metric]),
        color=alt.Color("comparison:N", title="datasets compared"),
        tooltip=["layer:Q", "comparison:N", alt.Tooltip(f"{metric}:Q", format=".3f"),
                 alt.Tooltip("chance:Q", format=".2f"), "n_docs:Q"],
    ),
    width="stretch",
)
st.dataframe(table, width="stretch", hide_index=True)
st.download_button("Download the table (CSV)", table.to_csv(index=False), "separation.csv", key="act_sep_csv")

st.subheader("Mean activation per text (the paper's Figure 5)")
fig_layer = st.slider("Layer", 0, depth, mean_default.layer, key="act_mean_layer")
mean_settings = MeanSettings(tuple(datasets), fig_layer, sep_docs, max_len, method)
mv = stored.means_at(mean_settings) if stored else None
mean_source = stored.source if mv is not None else "Computed live."
if mv is None:
    bar = st.progress(0.0, text="Mean activations (cached) ...")
    mv = text_means(ui_state.current_model(), mean_settings, progress=bar.progress)
    bar.empty()
mean_pts = mv.frame if show_out else mv.frame[mv.frame["inside"]]
st.altair_chart(alt.Chart(mean_pts, title=f"Mean activation per text, layer {fig_layer} ({view})")
                .mark_circle(size=60, opacity=0.8).encode(
                    x=alt.X("x:Q", title=mv.x_label), y=alt.Y("y:Q", title=mv.y_label), color=color,
                    tooltip=[alt.Tooltip("group:N", title="dataset"), alt.Tooltip("row:Q", title="text #"),
                             alt.Tooltip("text:N")],
                ).interactive(), width="stretch")
st.caption(f"{mv.note} {'Shown.' if show_out else 'Hidden (toggle to show).'} "
           + mean_source)
