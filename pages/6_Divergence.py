"""Divergence: where trained prompts go relative to the model's own embeddings (paper Figures 6-8, 10, 11)."""

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

import ui_state
from core import tour
from core.analysis import runs_compare as rc
from core.artifacts import ArtifactStore

NO_RUNS = ("No runs of this model yet. Train one on the *Train* page, or from a shell: "
           "`python -m core train --dataset math --method soft --prior gaussian --steps 40`; "
           "`python -m core precompute` builds the whole gallery of priors.")
MEASURES = {"collapsed_share": "collapsed share", "median_nearest_cos": "median nearest-token cosine",
            "median_nearest_cos_centered": "median nearest cosine, mean removed",
            "within_nn_radius_share": "within a neighbour radius (not collapse)",
            "median_manifold_ratio": "distance to manifold (x)",
            "median_mahalanobis": "median Mahalanobis", "median_norm_ratio": "norm / vocabulary norm",
            "mean_drift_l2": "drift from init (L2)", "mean_drift_cos": "drift from init (1 - cos)"}


@st.cache_data(show_spinner="Measuring divergence of every snapshot ...", max_entries=16)
def divergence_view(fingerprint: str, paths: tuple[str, ...], tensor: str, mahalanobis: bool,
                    stamps: tuple[float, ...]) -> rc.DivergenceView:
    # fingerprint keys the model (weights and precision), stamps the runs' last save; the model comes from ui_state.
    return rc.divergence_view(ui_state.current_model(), list(paths), tensor, with_mahalanobis=mahalanobis)


COLLAPSE_HELP = (
    "**Collapsed** (Lester et al. 2021, section 7): the cosine to the nearest reference point is at least the "
    "reference's own median nearest-neighbour cosine, and the norm is within x2 of that point's norm. "
    "**Mean removed**: the same cosine after subtracting the reference's mean from both sides (plain cosines "
    "share the vocabulary's mean direction). **Within a neighbour radius** is the old Euclidean score: closer to "
    "some point than its own nearest neighbour; a short vector near the centre passes it, so an untrained "
    "N(0, 0.02²) prompt scores 1.0; it does not measure collapse. **Mahalanobis**: points of the fitted Gaussian "
    "sit near √d (the typical shell, 24 at d = 576), not near 0; a smaller distance is not \"more on the data\". "
    "Distance to manifold: k-NN distance over the reference's own median k-NN distance.")


st.title("Divergence")
st.caption("Does a trained prompt collapse onto the token embeddings, or stay where its prior put it? "
           "Prior sample, path through training and trained prompt on the reference cloud's PCA axes.")
lm = ui_state.current_model()
mine = ui_state.model_runs_or_stop(lm, "see", NO_RUNS)

labels = {e.label: str(e.path) for e in mine}
# Open on the home tour's story (core.tour) where the gallery holds its runs, else on the newest two.
table = ArtifactStore().load_table_for("runs", lm.fingerprint)
story = [f"{name} [precomputed]" for name in tour.collapse_pair(table)["showcase"]]
default = story if story and all(label in labels for label in story) else list(labels)[:2]
chosen = st.multiselect("Runs", list(labels), default=default, key="div_runs",
                        help="[yours] = runs under runs/; [precomputed] = the committed gallery under artifacts/runs.")
if not chosen:
    st.info("Choose at least one run.")
    st.stop()
paths = tuple(labels[c] for c in chosen)
tensors = rc.prompt_tensors(paths)
if not tensors:
    st.info("The chosen runs share no prompt tensor (mix soft and deep runs with care): choose runs of one kind.")
    st.stop()
c1, c2 = st.columns(2)
tensor = c1.selectbox("Prompt tensor", tensors, key="div_tensor",
                      help="'soft' is compared with the token embeddings; 'deep.l' with the activations that "
                           "decoder block l receives, on the run's own dataset.")
mahalanobis = c2.toggle("Mahalanobis distance", value=True, key="div_maha",
                        help="Under the Gaussian fitted to the reference (Ledoit-Wolf shrinkage), fitted once.")
stamps = tuple((Path(p) / "run.json").stat().st_mtime for p in paths)
view = divergence_view(lm.fingerprint, paths, tensor, mahalanobis, stamps)

steps = sorted(view.paths["step"].unique().tolist())
c1, c2 = st.columns([3, 1])
step = c1.select_slider("Training step", steps, value=steps[-1], key="div_step",
                        help="Vectors at this step (a shorter run shows its last snapshot); lines trace each "
                             "vector's path from the prior sample.")
zoom = c2.toggle("Zoom to the reference cloud", value=False, key="div_zoom",
                 help="Fit the axes to the reference cloud; vectors outside are clipped and counted below.")
x_dom, y_dom = view.cloud_domain() if zoom else (None, None)
tips = ["run", "step", "vector", "nearest", alt.Tooltip("nearest_cos", format=".3f")]
cloud = alt.Chart(view.cloud).mark_circle(size=8, color="#b8b8b8", opacity=0.35, clip=True).encode(
    x=alt.X("x", title=view.x_label, scale=alt.Scale(domain=x_dom) if zoom else alt.Undefined),
    y=alt.Y("y", title=view.y_label, scale=alt.Scale(domain=y_dom) if zoom else alt.Undefined),
    tooltip=[alt.Tooltip("text", title="token")])
lines = alt.Chart(view.paths[view.paths["step"] <= step]).mark_line(strokeWidth=1, opacity=0.5, clip=True).encode(
    x="x", y="y", color=alt.Color("run", title="run"), detail="vector", order="step", tooltip=tips)
start = alt.Chart(view.paths[view.paths["step"] == steps[0]]).mark_point(shape="circle", size=45, clip=True).encode(
    x="x", y="y", color="run", tooltip=tips)
now = alt.Chart(view.at_step(step)).mark_point(shape="diamond", size=90, filled=True, clip=True).encode(
    x="x", y="y", color="run", tooltip=tips)
st.altair_chart((cloud + lines + start + now).properties(
    title=f"{tensor}: prior sample (circles), path, and step {step} (diamonds) over {view.reference}", height=520,
).interactive(), width="stretch")
outside = f" Zoomed: {view.outside_cloud(step)} vector(s) at this step lie outside the view." if zoom else ""
st.caption(view.note + " Grey: reference points (hover for the token)." + outside)

st.subheader("Aggregate measures of the trained prompts")
summary = pd.DataFrame(view.summary).T[list(MEASURES)].rename(columns=MEASURES)
st.dataframe(summary.style.format("{:.3f}"), width="stretch")
st.caption(COLLAPSE_HELP)
st.dataframe(view.step0().assign(measure=lambda f: f["measure"].map(MEASURES)).dropna(subset=["measure"]),
             width="stretch", hide_index=True,
             column_config={"step0": st.column_config.NumberColumn("step 0 (prior sample)", format="%.4g"),
                            "final": st.column_config.NumberColumn("trained", format="%.4g")})

measure = st.selectbox("Measure against training step", list(MEASURES), format_func=MEASURES.get, key="div_measure")
by_step = view.by_step.rename(columns={measure: "value"})
line = alt.Chart(by_step).mark_line(point=True).encode(
    x=alt.X("step", title="training step"), y=alt.Y("value", title=MEASURES[measure]),
    color=alt.Color("run", title="run"), tooltip=["run", "step", alt.Tooltip("value", format=".4f")])
first = alt.Chart(by_step[by_step["step"] == by_step.groupby("run")["step"].transform("min")]).mark_point(
    size=120, shape="square", filled=True).encode(x="step", y="value", color="run", tooltip=["run", "step", "value"])
band = view.baseline[view.baseline["measure"] == measure] if not view.baseline.empty else view.baseline
layers = [line, first]
if len(band):
    layers.insert(0, alt.Chart(band).mark_rect(opacity=0.15).encode(
        y="low", y2="high", color="run", tooltip=["run", "low", "high", "mean", "draws"]))
st.altair_chart(alt.layer(*layers).properties(title=f"{MEASURES[measure]} through training", height=280),
                width="stretch")
st.caption("Squares: step 0, the prior sample the run started from. Shaded band: the range over fresh draws of "
           "the same prior (untrained prompts). A trained value inside the band says nothing training did. "
           + view.baseline_note)

st.subheader("When does the read-out settle?")
st.altair_chart(alt.Chart(view.settled).mark_line(point=True, interpolate="step-after").encode(
    x=alt.X("step", title="training step"), y=alt.Y("settled_share", title="vectors whose top-1 token is final",
                                                       scale=alt.Scale(domain=[0, 1])),
    color="run", tooltip=["run", "step", alt.Tooltip("settled_share", format=".0%")]).properties(height=220),
    width="stretch")
st.dataframe(view.settling, width="stretch", hide_index=True)
st.caption("settled_step: the first snapshot from which a vector's nearest token no longer changes; changes: how "
           "often it changed; topk_overlap: share of the final top-3 tokens already in the prior sample's top-3.")

st.subheader("Per-vector read-out of the trained prompts")
cols = ["run", "index", "nearest", "nearest_cos", "top_tokens", "norm_ratio", "manifold_ratio", "mahalanobis",
        "nearest_cos_centered", "nearest_norm_ratio", "collapsed", "within_nn_radius", "drift_l2", "drift_cos"]
st.dataframe(view.per_vector[cols], width="stretch", hide_index=True)
