"""Embedding space: the token-embedding cloud (or a layer's activations), a token finder, a sentence's path."""

import altair as alt
import numpy as np
import streamlit as st

import ui_state
from core.analysis.projections import TSNE_MAX_POINTS, find_tokens, project_groups
from core.analysis.trajectories import reference_cloud, sentence_vs_random, step_histogram, trajectory_test
from core.data import dataset_label, example_texts

st.title("Embedding space")
st.caption(
    "Every token of the vocabulary is a point (its input embedding). A sentence is a path through them: "
    "the paper found such paths 'highly jumpy', with step statistics close to random walks."
)
lm = ui_state.current_model()

c1, c2, c3 = st.columns([1, 2, 1])
view = c1.radio("View", ["PCA", "t-SNE"], horizontal=True, key="emb_view",
                help="PCA axes are fitted on all tokens; t-SNE embeds a token subsample, the found tokens and "
                     "the sentence jointly (computed on demand, then cached).")
n_points = c2.slider("Token points", 500, TSNE_MAX_POINTS, 2000, step=500, key="emb_points",
                     help=f"Tokens drawn (of {lm.model.config.vocab_size:,}); t-SNE runs on at most "
                          f"{TSNE_MAX_POINTS:,} points, about 10 s per 1,000 here.")
show_out = c3.toggle("Show outliers", key="emb_outliers", help="Points outside median ± 3·IQR on either axis.")
sentence = st.text_input("Sentence to trace", "The cat sat on the mat because the sun was warm.", key="emb_sentence")
c4, c5, c6 = st.columns([2, 1, 1])
query = c4.text_input("Find a token", "", key="emb_find", placeholder="e.g. cat")
n_walks = c5.slider("Random walks", 50, 1000, 200, step=50, key="emb_walks")
layer = c6.slider("Layer", 0, lm.num_layers, 0, key="emb_layer",
                  help="0: token embeddings (the vocabulary). k: activations after block k, over the layer-k "
                       "activations of 32 news texts (the paper's Figure 2); the first token is left out.")

try:
    with st.spinner("Sentence path and random walks ..."):
        traj, test, walk_steps = sentence_vs_random(lm, sentence, layer=layer, n_walks=n_walks)
        found = find_tokens(lm, query) if query.strip() else np.zeros(0, dtype=np.int64)
        name, cloud, cloud_meta = reference_cloud(lm, layer)
except ValueError as exc:
    st.info(f"{exc}")
    st.stop()

groups, meta = {name: cloud, "sentence": traj.points}, {name: cloud_meta, "sentence": traj.frame()}
hit = cloud_meta["token_id"].isin(found).to_numpy()
if hit.any():
    groups["found"], meta["found"] = cloud[hit], cloud_meta[hit]
method = "tsne" if view == "t-SNE" else "pca"
with st.spinner("t-SNE (cached after the first time) ..." if method == "tsne" else "Projecting ..."):
    pv = project_groups(groups, meta, method=method, reference=name, max_points=n_points,
                        keep_groups=tuple(g for g in groups if g != name))
points = pv.frame if show_out else pv.frame[pv.frame["inside"]]

x = alt.X("x:Q", title=pv.x_label)
y = alt.Y("y:Q", title=pv.y_label)
color = alt.Color("group:N", title="points", scale=alt.Scale(domain=[name, "found", "sentence"],
                                                               range=["#9aa5b1", "#d62728", "#1f77b4"]))
tips = [alt.Tooltip("group:N"), alt.Tooltip("token:N"), alt.Tooltip("token_id:Q")]
cloud_chart = alt.Chart(points[points["group"] != "sentence"]).mark_circle().encode(
    x=x, y=y, color=color, tooltip=tips,
    size=alt.condition(alt.datum.group == "found", alt.value(90), alt.value(10)),
    opacity=alt.condition(alt.datum.group == "found", alt.value(1.0), alt.value(0.35)),
)
path_data = pv.frame[pv.frame["group"] == "sentence"]
path = alt.Chart(path_data).mark_line(point=True, strokeWidth=2).encode(
    x=x, y=y, order="order:Q", color=color,
    tooltip=[*tips, alt.Tooltip("order:Q", title="position"), alt.Tooltip("step_in:Q", format=".3f", title="step in")],
)
labels = alt.Chart(path_data).mark_text(dy=-9, fontSize=11).encode(x=x, y=y, text="token:N")
title = f"{'Token embeddings' if layer == 0 else f'Layer {layer} activations'} ({view}) with the sentence's path"
st.altair_chart((cloud_chart + path + labels).properties(title=title, height=520).interactive(), width="stretch")
st.caption(f"{pv.note} {'Shown.' if show_out else 'Hidden: use the toggle to show them.'} "
           f"{len(pv.frame[pv.frame['group'] == name]):,} of {len(cloud):,} points of the {name} drawn.")
if query.strip() and not hit.any():
    st.caption(f"No token matching {query!r} in the {name}.")

st.subheader("Step lengths: this sentence vs random walks")
m = st.columns(4)
m[0].metric("Sentence: mean step", f"{test.real_mean_step:.3f}", help=f"± {test.real_std_step:.3f} (std)")
m[1].metric("Walks: mean step", f"{test.random_mean_step:.3f}", help=f"± {test.random_std_step:.3f} (std)")
m[2].metric("P(shorter)", f"{test.common_language:.2f}", help="P(a sentence step < a walk step); 0.5 = no difference")
m[3].metric("p (one-sided)", f"{test.p_value:.2g}", help="Mann-Whitney U, H1: the sentence's steps are shorter")
st.caption(
    f"Random walks: {n_walks} sequences of {len(traj.token_ids) + traj.first_position} tokens drawn uniformly from "
    f"the vocabulary (special tokens excluded){', read by the model' if layer else ''}. "
    "Mann-Whitney U on pooled steps, H1: the sentence's steps are shorter. Steps "
    "within one sentence are not independent, so read this p-value as a description; the test below uses "
    "one value per sentence."
)
hist = step_histogram(traj.steps, walk_steps)
st.altair_chart(
    alt.Chart(hist, title="Distribution of step lengths").mark_bar(opacity=0.6).encode(
        x=alt.X("left:Q", bin="binned", title="step length (Euclidean)"), x2="right:Q",
        y=alt.Y("share:Q", title="share of steps", stack=None),
        color=alt.Color("group:N", title="steps of", scale=alt.Scale(domain=["sentence", "random walks"],
                                                                     range=["#1f77b4", "#9aa5b1"])),
        tooltip=[alt.Tooltip("group:N"), alt.Tooltip("left:Q", format=".3f"), alt.Tooltip("right:Q", format=".3f"),
                 alt.Tooltip("share:Q", format=".1%")],
    ),
    width="stretch",
)

with st.expander("Many sentences: are real paths more local than random walks?"):
    k1, k2 = st.columns(2)
    n_sent = k1.slider("News sentences", 20, 400, 200, step=20, key="emb_test_n")
    baseline = k2.radio("Baseline", ["uniform", "shuffled"], horizontal=True, key="emb_test_baseline",
                        help="uniform: random tokens (the paper's random walk); shuffled: each sentence's own "
                             "tokens in random order (same tokens, only the order lost).")
    if st.button("Run the test", key="emb_test_run"):
        texts = [t.split(". ")[0] for t in example_texts("c4", n_sent, seed=0)]
        result = trajectory_test(lm, texts, layer=layer, baseline=baseline)
        st.write(result.summary())
        st.caption(f"First sentence of each of {n_sent} texts from {dataset_label('c4')}; one mean step and one "
                   "step spread per sequence, one-sided Mann-Whitney U.")
